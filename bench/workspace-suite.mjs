/**
 * Where the write-heavy test suite's cost through the layer comes from
 * (issue 10, target: through the view ≤ 1.05× a plain bind mount). The same
 * suite as bench/workspace.mjs (100 pytest tests, each writing 20 files and
 * reading them back, in the sandbox image), run with the project mounted at
 * /workspace in several ways, interleaved round by round (the order rotates
 * each round):
 *
 *   bind       a plain bind mount of the project (the baseline)
 *   bind-journaled  a bind mount of a copy of the project on an ext4 image
 *              with a journal, mounted with ext4's defaults (the state dir's
 *              file system on this host has no journal, which costs creates
 *              after deletes: see "layer" below and docs/WORKSPACE.md)
 *   layer      WorkspaceLayer as the daemon builds it (upper on the phase's
 *              loop-mounted ext4 image, with a journal, data=writeback,
 *              barrier=0)
 *   nojournal  the layer's disk as it was before: ext4 without a journal,
 *              mounted loop,nosuid,nodev (overlay as the layer's)
 *   dir        overlayfs with the upper on a plain folder of the state dir's
 *              file system (no loop device, no size cap)
 *   loop-dio   the journal-less image on a loop device with direct I/O
 *              (losetup --direct-io=on)
 *   loop-opts  the journal-less image mounted noatime,lazytime, the overlay
 *              volatile
 *   tmpfs      the upper on a size-capped tmpfs
 *
 * Variants are chosen with BENCH_WS_VARIANTS=bind,layer,dir (default
 * bind,layer,nojournal,dir,tmpfs).
 * BENCH_WS_ROUNDS (default 8), BENCH_WS_FILES (filler files in the lower,
 * default 100000). Needs root, docker and the sandbox image (SANDBOXD_IMAGE).
 * Ends its stdout with a JSON document.
 */
import { execFile, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { summarize, roundStats, round } from "./lib.mjs";
import { WorkspaceLayer } from "../dist/workspace/index.js";

const run = promisify(execFile);
const ROUNDS = Number(process.env.BENCH_WS_ROUNDS ?? 8);
const FILES = Number(process.env.BENCH_WS_FILES ?? 100_000);
const IMAGE = process.env.SANDBOXD_IMAGE ?? "sandboxd-sandbox:latest";
const ALL = ["bind", "bind-journaled", "layer", "nojournal", "dir", "loop-dio", "loop-opts", "tmpfs"];
const VARIANTS = (process.env.BENCH_WS_VARIANTS ?? "bind,layer,nojournal,dir,tmpfs").split(",").filter(Boolean);
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
const sh = (cmd) => run("sh", ["-ec", cmd], { maxBuffer: 16 * 1024 * 1024 });

const root = mkdtempSync(path.join(os.tmpdir(), "sbx-bench-wss-"));
const project = path.join(root, "project");
const toUnmount = [];
let layer = null;

function generate() {
  const dirs = Math.ceil(FILES / 20);
  for (let d = 0, n = 0; d < dirs && n < FILES; d++) {
    const dir = path.join(project, "pkg", `p${Math.floor(d / 50)}`, `m${d}`);
    mkdirSync(dir, { recursive: true });
    for (let f = 0; f < 20 && n < FILES; f++, n++) writeFileSync(path.join(dir, `f${f}.py`), `X_${d}_${f} = ${n}\n`);
  }
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
  writeFileSync(
    path.join(project, "bench_suite.py"),
    ["import json, sys, time", "import pytest", "t = time.perf_counter()", "code = pytest.main(['-q', '-p', 'no:cacheprovider', 'suite'])", "sys.stderr.write(json.dumps({'code': int(code), 'seconds': time.perf_counter() - t}) + '\\n')"].join("\n"),
  );
}

/** An overlay of the project at `<root>/<name>/view` with its upper in `upperRoot` (already mounted as needed). */
async function overlay(name, upperRoot, extra = "") {
  const base = path.join(root, name);
  const view = path.join(base, "view");
  mkdirSync(view, { recursive: true });
  mkdirSync(path.join(upperRoot, "upper"), { recursive: true });
  mkdirSync(path.join(upperRoot, "work"), { recursive: true });
  const opts = `lowerdir=${project},upperdir=${upperRoot}/upper,workdir=${upperRoot}/work,redirect_dir=off,metacopy=off,index=off${extra}`;
  await sh(`mount -t overlay overlay -o '${opts}' '${view}'`);
  toUnmount.push(view);
  return view;
}

async function loopDisk(name, { directIo = false, mountOpts = "" } = {}) {
  const base = path.join(root, name);
  const img = path.join(base, "layer.img");
  const mnt = path.join(base, "layer");
  mkdirSync(mnt, { recursive: true });
  // the layer's disk before the journal was added (src/workspace/layer.ts)
  await sh(`fallocate -l 2048M '${img}' && mkfs.ext4 -q -F -m 0 -O ^has_journal -E nodiscard,lazy_itable_init=1 '${img}'`);
  if (directIo) {
    const { stdout } = await run("losetup", ["--find", "--show", "--direct-io=on", img]);
    const dev = stdout.trim();
    await sh(`mount -o nosuid,nodev${mountOpts} '${dev}' '${mnt}'`);
    toUnmount.push(mnt);
    toUnmount.push(`losetup:${dev}`);
  } else {
    await sh(`mount -o loop,nosuid,nodev${mountOpts} '${img}' '${mnt}'`);
    toUnmount.push(mnt);
  }
  return mnt;
}

async function cleanup() {
  for (const m of toUnmount.reverse()) {
    if (m.startsWith("losetup:")) await run("losetup", ["-d", m.slice(8)]).catch(() => {});
    else await run("umount", ["-l", m]).catch((e) => console.error("bench: umount", m, e.message));
  }
  await layer?.destroy(null).catch((e) => console.error("bench: layer destroy:", e.message));
  rmSync(root, { recursive: true, force: true });
}
process.on("SIGINT", () => cleanup().then(() => process.exit(130)));

function suiteMs(src) {
  const r = spawnSync("docker", ["run", "--rm", ...(CGROUP_PARENT ? ["--cgroup-parent", CGROUP_PARENT] : []), "--network", "none", "--user", "0", "-v", `${src}:/workspace`, "-w", "/workspace", "--entrypoint", "python3", IMAGE, "-B", "bench_suite.py"], { encoding: "utf8", maxBuffer: 64 * 1024 * 1024 });
  const line = (r.stderr ?? "").trim().split("\n").reverse().find((l) => l.startsWith("{"));
  if (!line) throw new Error(`suite did not report: ${r.stderr?.slice(-2000)}`);
  const out = JSON.parse(line);
  if (out.code !== 0) throw new Error(`suite failed (${out.code}): ${r.stdout.slice(-2000)}`);
  return out.seconds * 1000;
}

async function main() {
  console.error(`bench/workspace-suite: generating ${FILES} files… (loadavg ${loadavg()})`);
  generate();
  const views = {};
  for (const v of VARIANTS) {
    if (v === "bind") views[v] = project;
    else if (v === "bind-journaled") {
      const base = path.join(root, v);
      const img = path.join(base, "fs.img");
      const mnt = path.join(base, "fs");
      mkdirSync(mnt, { recursive: true });
      await sh(`fallocate -l 2048M '${img}' && mkfs.ext4 -q -F '${img}' && mount -o loop '${img}' '${mnt}'`);
      toUnmount.push(mnt);
      await sh(`cp -a '${project}/.' '${mnt}/'`);
      views[v] = mnt;
    }
    else if (v === "layer") {
      layer = new WorkspaceLayer({ phaseDir: path.join(root, "phase"), project, hidden: [], readOnly: [], budgetBytes: 2 * 1024 ** 3 });
      await layer.prepare();
      await layer.mount();
      await layer.attach(null);
      views[v] = layer.paths.view;
    } else if (v === "nojournal") {
      views[v] = await overlay(v, await loopDisk(v));
    } else if (v === "dir") {
      views[v] = await overlay(v, path.join(root, v, "state"));
    } else if (v === "loop-dio") {
      views[v] = await overlay(v, await loopDisk(v, { directIo: true }));
    } else if (v === "loop-opts") {
      views[v] = await overlay(v, await loopDisk(v, { mountOpts: ",noatime,lazytime" }), ",volatile");
    } else if (v === "tmpfs") {
      const mnt = path.join(root, v, "layer");
      mkdirSync(mnt, { recursive: true });
      await sh(`mount -t tmpfs -o size=2048m,nosuid,nodev tmpfs '${mnt}'`);
      toUnmount.push(mnt);
      views[v] = await overlay(v, mnt);
    } else throw new Error(`unknown variant ${v} (known: ${ALL.join(", ")})`);
  }
  // one warm-up round, not counted: the image's files and the lower in the page cache
  for (const v of VARIANTS) {
    suiteMs(views[v]);
    rmSync(path.join(views[v], "out"), { recursive: true, force: true });
  }
  const samples = Object.fromEntries(VARIANTS.map((v) => [v, []]));
  const loads = [];
  for (let r = 0; r < ROUNDS; r++) {
    loads.push(loadavg());
    const order = VARIANTS.map((_, i) => VARIANTS[(i + r) % VARIANTS.length]);
    for (const v of order) {
      samples[v].push(suiteMs(views[v]));
      // the suite's output removed through the view: the next round starts from the same state
      rmSync(path.join(views[v], "out"), { recursive: true, force: true });
    }
    console.error(`round ${r}: ${VARIANTS.map((v) => `${v} ${Math.round(samples[v][r])}`).join("  ")}`);
  }
  const base = VARIANTS.includes("bind") ? summarize(samples.bind).p50 : NaN;
  const result = {
    benchmark: "workspace-suite",
    at: new Date().toISOString(),
    lowerFiles: FILES,
    rounds: ROUNDS,
    loadavg: { rounds: loads, end: loadavg() },
    variants: Object.fromEntries(
      VARIANTS.map((v) => [
        v,
        {
          ms: roundStats(summarize(samples[v]), 0),
          ratioP50ToBind: round(summarize(samples[v]).p50 / base, 3),
          pairedRatioToBind: VARIANTS.includes("bind") ? samples[v].map((x, i) => round(x / samples.bind[i], 2)) : [],
        },
      ]),
    ),
    samples: Object.fromEntries(VARIANTS.map((v) => [v, samples[v].map((x) => round(x, 0))])),
  };
  for (const v of VARIANTS) console.log(`${v.padEnd(10)} p50 ${result.variants[v].ms.p50} ms  ÷ bind ${result.variants[v].ratioP50ToBind}  paired ${result.variants[v].pairedRatioToBind.join(" ")}`);
  console.log(JSON.stringify(result, null, 2));
}

main()
  .then(cleanup)
  .catch(async (err) => {
    console.error("bench/workspace-suite failed:", err);
    await cleanup();
    process.exitCode = 2;
  });
