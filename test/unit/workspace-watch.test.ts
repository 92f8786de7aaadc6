/**
 * LayerWatcher on a real directory standing for a phase's upper layer:
 * write, rename, delete, whiteouts (a real character device 0/0 where the
 * kernel lets us make one), a 1,000-file burst under the rate cap, symlinks
 * not followed, close() releasing everything; and the write → event latency.
 */
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { mkdir, rename, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { coalesce, isWhiteout, LayerWatcher, type LayerEvent } from "../../src/workspace/watch.js";

let root: string;
let upper: string;
let lower: string;
let watcher: LayerWatcher | null = null;
let events: LayerEvent[] = [];
let dropped: number[] = [];
let waiters: Array<() => void> = [];

function received(ev: LayerEvent[]): void {
  events.push(...ev);
  for (const w of waiters.splice(0)) w();
}

/** resolves when pred holds over the events so far, or fails after ms */
async function until(pred: () => boolean, ms = 3000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out; events: ${JSON.stringify(events.slice(-20))}`);
    await new Promise<void>((r) => {
      waiters.push(r);
      setTimeout(r, 20);
    });
  }
}

const kinds = () => events.map((e) => `${e.kind} ${e.path}${e.isDir ? "/" : ""}`);

beforeEach(async () => {
  root = mkdtempSync(path.join(os.tmpdir(), "ws-watch-"));
  upper = path.join(root, "upper");
  lower = path.join(root, "lower");
  mkdirSync(upper);
  mkdirSync(path.join(lower, "services"), { recursive: true });
  writeFileSync(path.join(lower, "services/existing.py"), "x = 1\n");
  events = [];
  dropped = [];
  waiters = [];
});

afterEach(async () => {
  await watcher?.close();
  watcher = null;
  rmSync(root, { recursive: true, force: true });
});

async function start(opts: { maxEventsPerSecond?: number; maxPending?: number; ignoreNames?: ReadonlySet<string> } = {}): Promise<LayerWatcher> {
  watcher = await LayerWatcher.start({
    upperDir: upper,
    lowerDir: lower,
    onEvents: received,
    onDropped: (n) => dropped.push(n),
    ...opts,
  });
  return watcher;
}

describe("coalescing", () => {
  it.each([
    [undefined, "create", "create"],
    ["create", "modify", "create"],
    ["create", "delete", null],
    ["modify", "modify", "modify"],
    ["modify", "delete", "delete"],
    ["delete", "create", "modify"],
    ["delete", "delete", "delete"],
  ] as const)("%s then %s → %s", (a, b, out) => {
    expect(coalesce(a, b)).toBe(out);
  });

  it("knows a whiteout", () => {
    expect(isWhiteout({ isCharacterDevice: () => true, rdev: 0 })).toBe(true);
    expect(isWhiteout({ isCharacterDevice: () => true, rdev: 259 })).toBe(false);
    expect(isWhiteout({ isCharacterDevice: () => false, rdev: 0 })).toBe(false);
  });
});

describe("LayerWatcher on a real directory", () => {
  it("reports create, modify (copy-up of a project file), rename and delete with project-relative paths", async () => {
    await start();
    await mkdir(path.join(upper, "services"));
    await writeFile(path.join(upper, "services/new.py"), "a = 1\n");
    await until(() => kinds().includes("create services/new.py"));
    await writeFile(path.join(upper, "services/existing.py"), "x = 2\n"); // what a copy-up looks like in the upper
    await until(() => kinds().includes("modify services/existing.py"));
    expect(kinds()).toContain("create services/");

    events = [];
    await rename(path.join(upper, "services/new.py"), path.join(upper, "services/renamed.py"));
    await until(() => kinds().includes("create services/renamed.py") && kinds().includes("delete services/new.py"));

    events = [];
    await writeFile(path.join(upper, "services/renamed.py"), "a = 2\n");
    await until(() => kinds().includes("modify services/renamed.py"));
    await rm(path.join(upper, "services/renamed.py"));
    await until(() => kinds().includes("delete services/renamed.py"));
  });

  it("does not watch ignored folders (tool caches) at any depth, but a file of that name is reported", async () => {
    await start({ ignoreNames: new Set(["__pycache__", ".pytest_cache"]) });
    await mkdir(path.join(upper, "services/__pycache__"), { recursive: true });
    await writeFile(path.join(upper, "services/__pycache__/x.cpython-312.pyc"), "bytecode");
    await mkdir(path.join(upper, ".pytest_cache/v"), { recursive: true });
    await writeFile(path.join(upper, ".pytest_cache/v/lastfailed"), "{}");
    await writeFile(path.join(upper, "services/__pycache__.txt"), "a file");
    await writeFile(path.join(upper, "__pycache__"), "a file named like the cache");
    await until(() => kinds().includes("create __pycache__") && kinds().includes("create services/__pycache__.txt"));
    await new Promise((r) => setTimeout(r, 150));
    expect(kinds().filter((k) => k.includes("pytest_cache") || k.includes(".pyc") || k.includes("__pycache__/"))).toEqual([]);
  });

  it("reports a whiteout (character device 0/0) as a delete", async (ctx) => {
    await start();
    await mkdir(path.join(upper, "services"));
    await until(() => kinds().includes("create services/"));
    try {
      execFileSync("mknod", [path.join(upper, "services/existing.py"), "c", "0", "0"], { stdio: "pipe" });
    } catch {
      ctx.skip(); // no CAP_MKNOD here; the mapping itself is covered by isWhiteout above
    }
    await until(() => kinds().includes("delete services/existing.py"));
    expect(kinds()).not.toContain("create services/existing.py");
  });

  it("does not follow a symlink planted in the layer", async () => {
    const outside = path.join(root, "outside");
    mkdirSync(outside);
    await start();
    symlinkSync(outside, path.join(upper, "link"));
    await until(() => kinds().includes("create link"));
    writeFileSync(path.join(outside, "host-file"), "secret");
    await new Promise((r) => setTimeout(r, 300));
    expect(kinds().some((k) => k.includes("host-file"))).toBe(false);
    expect(Object.keys(watcher!["fsw"].getWatched()).some((d) => d.startsWith(outside))).toBe(false);
  });

  it("delivers a write's event within 100 ms (p50 over 40 writes; none stalls past 1 s)", async () => {
    await start();
    const latencies: number[] = [];
    for (let i = 0; i < 40; i++) {
      const name = `f${i}.py`;
      const t0 = performance.now();
      await writeFile(path.join(upper, name), `x = ${i}\n`);
      await until(() => events.some((e) => e.path === name));
      latencies.push(performance.now() - t0);
      await new Promise((r) => setTimeout(r, 5));
    }
    latencies.sort((a, b) => a - b);
    const p50 = latencies[Math.floor(latencies.length * 0.5)]!;
    const p95 = latencies[Math.floor(latencies.length * 0.95)]!;
    console.log(`write → event latency over 40 writes: p50 ${p50.toFixed(1)} ms, p95 ${p95.toFixed(1)} ms, max ${latencies.at(-1)!.toFixed(1)} ms`);
    // issue 10's bound is the p50; the tail belongs to the scheduler on a shared 2-core machine
    // (bench/workspace.mjs measures both quietly), so the test holds it only against a stall
    expect(p50).toBeLessThan(100);
    expect(p95).toBeLessThan(1_000);
  });

  it("a 1,000-file burst: coalesced, capped per second with a dropped count, nothing unbounded", async () => {
    await start({ maxEventsPerSecond: 200, maxPending: 500 });
    await mkdir(path.join(upper, "burst"));
    const t0 = performance.now();
    await Promise.all(Array.from({ length: 1000 }, (_, i) => writeFile(path.join(upper, "burst", `f${i}.py`), "x\n")));
    const written = performance.now() - t0;
    await until(() => events.length > 0);
    // within the first window no more than the cap is delivered
    await new Promise((r) => setTimeout(r, 500));
    const first = events.filter((e) => e.path.startsWith("burst/f")).length;
    expect(first).toBeLessThanOrEqual(200);
    expect(watcher!.stats().pending).toBeLessThanOrEqual(500);
    await until(() => dropped.length > 0, 3000);
    const count = () => {
      const seen = new Set(events.filter((e) => e.path.startsWith("burst/f")).map((e) => e.path)).size;
      return { seen, total: seen + dropped.reduce((a, b) => a + b, 0) };
    };
    // the last window's events and drop count arrive a moment after the first drop is said
    await until(() => count().total >= 1000, 5000).catch(() => undefined);
    const { seen, total } = count();
    console.log(`1,000-file burst written in ${written.toFixed(0)} ms: ${seen} events delivered, ${total - seen} counted as dropped`);
    // every file is either delivered or counted (chokidar may fold a file's add and change into one)
    expect(total).toBeGreaterThanOrEqual(1000);
    expect(seen).toBeGreaterThan(0);
  });

  it("close() releases the watchers and timers; nothing is delivered after", async () => {
    await start();
    await writeFile(path.join(upper, "a.py"), "x\n");
    await until(() => events.length > 0);
    await watcher!.close();
    expect(watcher!["fsw"].closed).toBe(true);
    const n = events.length;
    await writeFile(path.join(upper, "b.py"), "x\n");
    await new Promise((r) => setTimeout(r, 200));
    expect(events.length).toBe(n);
    await watcher!.close(); // idempotent
  });
});
