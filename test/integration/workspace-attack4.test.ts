/**
 * Attacks on the workspace walls (issue #10), fourth round: the credential
 * walk's cache after its records became shared between walks (copy on the
 * way to a change) and its times numbers, under the real daemon with real
 * sandboxes. The promise: a credential file of the project is not visible
 * in the sandbox at any depth, whatever the project went through between
 * and during the daemon's walks. Each attack is checked from inside the
 * sandbox (a search of /workspace for the secret) and in the command's
 * exec.result record of the trail.
 */
import { execFile } from "node:child_process";
import { chown, mkdir, mkdtemp, readFile, rename, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { OWNER, makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";
import { swapFolders } from "../helpers/swap.js";

const run = promisify(execFile);
let t: TestDaemon;
let project: string;
let starts = 0;

/** A secret only a credential file holds: seen in a command's output or its record means the wall broke. */
const SECRET = "sbx-attack4-secret";

async function startPhase(): Promise<PhaseView> {
  const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: `a4-${++starts}`, mode: "backtest" });
  return phase;
}
async function stopPhase(p: PhaseView): Promise<void> {
  await t.api.request("DELETE", `/v1/phases/${p.id}`);
}
async function py(p: PhaseView, code: string): Promise<ExecResult> {
  const argv = ["python3", await writeScript(project, code)];
  const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${p.id}/exec`, { argv });
  return result;
}

interface Rec {
  type: string;
  phase?: string;
  stdout?: string;
  exitCode?: number;
}
/** The trail's record of the phase's last command. */
async function lastResult(p: PhaseView): Promise<Rec> {
  const recs = (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8"))
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Rec);
  const r = recs.filter((x) => x.type === "exec.result" && x.phase === p.id).at(-1);
  if (!r) throw new Error(`no exec.result of ${p.id}`);
  return r;
}

/**
 * Run in the sandbox: every file of /workspace whose content holds SECRET
 * (read as the agent would), printed `LEAK <path>`, then how many folders it
 * went through (so a search that saw nothing cannot pass).
 */
const SEARCH = [
  "import os",
  // put together here: the script itself (in the project) must not hold it
  `secret = ${JSON.stringify(SECRET.slice(0, 5))}.encode() + ${JSON.stringify(SECRET.slice(5))}.encode()`,
  "n = 0",
  "for d, dirs, files in os.walk(b'/workspace'):",
  "    n += 1",
  "    for f in files:",
  "        p = os.path.join(d, f)",
  "        try:",
  "            if secret in open(p, 'rb').read(): print('LEAK', p.decode())",
  "        except OSError: pass",
  "print('folders', n)",
].join("\n");

/** Searches the phase's /workspace for the secret; asserts none found, in the output and in the trail. */
async function expectNoLeak(p: PhaseView, minFolders: number): Promise<void> {
  const r = await py(p, SEARCH);
  expect(r.exitCode).toBe(0);
  expect(r.stdout).not.toContain("LEAK");
  expect(Number(/^folders (\d+)$/m.exec(r.stdout)?.[1])).toBeGreaterThanOrEqual(minFolders);
  const rec = await lastResult(p);
  expect(rec.exitCode).toBe(0);
  expect(rec.stdout).not.toContain("LEAK");
  expect(rec.stdout).toMatch(/^folders \d+$/m);
}

async function put(rel: string, body = `TOKEN=${SECRET}\n`): Promise<void> {
  const file = path.join(project, rel);
  await mkdir(path.dirname(file), { recursive: true });
  await writeFile(file, body);
}
/** Everything the owner's, but the build log the daemon appends to (it refuses one another user could swap). */
async function own(): Promise<void> {
  await run("chown", ["-R", `${OWNER.uid}:${OWNER.gid}`, project]);
  await chown(path.join(project, "build_audit.log"), 0, 0).catch(() => undefined);
}
/** Past the walk's 2 s "racy" window: the cache vouches for folders unchanged since. */
const settle = () => new Promise((r) => setTimeout(r, 2100));

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
  project = await makeProject();
}, 120_000);

afterAll(async () => {
  await t?.close();
  if (project) await removeDir(project);
});

describe("the credential walk's cache, fourth round", () => {
  it("a folder swapped with another at its path while the walk reads it (mv a a.old; mv a.new a) does not leave the walk's cache blind to its credential files: once it did, and every later phase read them", async () => {
    // vault/ holds 150 folders with a .env each; vault2/ the same folders without
    const n = 150;
    for (let i = 0; i < n; i++) {
      await put(`vault/k${i}/.env`);
      await mkdir(path.join(project, "vault2", `k${i}`), { recursive: true });
    }
    await own();
    await settle(); // the k folders are old: the cache vouches for a record of one while its times hold
    // the daemon's first walk of this project reads every folder, while vault/ and vault2/ swap names over and over
    const stop = await swapFolders(project, "vault", "vault2");
    let p1: PhaseView;
    try {
      p1 = await startPhase();
    } finally {
      await stop(); // vault/ is the folder with the .env files again
    }
    await stopPhase(p1);
    // the next start takes unchanged folders from the cache. Read by path, a k folder read
    // during a swap had the stat of the one and the entries of the other: its record said "no
    // .env" for the folder that has one, and this phase's sandbox read dozens of them
    const p2 = await startPhase();
    try {
      await expectNoLeak(p2, n);
    } finally {
      await stopPhase(p2);
    }
  }, 180_000);

  it("held: two phases started at once on one project with a warm cache, credential files added before them deep under new and cached folders, are both blind to them", async () => {
    const p0 = await startPhase(); // the cache is this project's last walk
    await stopPhase(p0);
    await settle();
    // deep under a new folder, in a cached folder (its times set back after), in a folder moved in whole
    await put("deep/x/y/z/.env.local");
    await put("services/id_ed25519");
    const old = new Date("2020-01-01T00:00:00Z");
    await run("touch", ["-h", "-d", old.toISOString(), path.join(project, "services")]);
    await put("vault/k3/inner/server.pem");
    await own();
    const [a, b] = await Promise.all([startPhase(), startPhase()]);
    try {
      await expectNoLeak(a, 5);
      await expectNoLeak(b, 5);
    } finally {
      await Promise.all([stopPhase(a), stopPhase(b)]);
    }
  }, 180_000);

  it("held: a phase started while another on the same project stops and applies its last iteration (new folders, a file moved) is blind to the project's credential files, and so is the next", async () => {
    await put("lib/conf/.env");
    await writeFile(path.join(project, "lib", "old.py"), "X = 1\n");
    await own();
    await settle();
    const a = await startPhase();
    // the agent's last changes: a new folder three deep and a file moved beside the .env
    const w = await py(a, ["import os, shutil", "os.makedirs('/workspace/lib/x/y/z')", "open('/workspace/lib/x/y/z/m.py', 'w').write('Y = 2\\n')", "shutil.move('/workspace/lib/old.py', '/workspace/lib/conf/old.py')"].join("\n"));
    expect(w.exitCode, w.stderr).toBe(0);
    // the stop applies them to the project while the new phase's walk reads it
    const [, b] = await Promise.all([stopPhase(a), startPhase()]);
    try {
      await expectNoLeak(b, 5);
    } finally {
      await stopPhase(b);
    }
    expect(await readFile(path.join(project, "lib", "x", "y", "z", "m.py"), "utf8")).toBe("Y = 2\n");
    const c = await startPhase();
    try {
      await expectNoLeak(c, 5);
    } finally {
      await stopPhase(c);
    }
  }, 180_000);

  it("a project on a file system whose inode numbers a double cannot hold (overlayfs with xino): a folder swapped with its twin is not taken for it from the cache; once it was, and the sandbox read its .env", async () => {
    // the operator's project is an overlay: lower on this disk, upper on a tmpfs (xino puts the
    // layer in the lower's inode numbers' top bits, past 2^53), folder renames as redirects
    const base = await mkdtemp(path.join(os.tmpdir(), "sbx-a4-xino-"));
    const lower = path.join(base, "lower");
    const up = path.join(base, "up");
    const ov = path.join(base, "project");
    await mkdir(path.join(lower, "app", "b"), { recursive: true });
    await mkdir(path.join(lower, "app2", "b"), { recursive: true });
    await writeFile(path.join(lower, "app2", "b", ".env"), `TOKEN=${SECRET}\n`);
    await writeFile(path.join(lower, "app", "b", "main.py"), "X = 1\n");
    await writeFile(path.join(lower, "app2", "b", "main.py"), "X = 2\n");
    // both b folders' times set at once, as tar -xp leaves them: the same (mtime, ctime)
    await run("touch", ["-d", "2024-01-01", path.join(lower, "app", "b"), path.join(lower, "app2", "b")]);
    await run("chown", ["-R", `${OWNER.uid}:${OWNER.gid}`, lower]);
    await mkdir(up);
    await mkdir(ov);
    await run("mount", ["-t", "tmpfs", "-o", "size=8m", "tmpfs", up]);
    const saved = project;
    try {
      await mkdir(path.join(up, "u"));
      await mkdir(path.join(up, "w"));
      await chown(path.join(up, "u"), OWNER.uid, OWNER.gid);
      await run("mount", ["-t", "overlay", "overlay", "-o", `lowerdir=${lower},upperdir=${up}/u,workdir=${up}/w,xino=on,redirect_dir=on`, ov]);
      project = ov;
      try {
        await settle();
        const p1 = await startPhase(); // the daemon's walk of this project: app/b has no .env
        await stopPhase(p1);
        // app and app2 swap names: each b keeps its inode (the same number as a double) and its times
        await rename(path.join(ov, "app"), path.join(ov, "t"));
        await rename(path.join(ov, "app2"), path.join(ov, "app"));
        await rename(path.join(ov, "t"), path.join(ov, "app2"));
        const p2 = await startPhase();
        try {
          // app/b was taken from the cache as the app/b before (no .env): its .env was readable here
          await expectNoLeak(p2, 4);
        } finally {
          await stopPhase(p2);
        }
      } finally {
        project = saved;
        await run("umount", ["-l", ov]);
      }
    } finally {
      await run("umount", ["-l", up]);
      await rm(base, { recursive: true, force: true });
    }
  }, 180_000);
});
