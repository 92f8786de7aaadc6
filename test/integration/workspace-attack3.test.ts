/**
 * Attacks on the workspace walls (issue #10), third round: the credential
 * walk's per-project cache (src/workspace/settings.ts) and the spare layer
 * disk (src/workspace/spare.ts), under the real daemon with real sandboxes.
 * The promise: a credential file of the project is not visible in the
 * sandbox at any depth, and each phase's layer is its own. Each attack is
 * made on the host between phase starts of one daemon (its cache warm) and
 * checked from inside the sandbox, in the exec's record of the trail too.
 */
import { execFile } from "node:child_process";
import { chown, mkdir, readFile, readdir, rename, rm, stat, utimes, writeFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { OWNER, deviceAt, makeProject, removeDir, requireEngineAndImage, startTestDaemon, until, writeScript, type TestDaemon } from "../helpers/sandbox.js";

const run = promisify(execFile);
let t: TestDaemon;
let project: string;
let starts = 0;

/** A secret only a credential file holds: seen in a command's output or its record means the wall broke. */
const SECRET = "sbx-attack3-secret";

async function startPhase(): Promise<PhaseView> {
  const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: `a3-${++starts}`, mode: "backtest" });
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
  reason?: string;
}
async function journal(): Promise<Rec[]> {
  return (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8"))
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Rec);
}
/** The trail's record of the phase's last command. */
async function lastResult(p: PhaseView): Promise<Rec> {
  const r = (await journal()).filter((x) => x.type === "exec.result" && x.phase === p.id).at(-1);
  if (!r) throw new Error(`no exec.result of ${p.id}`);
  return r;
}

/**
 * Run in the sandbox: every file of /workspace whose content holds SECRET
 * (read as the agent would, following nothing), then the listed paths'
 * existence. Prints `LEAK <path>` per such file.
 */
const SEARCH = (paths: string[]) =>
  [
    "import os",
    // put together here: the script itself (in the project) must not hold it
    `secret = ${JSON.stringify(SECRET.slice(0, 5))}.encode() + ${JSON.stringify(SECRET.slice(5))}.encode()`,
    "for d, dirs, files in os.walk(b'/workspace'):",
    "    for f in files:",
    "        p = os.path.join(d, f)",
    "        try:",
    "            if secret in open(p, 'rb').read(): print('LEAK', p)",
    "        except OSError: pass",
    `for p in ${JSON.stringify(paths)}:`,
    "    print(p, os.path.lexists('/workspace/' + p))",
  ].join("\n");

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
  await put("config/.env");
  await mkdir(path.join(project, "deploy"));
  await mkdir(path.join(project, "pkg", "sub"), { recursive: true });
  await writeFile(path.join(project, "pkg", "sub", "m.py"), "x = 1\n");
  await own();
  // a first phase: the daemon's walk of this project is cached from here on
  const p = await startPhase();
  const r = await py(p, SEARCH(["config/.env"]));
  expect(r.stdout).toBe("config/.env False\n");
  await stopPhase(p);
}, 180_000);

afterAll(async () => {
  await t?.close();
  if (project) await removeDir(project);
});

describe("the credential walk's cache: what held", () => {
  it("credential files put in cached folders with their times kept (cp -p, tar -x, mv of a tree, touch -d back, rename of a folder, within the 2 s window) are hidden at the next start", async () => {
    await settle();
    // a warm walk of the unchanged project
    const p0 = await startPhase();
    await stopPhase(p0);
    await settle();
    const old = new Date("2020-01-01T00:00:00Z");
    // cp -p of a key into a cached folder, the folder's times set back
    const keyFile = path.join(path.dirname(project), `${path.basename(project)}-server.key`);
    await writeFile(keyFile, `${SECRET}\n`);
    await run("cp", ["-p", keyFile, path.join(project, "deploy", "server.key")]);
    await rm(keyFile);
    await utimes(path.join(project, "deploy"), old, old);
    // a tree with old times moved whole into a cached folder (mv: one rename)
    const staging = path.join(path.dirname(project), `${path.basename(project)}-staging`);
    await mkdir(path.join(staging, "vault", "inner"), { recursive: true });
    await writeFile(path.join(staging, "vault", "inner", ".env.production"), `A=${SECRET}\n`);
    await run("touch", ["-d", "2019-06-01", path.join(staging, "vault", "inner"), path.join(staging, "vault")]);
    await rename(path.join(staging, "vault"), path.join(project, "pkg", "sub", "vault"));
    await utimes(path.join(project, "pkg", "sub"), old, old);
    // tar -x keeping times, into a cached folder
    await mkdir(path.join(staging, "t", "tests"), { recursive: true });
    await writeFile(path.join(staging, "t", "tests", "id_ed25519"), `${SECRET}\n`);
    await run("tar", ["-C", path.join(staging, "t"), "-cf", path.join(staging, "x.tar"), "tests"]);
    await run("tar", ["-C", project, "-xpf", path.join(staging, "x.tar")]);
    await removeDir(staging);
    // a folder holding .env renamed: the old path's finding must not stand for the new one
    await rename(path.join(project, "config"), path.join(project, "settings"));
    await own();
    await settle();
    // and one added the moment before the start (in the racy window of its folder)
    await put("services/.netrc");
    await own();
    const p = await startPhase();
    const want = ["deploy/server.key", "pkg/sub/vault/inner/.env.production", "tests/id_ed25519", "settings/.env", "services/.netrc", "config/.env"];
    const r = await py(p, SEARCH(want));
    expect(r.stdout).toBe(want.map((w) => `${w} False\n`).join(""));
    const rec = await lastResult(p);
    expect(rec.exitCode).toBe(0);
    expect(rec.stdout).toBe(r.stdout);
    expect(rec.stdout).not.toContain("LEAK");
    await stopPhase(p);
  }, 120_000);
});

describe("the credential walk: holes found, fixed", () => {
  it("a credential file in a tool cache (pkg/__pycache__/.env, tests/.pytest_cache/id_rsa, vendor/lib/.git/.env) is not visible; the walk once skipped those folders and the sandbox read it", async () => {
    await put("pkg/__pycache__/.env");
    await put("tests/.pytest_cache/id_rsa");
    await put("vendor/lib/.git/.env");
    await own();
    const p = await startPhase();
    const want = ["pkg/__pycache__/.env", "tests/.pytest_cache/id_rsa", "vendor/lib/.git/.env"];
    const r = await py(p, SEARCH(want));
    expect(r.stdout).toBe(want.map((w) => `${w} False\n`).join(""));
    expect((await lastResult(p)).stdout).toBe(r.stdout);
    await stopPhase(p);
  }, 120_000);

  it("a name that is not UTF-8 on the way to a credential file refuses the start (SBX_ERR_WORKSPACE_UNSUPPORTED, phase.failed); Node once read it as U+FFFD, missed the folder and whited out another name, and the sandbox read the file", async () => {
    const bytes = (rel: Buffer) => Buffer.concat([Buffer.from(`${project}/`), rel]);
    const folder = bytes(Buffer.from([0xff]));
    const key = bytes(Buffer.concat([Buffer.from("services/id_rsa"), Buffer.from([0xfe])]));
    // a harmless folder of such a name is no reason to refuse: it holds no credential file
    const harmless = bytes(Buffer.from([0x63, 0x61, 0x66, 0xe9]));
    await mkdir(harmless);
    await writeFile(Buffer.concat([harmless, Buffer.from("/readme.txt")]), "hi\n");
    await own();
    const ok = await startPhase();
    expect(ok.state).toBe("running");
    await stopPhase(ok);
    for (const [made, what] of [
      [folder, "\ufffd/.env"],
      [key, "services/id_rsa\ufffd"],
    ] as const) {
      if (made === folder) {
        await mkdir(folder);
        await writeFile(Buffer.concat([folder, Buffer.from("/.env")]), `A=${SECRET}\n`);
      } else await writeFile(key, `${SECRET}\n`);
      await own();
      const err = await startPhase().then(
        () => null,
        (e: Error & { code?: string }) => e,
      );
      expect(err?.code).toBe("SBX_ERR_WORKSPACE_UNSUPPORTED");
      expect(err?.message).toContain(what);
      const failed = (await journal()).filter((x) => x.type === "phase.failed").at(-1);
      expect(failed?.reason).toContain(what);
      await rm(made, { recursive: true, force: true });
    }
  }, 120_000);

  it("a folder with a file system mounted on it is hidden whole: the view shows what is under the mount, which the walk could not read (its .env was readable in the sandbox)", async () => {
    await put("vault/.env");
    await mkdir(path.join(project, "vault", "sub"));
    const empty = path.join(path.dirname(project), `${path.basename(project)}-empty`);
    await mkdir(empty, { recursive: true });
    await chown(empty, OWNER.uid, OWNER.gid);
    await own();
    await run("mount", ["--bind", empty, path.join(project, "vault")]);
    try {
      const p = await startPhase();
      const r = await py(p, SEARCH(["vault/.env", "vault"]));
      expect(r.stdout).toBe("vault/.env False\nvault False\n");
      expect((await lastResult(p)).stdout).toBe(r.stdout);
      await stopPhase(p);
    } finally {
      await run("umount", ["-l", path.join(project, "vault")]);
      await removeDir(empty);
    }
    expect((await stat(path.join(project, "vault", ".env"))).isFile()).toBe(true);
  }, 120_000);
});


describe("the spare layer disk: what held", () => {
  it("a phase on a spare sees nothing of the phase before it (files, xattrs, freed blocks), nor the spare folder, which is the daemon's alone (0700)", async () => {
    const spareDir = path.join(t.stateDir, "spare-layer");
    await until("a spare", async () => (await readdir(spareDir).catch(() => [])).length === 1 && deviceAt(path.join(spareDir, (await readdir(spareDir))[0]!, "ws", "layer")));
    expect((await stat(spareDir)).mode & 0o777).toBe(0o700);
    const a = await startPhase();
    const aDisk = await deviceAt(path.join(t.stateDir, "phases", a.id, "ws", "layer"));
    // left in the layer, never applied (a tool's cache): a file with the secret, a user xattr, 20 MB written then freed
    const w = await py(
      a,
      [
        "import os",
        "os.makedirs('/workspace/__pycache__/keep', exist_ok=True)",
        `s = ${JSON.stringify(SECRET.slice(0, 5))} + ${JSON.stringify(SECRET.slice(5))}`,
        "open('/workspace/__pycache__/keep/left.pyc', 'w').write(s)",
        "os.setxattr('/workspace/__pycache__/keep', 'user.left', s.encode())",
        "with open('/workspace/__pycache__/big', 'wb') as f: f.write((s * 1000).encode() * 1000)",
        "os.unlink('/workspace/__pycache__/big')",
        "print('ok')",
      ].join("\n"),
    );
    expect(w.stdout.trim()).toBe("ok");
    await stopPhase(a);
    // the spare made after a's start: b takes it
    const next = await until("the next spare", async () => {
      const [n] = await readdir(spareDir).catch(() => []);
      return n ? deviceAt(path.join(spareDir, n, "ws", "layer")) : null;
    });
    const b = await startPhase();
    const bDisk = await deviceAt(path.join(t.stateDir, "phases", b.id, "ws", "layer"));
    expect(bDisk).toBe(next);
    const r = await py(
      b,
      [
        SEARCH(["__pycache__/keep", "__pycache__"]),
        // no mount of the daemon's state dir in the sandbox's table
        "print(any('spare-layer' in l.split(' ')[4] for l in open('/proc/self/mountinfo')))",
      ].join("\n"),
    );
    expect(r.stdout).toBe("__pycache__/keep False\n__pycache__ False\nFalse\n");
    const rec = await lastResult(b);
    expect(rec.stdout).toBe(r.stdout);
    expect(rec.stdout).not.toContain("LEAK");
    // a's disk went with it; b's is another (the spare made after a's start)
    expect(aDisk).toBeTruthy();
    expect(await deviceAt(path.join(t.stateDir, "phases", a.id, "ws", "layer"))).toBeNull();
    await stopPhase(b);
  }, 120_000);

  it("two phases started at once: one takes the spare, the other makes its own disk; neither sees the other's writes", async () => {
    const spareDir = path.join(t.stateDir, "spare-layer");
    const spare = await until("a spare", async () => {
      const [n] = await readdir(spareDir).catch(() => []);
      return n ? deviceAt(path.join(spareDir, n, "ws", "layer")) : null;
    });
    const other = await makeProject();
    try {
      const [p, q] = await Promise.all([
        startPhase(),
        t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: other, phase: "a3-other", mode: "backtest" }).then((x) => x.phase),
      ]);
      const disks = [await deviceAt(path.join(t.stateDir, "phases", p.id, "ws", "layer")), await deviceAt(path.join(t.stateDir, "phases", q.id, "ws", "layer"))];
      expect(disks.filter((d) => d === spare)).toHaveLength(1);
      expect(disks[0]).not.toBe(disks[1]);
      await py(p, "open('/workspace/services/mine_p.txt', 'w').write('p')");
      const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${q.id}/exec`, {
        argv: ["python3", await writeScript(other, "import os\nprint(os.path.exists('/workspace/services/mine_p.txt'))")],
      });
      expect(result.stdout.trim()).toBe("False");
      await stopPhase(q);
      await stopPhase(p);
    } finally {
      await removeDir(other);
    }
  }, 120_000);
});

describe("a read-only folder holding a credential file", () => {
  it("the root's .git/id_rsa is not visible: the read-only .git was bound from the project itself, over the whiteout (and the walk skipped .git)", async () => {
    await put(".git/config", "[core]\n");
    await put(".git/id_rsa");
    await own();
    const p = await startPhase();
    const r = await py(p, SEARCH([".git/id_rsa", ".git/config"]) + "\ntry:\n    open('/workspace/.git/new', 'w')\nexcept OSError as e:\n    print(e.errno)");
    // hidden, the rest of .git there and still read-only (EROFS)
    expect(r.stdout).toBe(".git/id_rsa False\n.git/config True\n30\n");
    expect((await lastResult(p)).stdout).toBe(r.stdout);
    await stopPhase(p);
  }, 120_000);
});
