/**
 * The workspace change layer on a generated 100k-file / 5k-folder project
 * (issue 10), each figure beside its baseline in the same run, interleaved
 * round by round:
 *
 *   accept   a 2-file iteration (a module and its test): written through the
 *            view, then PhaseWorkspace.checkpoint — read the change set,
 *            judge, compile (python3 -I -B, as the sandbox does), unmount,
 *            apply to the project, empty the upper, mount again
 *            ↔ `git add -A && git write-tree` after the same 2-file change in
 *              a git copy of the tree (index already seeded)
 *   reject   a 3-file iteration (three unrelated modules): checkpoint →
 *            refused, discarded, view mounted again
 *            ↔ `cp -a` of the tree (a snapshot by copy)
 *   …and both again on a second copy of the tree through a layer with
 *   `hostHelper: false` (a process per mount step and per xattr read, as
 *   before the host helper), interleaved with the first round by round.
 *   Both layers hide `.env` and mount `.git` read-only, as the daemon does
 *   for a project that has them.
 *   suite    a Python test suite (100 tests, each writing and reading files
 *            in the project) run by pytest in the sandbox image, with the
 *            project at /workspace through the layer's view ↔ through a
 *            plain bind mount of the project; pytest's own wall time, taken
 *            inside the container
 *   events   write through the view → the layer watcher's event (p50, p95)
 *
 * Targets: accept ≤ 50 ms and reject ≤ 50 ms (p50), suite ≤ 1.05× the bind
 * mount, events p50 ≤ 100 ms. Needs root (mount, loop devices), docker and
 * the sandbox image (SANDBOXD_IMAGE). /proc/loadavg is recorded with the
 * figures. BENCH_WS_ROUNDS (default 5), BENCH_WS_FILES (default 100000).
 *
 * Ends its stdout with a JSON document (bench/all.sh keeps it).
 */
import { execFile, spawnSync } from "node:child_process";
import { closeSync, fdatasyncSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { performance } from "node:perf_hooks";
import { promisify } from "node:util";
import { summarize, roundStats, round } from "./lib.mjs";
import { PhaseWorkspace, WorkspaceLayer } from "../dist/workspace/index.js";
import { LayerWatcher } from "../dist/workspace/watch.js";
import { loadPolicy } from "../dist/policy/index.js";

const run = promisify(execFile);
const ROUNDS = Number(process.env.BENCH_WS_ROUNDS ?? 5);
/** BENCH_WS_ONLY=suite: only the test suite through the view beside the bind mount (no git copy, no accept/reject rounds) */
const ONLY = process.env.BENCH_WS_ONLY ?? "";
const FILES = Number(process.env.BENCH_WS_FILES ?? 100_000);
const PER_DIR = 20;
const IMAGE = process.env.SANDBOXD_IMAGE ?? "sandboxd-sandbox:latest";
/** the compile check's interpreter: a real binary (a pyenv shim is a shell script that costs more than the check) */
const BENCH_PYTHON = process.env.BENCH_WS_PYTHON ?? "/usr/bin/python3";
const loadavg = () => readFileSync("/proc/loadavg", "utf8").trim();
/**
 * bench/priority.sh puts this process in a high-CPU-weight cgroup; the
 * suite's containers are Docker's, so they are put under the same cgroup
 * (--cgroup-parent) to share its weight. null when not run through it.
 */
const CGROUP_PARENT = (() => {
  const line = readFileSync("/proc/self/cgroup", "utf8").split("\n").find((l) => /^\d+:([^:]*,)?cpu(,[^:]*)?:/.test(l) || l.startsWith("0::"));
  const p = line?.split(":")[2] ?? "";
  return p.endsWith("/sandboxd-bench") ? p : null;
})();

const root = mkdtempSync(path.join(os.tmpdir(), "sbx-bench-ws-"));
const project = path.join(root, "project");
/** the same tree again, under the layer without the host helper */
const project2 = path.join(root, "project2");
const gitCopy = path.join(root, "git");
const phaseDir = path.join(root, "phase");
let layer = null;
let layer2 = null;
let watcher = null;

async function cleanup() {
  await watcher?.close().catch(() => {});
  await layer?.destroy(null).catch((e) => console.error("bench: layer destroy:", e.message));
  await layer2?.destroy(null).catch((e) => console.error("bench: layer destroy:", e.message));
  rmSync(root, { recursive: true, force: true });
}
process.on("SIGINT", () => cleanup().then(() => process.exit(130)));

function generate(project) {
  const t0 = performance.now();
  const dirs = Math.ceil(FILES / PER_DIR);
  mkdirSync(path.join(project, "tests"), { recursive: true });
  let n = 0;
  for (let d = 0; d < dirs && n < FILES; d++) {
    const dir = path.join(project, "pkg", `p${Math.floor(d / 50)}`, `m${d}`);
    mkdirSync(dir, { recursive: true });
    for (let f = 0; f < PER_DIR && n < FILES; f++, n++) writeFileSync(path.join(dir, `f${f}.py`), `X_${d}_${f} = ${n}\n`);
  }
  mkdirSync(path.join(project, "services"), { recursive: true });
  for (let i = 0; i < 200; i++) {
    writeFileSync(path.join(project, "services", `mod${i}.py`), `def f${i}() -> int:\n    return ${i}\n`);
    writeFileSync(path.join(project, "tests", `test_mod${i}.py`), `from services.mod${i} import f${i}\n\n\ndef test_f():\n    assert f${i}() == ${i}\n`);
  }
  // the suite: 100 tests, each writing and reading files in the project
  const tests = [];
  for (let i = 0; i < 100; i++) {
    tests.push(
      `def test_io_${i}():`,
      `    d = ROOT / "out" / "t${i}"`,
      `    d.mkdir(parents=True, exist_ok=True)`,
      `    for k in range(20):`,
      `        (d / f"r{k}.csv").write_text("\\n".join(f"{j},{j * ${i}}" for j in range(200)))`,
      `    total = sum(int(l.split(",")[1]) for k in range(20) for l in (d / f"r{k}.csv").read_text().splitlines())`,
      `    assert total == 20 * ${i} * sum(range(200))`,
      ``,
    );
  }
  mkdirSync(path.join(project, "suite"), { recursive: true });
  writeFileSync(path.join(project, "suite", "test_suite.py"), ["import pathlib", 'ROOT = pathlib.Path("/workspace")', "", "", ...tests].join("\n"));
  writeFileSync(path.join(project, "suite", "conftest.py"), "");
  // what the daemon hides (.env) and mounts read-only (.git) in a real project
  writeFileSync(path.join(project, ".env"), "DATABASE_URL=postgresql://u:p@db/prod\n");
  mkdirSync(path.join(project, ".git", "hooks"), { recursive: true });
  writeFileSync(path.join(project, ".git", "config"), "[core]\n\tbare = false\n");
  writeFileSync(
    path.join(project, "bench_suite.py"),
    ["import json, sys, time", "import pytest", "t = time.perf_counter()", "code = pytest.main(['-q', '-p', 'no:cacheprovider', 'suite'])", "sys.stderr.write(json.dumps({'code': int(code), 'seconds': time.perf_counter() - t}) + '\\n')"].join("\n"),
  );
  return { files: n + 400 + 3, folders: dirs + Math.ceil(dirs / 50) + 5, seconds: round((performance.now() - t0) / 1000, 1) };
}

const sh = (cmd, cwd) => run("sh", ["-ec", cmd], { cwd, maxBuffer: 64 * 1024 * 1024 });

async function timedMs(fn) {
  const t = performance.now();
  await fn();
  return performance.now() - t;
}

async function main() {
  console.error(`bench/workspace: generating ${FILES} files… (loadavg ${loadavg()})`);
  const gen = generate(project);
  if (ONLY !== "suite") generate(project2);
  console.error(`bench/workspace: ${gen.files} files, ${gen.folders} folders in ${gen.seconds} s; seeding the git copy…`);
  if (ONLY !== "suite") await sh(`cp -a ${project} ${gitCopy} && cd ${gitCopy} && rm -rf .git && git init -q && git add -A && git -c user.email=b@b -c user.name=b commit -qm seed`);

  const policy = (await loadPolicy()).workspace;
  const journal = path.join(root, "records.jsonl");
  const makeLayer = async (proj, dir, hostHelper) => {
    const l = new WorkspaceLayer({ phaseDir: dir, project: proj, hidden: [".env"], readOnly: [".git"], budgetBytes: 2 * 1024 ** 3, hostHelper });
    await l.prepare();
    await l.mount();
    await l.attach(null);
    return l;
  };
  const makeWorkspace = (l, dir) =>
    new PhaseWorkspace(
      l,
      {
        containerPid: async () => null,
        // the compile check as the sandbox runs it (python3 -I -B -c …, cwd = the view)
        runInSandbox: async (argv) => (await run(BENCH_PYTHON, argv.slice(1), { cwd: l.paths.view, maxBuffer: 8 * 1024 * 1024 })).stdout,
        // a record as durable as the journal's: appended and synced
        record: async (event, lines) => {
          const fd = openSync(journal, "a");
          writeSync(fd, JSON.stringify({ event, lines }) + "\n");
          fdatasyncSync(fd);
          closeSync(fd);
        },
        now: () => new Date().toISOString(),
      },
      { uid: 0, gid: 0, allowMainPy: false, policy: () => policy, stateFile: path.join(dir, "iterations.json") },
    );
  layer = await makeLayer(project, phaseDir, true);
  const view = layer.paths.view;
  const ws = makeWorkspace(layer, phaseDir);
  const phaseDir2 = path.join(root, "phase2");
  let ws2 = null;
  if (ONLY !== "suite") {
    layer2 = await makeLayer(project2, phaseDir2, false);
    ws2 = makeWorkspace(layer2, phaseDir2);
  }

  const accept = [];
  const reject = [];
  const acceptOld = [];
  const rejectOld = [];
  const gitTree = [];
  const cpa = [];
  const loads = [];
  for (let r = 0; r < (ONLY === "suite" ? 0 : ROUNDS); r++) {
    loads.push(loadavg());
    let it;
    // the layer with the host helper and the one without, in turns (first one, then the other)
    const sides = r % 2 === 0 ? ["helper", "processes"] : ["processes", "helper"];
    for (const side of sides) {
      const [w, v, acc, rej] = side === "helper" ? [ws, view, accept, reject] : [ws2, layer2.paths.view, acceptOld, rejectOld];
      // accept: a module and its direct test
      writeFileSync(path.join(v, "services", `mod${r}.py`), `def f${r}() -> int:\n    return ${r} + 0\n`);
      writeFileSync(path.join(v, "tests", `test_mod${r}.py`), `from services.mod${r} import f${r}\n\n\ndef test_f():\n    assert f${r}() == ${r} + 0\n`);
      acc.push(await timedMs(async () => ({ iteration: it } = await w.checkpoint(`round ${r}`, "api"))));
      if (it?.state !== "accepted") throw new Error(`round ${r} (${side}): the 2-file iteration was ${it?.state}: ${JSON.stringify(it?.failures)}`);
      // reject: three unrelated modules
      for (const k of [50, 60, 70]) writeFileSync(path.join(v, "services", `mod${k + r}.py`), `def f() -> int:\n    return ${r}\n`);
      rej.push(await timedMs(async () => ({ iteration: it } = await w.checkpoint(`three at once ${r}`, "api"))));
      if (it?.state !== "rejected") throw new Error(`round ${r} (${side}): the 3-file iteration was ${it?.state}`);
    }
    // its baseline: the same change in the git copy
    writeFileSync(path.join(gitCopy, "services", `mod${r}.py`), `def f${r}() -> int:\n    return ${r} + 0\n`);
    writeFileSync(path.join(gitCopy, "tests", `test_mod${r}.py`), `from services.mod${r} import f${r}\n\n\ndef test_f():\n    assert f${r}() == ${r} + 0\n`);
    gitTree.push(await timedMs(() => sh("git add -A && git write-tree >/dev/null", gitCopy)));
    // its baseline: a snapshot by copy (the slowest; fewer rounds)
    if (r < Math.min(ROUNDS, 3)) {
      const dst = path.join(root, `cp${r}`);
      cpa.push(await timedMs(() => sh(`cp -a ${project} ${dst}`)));
      rmSync(dst, { recursive: true, force: true });
    }
  }

  // the test suite through the view vs a plain bind mount, interleaved
  const suite = { layer: [], bind: [] };
  const dockerRun = async (src) => {
    const r = spawnSync("docker", ["run", "--rm", ...(CGROUP_PARENT ? ["--cgroup-parent", CGROUP_PARENT] : []), "--network", "none", "--user", "0", "-v", `${src}:/workspace`, "-w", "/workspace", "--entrypoint", "python3", IMAGE, "-B", "bench_suite.py"], { encoding: "utf8", maxBuffer: 64 * 1024 * 1024 });
    const line = (r.stderr ?? "").trim().split("\n").reverse().find((l) => l.startsWith("{"));
    if (!line) throw new Error(`suite did not report: ${r.stderr?.slice(-2000)}`);
    const out = JSON.parse(line);
    if (out.code !== 0) throw new Error(`suite failed (${out.code}): ${r.stdout.slice(-2000)}`);
    return out.seconds * 1000;
  };
  let suiteLoads = [];
  for (let r = 0; r < ROUNDS; r++) {
    suiteLoads.push(loadavg());
    const order = r % 2 === 0 ? ["layer", "bind"] : ["bind", "layer"];
    for (const side of order) {
      if (side === "layer") {
        suite.layer.push(await dockerRun(view));
        await layer.reset(null); // the suite's files discarded: each run starts from the same state
      } else {
        suite.bind.push(await dockerRun(project));
        rmSync(path.join(project, "out"), { recursive: true, force: true });
      }
    }
  }

  // write → watcher event
  const lat = [];
  const sent = new Map();
  watcher = await LayerWatcher.start({
    upperDir: layer.paths.upper,
    lowerDir: project,
    onEvents: (batch) => {
      const now = performance.now();
      for (const e of batch) if (sent.has(e.path) && e.kind === "create") lat.push(now - sent.get(e.path));
    },
  });
  mkdirSync(path.join(view, "live"), { recursive: true });
  await new Promise((r) => setTimeout(r, 100));
  for (let i = 0; i < 50; i++) {
    sent.set(`live/e${i}.txt`, performance.now());
    writeFileSync(path.join(view, "live", `e${i}.txt`), "x");
    await new Promise((r) => setTimeout(r, 40));
  }
  await new Promise((r) => setTimeout(r, 300));
  await watcher.close();
  watcher = null;

  const s = (xs) => roundStats(summarize(xs), 1);
  const result = {
    benchmark: "workspace",
    at: new Date().toISOString(),
    tree: gen,
    rounds: ROUNDS,
    loadavg: { rounds: loads, suite: suiteLoads, end: loadavg() },
    acceptTwoFilesMs: s(accept),
    acceptTwoFilesProcessPerStepMs: s(acceptOld),
    baselineGitAddWriteTreeMs: s(gitTree),
    rejectThreeFilesMs: s(reject),
    rejectThreeFilesProcessPerStepMs: s(rejectOld),
    baselineCpAMs: s(cpa),
    suite: { layerMs: s(suite.layer), bindMs: s(suite.bind), ratioP50: round(summarize(suite.layer).p50 / summarize(suite.bind).p50, 3) },
    fileEventMs: s(lat),
    samples: { accept: accept.map((x) => round(x, 1)), acceptProcessPerStep: acceptOld.map((x) => round(x, 1)), rejectProcessPerStep: rejectOld.map((x) => round(x, 1)), gitAddWriteTree: gitTree.map((x) => round(x, 1)), reject: reject.map((x) => round(x, 1)), cpA: cpa.map((x) => round(x, 0)), suiteLayer: suite.layer.map((x) => round(x, 0)), suiteBind: suite.bind.map((x) => round(x, 0)) },
    targets: {
      acceptP50Le50ms: summarize(accept).p50 <= 50,
      rejectP50Le50ms: summarize(reject).p50 <= 50,
      suiteLe1_05x: summarize(suite.layer).p50 / summarize(suite.bind).p50 <= 1.05,
      eventP50Le100ms: summarize(lat).p50 <= 100,
    },
  };
  console.log(
    [
      `tree: ${gen.files} files, ${gen.folders} folders`,
      `accept 2 files   p50 ${result.acceptTwoFilesMs.p50} ms  (git add -A && git write-tree p50 ${result.baselineGitAddWriteTreeMs.p50} ms)`,
      `reject 3 files   p50 ${result.rejectThreeFilesMs.p50} ms  (cp -a p50 ${result.baselineCpAMs.p50} ms)`,
      `without the host helper: accept p50 ${result.acceptTwoFilesProcessPerStepMs.p50} ms, reject p50 ${result.rejectThreeFilesProcessPerStepMs.p50} ms`,
      `pytest suite     layer p50 ${result.suite.layerMs.p50} ms, bind mount p50 ${result.suite.bindMs.p50} ms: ${result.suite.ratioP50}×`,
      `file event       p50 ${result.fileEventMs.p50} ms, p95 ${result.fileEventMs.p95} ms`,
      `loadavg          ${loads.join(" | ")}`,
    ].join("\n"),
  );
  console.log(JSON.stringify(result, null, 2));
  return Object.values(result.targets).every(Boolean);
}

main()
  .then(async (ok) => {
    await cleanup();
    process.exitCode = ok ? 0 : 1;
  })
  .catch(async (err) => {
    console.error("bench/workspace failed:", err);
    await cleanup();
    process.exitCode = 2;
  });
