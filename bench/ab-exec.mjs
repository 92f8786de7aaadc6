/**
 * A/B of `exec true` through the API between builds of sandboxd, side by
 * side on the same machine, interleaved: each build's daemon runs from its
 * own checkout (built: `npm run build`) with its own sandbox image, state
 * dir and phase; rounds alternate which build goes first. Back to back
 * (8 rounds × 25 each) and after 50 ms of idleness (40 each).
 *
 *   node bench/ab-exec.mjs NAME=CHECKOUT NAME=CHECKOUT …
 *
 * Each build's image is `sandboxd-sandbox:ab-NAME`; build it from that
 * checkout first (`SANDBOXD_IMAGE=sandboxd-sandbox:ab-NAME node
 * scripts/build-image.mjs`), so each daemon runs its own shim. The daemons
 * run with SANDBOXD_EXTRA_ALLOW=true and no warm pool; everything they made
 * is removed at the end. Ends its stdout with a JSON document.
 */
import { spawn } from "node:child_process";
import { chownSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { roundStats, summarize } from "./lib.mjs";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const variants = process.argv.slice(2).map((a) => {
  const [name, dir] = a.split("=");
  if (!name || !dir || !/^[\w.-]+$/.test(name)) throw new Error(`expected NAME=CHECKOUT, got ${JSON.stringify(a)}`);
  return { name, dir: path.resolve(dir) };
});
if (variants.length < 2) {
  process.stderr.write("usage: node bench/ab-exec.mjs NAME=CHECKOUT NAME=CHECKOUT …\n");
  process.exit(2);
}
const B2B_ROUNDS = Number(process.env.BENCH_AB_ROUNDS ?? 8);
const B2B_EACH = 25;
const IDLE_N = Number(process.env.BENCH_AB_IDLE_N ?? 40);
const IDLE_MS = 50;

const { ApiClient } = await import(path.join(ROOT, "dist", "client", "http.js"));
const root = mkdtempSync(path.join(os.tmpdir(), "sbx-ab-"));
const project = path.join(root, "proj");
mkdirSync(project);
chownSync(project, 1000, 1000);
const ds = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
try {
  for (const v of variants) {
    const dir = path.join(root, v.name);
    mkdirSync(dir);
    const socket = path.join(dir, "s.sock");
    const child = spawn(process.execPath, [path.join(v.dir, "dist", "cli", "main.js"), "--socket", socket, "start", "--state-dir", path.join(dir, "state"), "--policy", path.join(ROOT, "policies", "default.yaml")], {
      env: { ...process.env, SANDBOXD_EXTRA_ALLOW: "true", SANDBOXD_IMAGE: `sandboxd-sandbox:ab-${v.name}`, SANDBOXD_POOL_SIZE: "0", SANDBOXD_AUDIT_KEY: path.join(dir, "key") },
      stdio: ["ignore", "ignore", "inherit"],
    });
    const exited = new Promise((r) => child.once("exit", r));
    const api = new ApiClient(socket);
    ds.push({ ...v, child, exited, api });
    for (let i = 0; ; i++) {
      if (i > 300) throw new Error(`the daemon of ${v.name} did not answer in 30 s`);
      try {
        await api.request("GET", "/v1/health");
        break;
      } catch {
        await sleep(100);
      }
    }
    const { phase } = await api.request("POST", "/v1/phases", { project, phase: `ab-${v.name}`, mode: "test" });
    ds.at(-1).phase = phase.id;
  }
  const once = async (d) => {
    const t = performance.now();
    const { result } = await d.api.request("POST", `/v1/phases/${d.phase}/exec`, { argv: ["true"] });
    if (result.exitCode !== 0) throw new Error(`${d.name}: true exited ${result.exitCode}`);
    return performance.now() - t;
  };
  for (const d of ds) for (let i = 0; i < 20; i++) await once(d);
  const res = Object.fromEntries(ds.map((d) => [d.name, { b2b: [], idle: [] }]));
  for (let r = 0; r < B2B_ROUNDS; r++) for (const d of r % 2 ? [...ds].reverse() : ds) for (let i = 0; i < B2B_EACH; i++) res[d.name].b2b.push(await once(d));
  for (let r = 0; r < IDLE_N; r++)
    for (const d of r % 2 ? [...ds].reverse() : ds) {
      await sleep(IDLE_MS);
      res[d.name].idle.push(await once(d));
    }
  const out = { description: `API exec true, builds side by side: back to back (${B2B_ROUNDS} × ${B2B_EACH}) and after ${IDLE_MS} ms idle (${IDLE_N})`, unit: "ms", builds: {} };
  for (const d of ds) {
    out.builds[d.name] = { checkout: d.dir, backToBack: roundStats(summarize(res[d.name].b2b)), afterIdle: roundStats(summarize(res[d.name].idle)) };
    console.log(`${d.name.padEnd(12)} back to back p50 ${out.builds[d.name].backToBack.p50} ms   after ${IDLE_MS} ms idle p50 ${out.builds[d.name].afterIdle.p50} ms`);
  }
  console.log(JSON.stringify(out));
} finally {
  for (const d of ds) {
    if (d.phase) await d.api.request("DELETE", `/v1/phases/${d.phase}`).catch(() => undefined);
    d.child.kill("SIGTERM");
  }
  // each daemon unmounts what it made as it stops: the state dirs go only after
  await Promise.race([Promise.all(ds.map((d) => d.exited)), sleep(60_000)]);
  rmSync(root, { recursive: true, force: true });
}
