/**
 * Phase start with the change layer ÷ without it (issue 10, target ≤ 1.1×),
 * on a generated 100k-file project with a `.env` and a `.git`.
 *
 * The daemon has no way to start a phase without its layer (the agent must
 * never get the project itself), so this bench times the part of a phase
 * start that differs, as src/phases/lifecycle.ts runs it, against the same
 * container start without it:
 *
 *   without   `docker run -d` of the sandbox image with the project bound
 *             at /workspace (what a phase start did before the layer),
 *             then the container's pid read from the engine's API (a
 *             phase start reads it with or without the layer: the network
 *             confinement needs it)
 *   with      the protected entries of the project's root found
 *             (protectedRootEntries), prepare(), then the container started
 *             while mount() walks the project for credential files below
 *             the root and makes the layer's disk and overlay, then
 *             attach() (the view moved in, and checked in the container's
 *             mount table once the pid, read from the engine's API as on
 *             the other side, is there: read once, as the daemon does)
 *
 * Everything else a phase start does (the shim's channel and its handshake,
 * tunnels, the package disk, the network confinement, the records) is the
 * same on both sides, so the ratio of a whole phase start is nearer 1 than
 * this one: this is its upper bound. Interleaved, the side that goes first
 * alternating. The walk for credential files keeps the daemon's cache
 * across rounds as across a project's phase starts (src/workspace/
 * settings.ts): after the first (uncounted) round it reads only the folders
 * that changed; BENCH_WS_COLD=1 clears the cache before every round (a
 * daemon's first phase on a project). The layer's disk is the daemon's
 * spare (src/workspace/spare.ts), made again after each round, untimed, as
 * the daemon makes it after a start; BENCH_WS_SPARE=0 makes it in mount(). BENCH_WS_ROUNDS (default 8), BENCH_WS_FILES (default 100000).
 * Needs root, docker and the sandbox image (SANDBOXD_IMAGE). Ends its stdout
 * with a JSON document.
 */
import { execFile } from "node:child_process";
import http from "node:http";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { performance } from "node:perf_hooks";
import { promisify } from "node:util";
import { summarize, roundStats, round } from "./lib.mjs";
import { SpareLayer, WorkspaceLayer, clearCredentialScanCache, hiddenBelowRoot, lastCredentialScan, protectedRootEntries } from "../dist/workspace/index.js";
import { loadPolicy } from "../dist/policy/index.js";

const run = promisify(execFile);
const ROUNDS = Number(process.env.BENCH_WS_ROUNDS ?? 8);
const FILES = Number(process.env.BENCH_WS_FILES ?? 100_000);
const IMAGE = process.env.SANDBOXD_IMAGE ?? "sandboxd-sandbox:latest";
const loadavg = () => readFileSync("/proc/loadavg", "utf8").trim();

const root = mkdtempSync(path.join(os.tmpdir(), "sbx-bench-wsstart-"));
const project = path.join(root, "project");
const containers = new Set();
const layers = new Set();
let spare = null;

function generate() {
  const dirs = Math.ceil(FILES / 20);
  for (let d = 0, n = 0; d < dirs && n < FILES; d++) {
    const dir = path.join(project, "pkg", `p${Math.floor(d / 50)}`, `m${d}`);
    mkdirSync(dir, { recursive: true });
    for (let f = 0; f < 20 && n < FILES; f++, n++) writeFileSync(path.join(dir, `f${f}.py`), `X_${d}_${f} = ${n}\n`);
  }
  writeFileSync(path.join(project, ".env"), "DATABASE_URL=postgresql://u:p@db/prod\n");
  mkdirSync(path.join(project, ".git", "hooks"), { recursive: true });
  writeFileSync(path.join(project, ".git", "config"), "[core]\n");
  writeFileSync(path.join(project, "main.py"), "print('main')\n");
}

async function dockerRun(src, propagation) {
  const name = `sbx-bench-wsstart-${process.pid}-${containers.size}-${Date.now()}`;
  containers.add(name);
  await run("docker", ["run", "-d", "--rm", "--name", name, "--network", "none", "-v", `${src}:/workspace:rw${propagation ? `,${propagation}` : ""}`, "--entrypoint", "sleep", IMAGE, "600"]);
  return name;
}

/** The container's init pid from the engine's API (as the daemon's runtime reads it: no CLI process). */
function containerPid(name) {
  return new Promise((resolve, reject) => {
    const req = http.get({ socketPath: process.env.DOCKER_SOCKET ?? "/var/run/docker.sock", path: `/containers/${encodeURIComponent(name)}/json` }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d) => (body += d));
      res.on("end", () => {
        try {
          resolve(JSON.parse(body).State.Pid);
        } catch (err) {
          reject(new Error(`inspecting ${name}: ${res.statusCode} ${body.slice(0, 200)}`, { cause: err }));
        }
      });
    });
    req.on("error", reject);
  });
}

async function removeContainer(name) {
  await run("docker", ["rm", "-f", name]).catch((e) => console.error("bench: docker rm:", e.message));
  containers.delete(name);
}

async function cleanup() {
  for (const c of [...containers]) await removeContainer(c);
  for (const l of layers) await l.destroy(null).catch((e) => console.error("bench: layer destroy:", e.message));
  await spare?.close().catch((e) => console.error("bench: spare close:", e.message));
  rmSync(root, { recursive: true, force: true });
}
process.on("SIGINT", () => cleanup().then(() => process.exit(130)));

async function main() {
  console.error(`bench/workspace-start: generating ${FILES} files… (loadavg ${loadavg()})`);
  generate();
  // a folder changed within 2 s of a walk is read again by the next (the kernel's coarse clock): a project just written is not the usual case
  await new Promise((r) => setTimeout(r, 2500));
  const ws = (await loadPolicy()).workspace;
  // the daemon's spare layer disk (src/workspace/spare.ts), made again after each start as the daemon does (untimed)
  spare = new SpareLayer({ dir: path.join(root, "spare-layer"), enabled: process.env.BENCH_WS_SPARE !== "0", budgetBytes: () => ws.disk.layerBytes, warn: (m, e) => console.error(`bench: ${m}: ${e.message}`) });
  spare.refill();
  await spare.settled();
  let spareTaken = 0;
  const without = [];
  const withLayer = [];
  const walk = [];
  const scans = [];
  const loads = [];
  // one of each first, not counted (the image and the tree in the page cache)
  for (let r = -1; r < ROUNDS; r++) {
    if (r >= 0) loads.push(loadavg());
    const order = r % 2 === 0 ? ["without", "with"] : ["with", "without"];
    for (const side of order) {
      if (side === "without") {
        const t = performance.now();
        const c = await dockerRun(project, null);
        // a phase start reads the pid with or without the layer (its network confinement needs it)
        await containerPid(c);
        const ms = performance.now() - t;
        if (r >= 0) without.push(ms);
        await removeContainer(c);
      } else {
        if (process.env.BENCH_WS_COLD === "1") clearCredentialScanCache();
        const t = performance.now();
        // as src/phases/workspace.ts does: the walk below the root is left to mount()
        const { hidden, readOnly } = await protectedRootEntries(project, ws, { allowMainPy: false, deep: false });
        const findHidden = async () => {
          const t0 = performance.now();
          const found = await hiddenBelowRoot(project, ws);
          tWalk = performance.now() - t0;
          scan = lastCredentialScan();
          return found;
        };
        let tWalk = NaN;
        let scan = null;
        const takeSpare = (b) => {
          const got = spare.take(b);
          if (got && r >= 0) spareTaken++;
          return got;
        };
        const layer = new WorkspaceLayer({ phaseDir: path.join(root, `phase${r + 1}`), project, hidden, findHidden, readOnly, budgetBytes: ws.disk.layerBytes, takeSpare });
        layers.add(layer);
        await layer.prepare();
        const mounted = layer.mount();
        const c = await dockerRun(layer.paths.view, "rslave");
        // read once (src/phases/lifecycle.ts): the view's move does not wait for it, only its check
        const pid = containerPid(c).catch(() => null);
        await mounted;
        await layer.attach(pid);
        const ms = performance.now() - t;
        if (r >= 0) {
          withLayer.push(ms);
          walk.push(tWalk);
          scans.push(scan);
        }
        await removeContainer(c);
        await layer.destroy(null);
        layers.delete(layer);
        spare.refill();
        await spare.settled();
      }
    }
    if (r >= 0) console.error(`round ${r}: without ${Math.round(without[r])} ms, with ${Math.round(withLayer[r])} ms (walk ${Math.round(walk[r])} ms, folders read ${scans[r]?.read}, from the cache ${scans[r]?.reused})`);
  }
  const s = (xs) => roundStats(summarize(xs), 1);
  const result = {
    benchmark: "workspace-start",
    at: new Date().toISOString(),
    files: FILES,
    rounds: ROUNDS,
    loadavg: { rounds: loads, end: loadavg() },
    withoutLayerMs: s(without),
    withLayerMs: s(withLayer),
    /** the walk for credential files below the root, inside mount(), while the container starts */
    credentialWalkMs: s(walk),
    /** rounds whose layer disk was the spare one (made ahead, as the daemon keeps it) */
    spareTaken,
    ratioP50: round(summarize(withLayer).p50 / summarize(without).p50, 3),
    pairedRatio: withLayer.map((x, i) => round(x / without[i], 2)),
    /** per round: folders the walk read, and those it took from the daemon's cache (unchanged since the last phase start) */
    credentialScan: scans,
    samples: { without: without.map((x) => round(x, 0)), with: withLayer.map((x) => round(x, 0)), walk: walk.map((x) => round(x, 0)) },
    targets: { ratioLe1_1x: summarize(withLayer).p50 / summarize(without).p50 <= 1.1 },
  };
  console.log(`container start without the layer p50 ${result.withoutLayerMs.p50} ms, with it ${result.withLayerMs.p50} ms: ${result.ratioP50}× (walk for credential files, while the container starts, p50 ${result.credentialWalkMs.p50} ms)`);
  console.log(JSON.stringify(result, null, 2));
}

main()
  .then(cleanup)
  .catch(async (err) => {
    console.error("bench/workspace-start failed:", err);
    await cleanup();
    process.exitCode = 2;
  });
