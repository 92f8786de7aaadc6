/**
 * Attacks on the workspace walls (issue #10), second round, from inside a
 * real sandbox under the real daemon: hard links, overlay xattrs and
 * whiteouts, names, special modes, paths deeper than PATH_MAX, huge change
 * sets, and an apply the host refuses part-way. Each asserts what the
 * project on the host holds and what the trail says.
 */
import { execFile } from "node:child_process";
import { lstat, mkdir, readFile, readdir, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import type { CheckpointResult } from "../../src/workspace/index.js";
import { DEFAULT_POLICY, OWNER, makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";

const run = promisify(execFile);
let t: TestDaemon;
let project: string;
let phase: PhaseView;

async function exec(argv: string[]): Promise<ExecResult> {
  const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv });
  return result;
}
async function py(code: string): Promise<ExecResult> {
  return exec(["python3", await writeScript(project, code)]);
}
async function checkpoint(message: string): Promise<CheckpointResult> {
  return t.api.request<CheckpointResult>("POST", `/v1/phases/${phase.id}/checkpoint`, { message });
}
const exists = (p: string) => lstat(p).then(() => true, () => false);
let notes = 0;
/** An accepted iteration: the fail-fast count of refused iterations starts again (three in a row escalate the phase). */
async function okIteration(): Promise<void> {
  await py(`open('/workspace/note_${++notes}.txt', 'w').write('ok')`);
  expect((await checkpoint("note")).iteration?.state).toBe("accepted");
}
const buildLog = () => readFile(path.join(project, "build_audit.log"), "utf8");

interface IterationRec {
  type: string;
  n: number;
  state: string;
  changes: Array<{ kind: string; path: string }>;
  applied?: Array<{ kind: string; path: string }>;
  failures?: Array<{ rule: string; path?: string; final: boolean }>;
}
/** The trail's record of iteration n, and the size of its journal line. */
async function iterationRecord(n: number): Promise<{ rec: IterationRec; bytes: number }> {
  const lines = (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8")).split("\n").filter(Boolean);
  for (const l of lines.reverse()) {
    const r = JSON.parse(l) as IterationRec;
    if (r.type === "workspace.iteration" && r.n === n && r.state !== "pending") return { rec: r, bytes: Buffer.byteLength(l) };
  }
  throw new Error(`no record of iteration ${n}`);
}

beforeAll(async () => {
  await requireEngineAndImage();
  // the default's 2 GiB layer: one test here puts a 1.5 GiB file in it
  t = await startTestDaemon({ policy: DEFAULT_POLICY });
  project = await makeProject();
  await mkdir(path.join(project, ".git"), { recursive: true });
  await writeFile(path.join(project, ".git", "config"), "[core]\n\trepositoryformatversion = 0\n");
  await writeFile(path.join(project, ".env"), "DATABASE_URL=postgres://prod:pw@db.internal/trading\n");
  await writeFile(path.join(project, "main.py"), "print('event loop')\n");
  await run("chown", ["-R", `${OWNER.uid}:${OWNER.gid}`, project]);
  ({ phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "1.1", mode: "backtest" }));
}, 120_000);

afterAll(async () => {
  await t?.close();
  if (project) await removeDir(project);
});

describe("holes found, fixed", () => {
  it("a 250-byte file name is applied whole (the apply's temporary name once overflowed NAME_MAX after the iteration's deletes were done, and the phase was left stuck)", async () => {
    const long = `${"a".repeat(250)}.py`;
    await py(`import os\nos.unlink('/workspace/tests/test_broken.py')\nopen('/workspace/tests/${long}', 'w').write('x = 1\\n')`);
    const c = await checkpoint("long name");
    expect(c.iteration?.state).toBe("accepted");
    expect(await readFile(path.join(project, "tests", long), "utf8")).toBe("x = 1\n");
    expect(await exists(path.join(project, "tests", "test_broken.py"))).toBe(false);
    const { rec } = await iterationRecord(c.iteration!.n);
    expect(rec.state).toBe("accepted");
    expect(await buildLog()).toContain(`ITERATION_ACCEPTED: iteration ${c.iteration!.n} (long name)`);
    // the phase goes on
    expect((await py("print('alive')")).stdout.trim()).toBe("alive");
  });

  it("an apply the host refuses part-way is recorded change by change, the rest discarded, and the phase goes on", async () => {
    const calc = path.join(project, "services", "calc.py");
    const before = await readFile(calc, "utf8");
    await py("import os\nos.unlink('/workspace/tests/test_calc.py')\nopen('/workspace/services/calc.py', 'a').write('# more\\n')");
    // the host refuses the write (made immutable after the sandbox wrote its copy: the view would show the flag)
    await run("chattr", ["+i", calc]);
    try {
      const c = await checkpoint("half");
      expect(c.iteration?.state).toBe("rejected");
      expect(c.iteration?.failures).toContainEqual(expect.objectContaining({ rule: "workspace.apply", path: "services/calc.py", final: true }));
      // the delete ran before the write failed: it is in the project, and the trail says so
      expect(await exists(path.join(project, "tests", "test_calc.py"))).toBe(false);
      expect(await readFile(calc, "utf8")).toBe(before);
      const { rec } = await iterationRecord(c.iteration!.n);
      expect(rec.applied).toEqual([expect.objectContaining({ kind: "delete", path: "tests/test_calc.py" })]);
      const log = await buildLog();
      expect(log).toMatch(/\[FILE\] \[DELETE\] \[tests\/test_calc\.py\] \[SUCCESS applied before the failure\]/);
      expect(log).toMatch(/\[FILE\] \[MODIFY\] \[services\/calc\.py\] \[FAILED /);
      expect(log).toContain(`ITERATION_FAILED: iteration ${c.iteration!.n} (half) applied in part`);
      // not left pending, the view mounted again: commands run and see the project as it is
      const v = await py("import os\nprint(os.path.exists('/workspace/tests/test_calc.py'), open('/workspace/services/calc.py').read().endswith('# more\\n'))");
      expect(v.stdout.trim()).toBe("False False");
      await okIteration();
    } finally {
      await run("chattr", ["-i", calc]);
    }
  });

  it("a tree deeper than PATH_MAX is refused (workspace.path) and discarded; the checkpoint once failed with ENAMETOOLONG every time", async () => {
    const r = await py("import os\nos.chdir('/workspace')\nos.mkdir('deep')\nos.chdir('deep')\nfor i in range(40):\n    os.mkdir('d' * 200)\n    os.chdir('d' * 200)\nopen('x.py', 'w').write('x = 1\\n')\nprint(len(os.getcwd()))");
    expect(Number(r.stdout.trim())).toBeGreaterThan(8000);
    const c = await checkpoint("deep");
    expect(c.iteration?.state).toBe("rejected");
    expect(c.iteration?.failures).toContainEqual(expect.objectContaining({ rule: "workspace.path", final: true }));
    expect(await exists(path.join(project, "deep"))).toBe(false);
    const { rec } = await iterationRecord(c.iteration!.n);
    expect(rec.failures?.map((f) => f.rule)).toContain("workspace.path");
    // the discard emptied the layer, deep as it was
    expect((await py("import os\nprint(os.path.exists('/workspace/deep'))")).stdout.trim()).toBe("False");
    await okIteration();
  });

  it("a name that is not UTF-8 is refused (workspace.path); it once failed every checkpoint with ENOENT (Node read it as U+FFFD, another name)", async () => {
    await py("open(b'/workspace/services/\\xff.py', 'wb').write(b'x = 1\\n')");
    const c = await checkpoint("bytes");
    expect(c.iteration?.state).toBe("rejected");
    expect(c.iteration?.failures).toContainEqual(expect.objectContaining({ rule: "workspace.path", path: "services/\ufffd.py", final: true }));
    expect((await readdir(path.join(project, "services"))).some((n) => n.includes("\ufffd"))).toBe(false);
    expect((await iterationRecord(c.iteration!.n)).rec.failures).toContainEqual(expect.objectContaining({ rule: "workspace.path", path: "services/\ufffd.py" }));
    expect((await py("import os\nprint(os.listdir(b'/workspace/services'))")).stdout).not.toContain("xff");
    await okIteration();
  });

  it("more than 1000 changes are refused whole (workspace.change-limit) with a bounded record", async () => {
    await py("import os\nfor d in range(60):\n    os.makedirs(f'/workspace/many/d{d}')\n    for f in range(25):\n        open(f'/workspace/many/d{d}/' + 'f' * 180 + f'{f}.txt', 'w').write('x')");
    const c = await checkpoint("many");
    expect(c.iteration?.state).toBe("rejected");
    expect(c.iteration?.failures).toContainEqual(expect.objectContaining({ rule: "workspace.change-limit", final: true }));
    expect(c.iteration!.changes.length).toBeLessThanOrEqual(1000);
    expect(await exists(path.join(project, "many"))).toBe(false);
    const { rec, bytes } = await iterationRecord(c.iteration!.n);
    expect(rec.failures?.map((f) => f.rule)).toContain("workspace.change-limit");
    expect(bytes).toBeLessThan(1024 * 1024);
    await okIteration();
  });

  it("a 1.5 GiB file put to a person is hashed for the approval without the daemon holding it in memory", async () => {
    const size = 1536 * 1024 * 1024;
    await py(`import os\nfd = os.open('/workspace/big.bin', os.O_CREAT | os.O_WRONLY, 0o644)\nos.posix_fallocate(fd, 0, ${size})\nos.close(fd)`);
    // the daemon runs in this process: its resident size, sampled while it checkpoints
    const base = process.memoryUsage.rss();
    let peak = base;
    const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage.rss())), 5);
    let c: CheckpointResult;
    try {
      c = await checkpoint("big");
    } finally {
      clearInterval(sampler);
    }
    expect(c.iteration?.state).toBe("pending");
    expect(c.iteration?.failures.map((f) => f.rule)).toContain("workspace.max-file-size");
    expect(peak - base).toBeLessThan(256 * 1024 * 1024);
    await t.api.request("POST", `/v1/phases/${phase.id}/iterations/${c.iteration!.n}/reject`, {});
    expect(await exists(path.join(project, "big.bin"))).toBe(false);
    await okIteration();
  }, 300_000);

  it("a link whose `..` follows another link is refused (workspace.symlink); lexically inside, it led to the host's /etc/passwd", async () => {
    await py("import os\nos.makedirs('/workspace/a/b/c/d/e')\nos.symlink('..', '/workspace/a/b/c/d/e/L')\nos.symlink('..', '/workspace/a/b/c/L')");
    expect((await checkpoint("folder links")).iteration?.state).toBe("accepted");
    // from a/b/c/d/e, each `L/..` climbs two folders where the text climbs none: / in the sandbox, and / on the host for a project two levels deep (/tmp/sbx-proj-*)
    const r = await py("import os\nos.symlink('L/../L/../../../../etc/passwd', '/workspace/a/b/c/d/e/m')\nprint(os.path.realpath('/workspace/a/b/c/d/e/m'))");
    expect(r.stdout.trim()).toBe("/etc/passwd");
    const c = await checkpoint("escape");
    expect(c.iteration?.state).toBe("rejected");
    expect(c.iteration?.failures).toContainEqual(expect.objectContaining({ rule: "workspace.symlink", path: "a/b/c/d/e/m", final: true }));
    expect(await exists(path.join(project, "a", "b", "c", "d", "e", "m"))).toBe(false);
    expect((await iterationRecord(c.iteration!.n)).rec.failures).toContainEqual(expect.objectContaining({ rule: "workspace.symlink", path: "a/b/c/d/e/m" }));
    expect(await buildLog()).toMatch(/\[FILE\] \[CREATE\] \[a\/b\/c\/d\/e\/m\] \[REFUSED workspace\.symlink\]/);
    await okIteration();
  });

  it("a set-user-ID or set-group-ID file is refused (workspace.setuid); the project never gets the bit", async () => {
    const calc = path.join(project, "services", "calc.py");
    const mode = (await stat(calc)).mode & 0o7777;
    await py("import os\nopen('/workspace/services/run.sh', 'w').write('#!/bin/sh\\nid\\n')\nos.chmod('/workspace/services/run.sh', 0o4755)\nos.chmod('/workspace/services/calc.py', 0o2755)");
    const c = await checkpoint("setuid");
    expect(c.iteration?.state).toBe("rejected");
    expect(c.iteration?.failures.filter((f) => f.rule === "workspace.setuid").map((f) => f.path).sort()).toEqual(["services/calc.py", "services/run.sh"]);
    expect(await exists(path.join(project, "services", "run.sh"))).toBe(false);
    expect((await stat(calc)).mode & 0o7777).toBe(mode);
    expect((await iterationRecord(c.iteration!.n)).rec.failures).toContainEqual(expect.objectContaining({ rule: "workspace.setuid", path: "services/run.sh" }));
    expect(await buildLog()).toMatch(/\[FILE\] \[CREATE\] \[services\/run\.sh\] \[REFUSED /);
    await okIteration();
  });
});

describe("what held", () => {
  it("hard links: protected paths cannot be linked (EXDEV); a link of a project file reaches the project as a copy of its own", async () => {
    const r = await py(
      "import os\nfor src in ['/workspace/main.py', '/workspace/.git/config', '/workspace/build_audit.log', '/etc/passwd']:\n    try:\n        os.link(src, '/workspace/services/alias')\n        print('linked', src)\n    except OSError as e:\n        print(e.errno)\nprint(os.path.exists('/workspace/.env'))\nos.link('/workspace/services/calc.py', '/workspace/services/calc_copy.py')\nprint(os.stat('/workspace/services/calc_copy.py').st_nlink)",
    );
    expect(r.stdout.trim().split("\n")).toEqual(["18", "18", "18", "18", "False", "2"]);
    const c = await checkpoint("hard link");
    expect(c.iteration?.state).toBe("accepted");
    expect(c.iteration?.changes.map((x) => `${x.kind} ${x.path}`)).toEqual(["create services/calc_copy.py"]);
    const a = await stat(path.join(project, "services", "calc.py"));
    const b = await stat(path.join(project, "services", "calc_copy.py"));
    expect(b.nlink).toBe(1);
    expect(b.ino).not.toBe(a.ino);
    expect(await readFile(path.join(project, "services", "calc_copy.py"), "utf8")).toBe(await readFile(path.join(project, "services", "calc.py"), "utf8"));
  });

  it("a writer forked off a command and writing without pause is gone before the checkpoint reads the layer: the project gets what was judged", async () => {
    const r = await py(
      "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        for fd in (0, 1, 2): os.close(fd)\n        i = 0\n        while True:\n            i += 1\n            with open('/workspace/services/tick.txt', 'w') as f: f.write(str(i))\n    os._exit(0)\ntime.sleep(0.3)\nprint('started')",
    );
    expect(r.stdout.trim()).toBe("started");
    const c = await checkpoint("tick");
    expect(c.iteration?.state).toBe("accepted");
    // the writer truncates, then writes: the layer holds a count, or nothing when it was caught in between
    const applied = await readFile(path.join(project, "services", "tick.txt"), "utf8");
    expect(applied).toMatch(/^\d*$/);
    await new Promise((res) => setTimeout(res, 1000));
    // nothing wrote since: the layer is empty and the view shows what was applied
    const { changes } = await t.api.request<{ changes: unknown[] }>("GET", `/v1/phases/${phase.id}/files`);
    expect(changes).toEqual([]);
    expect((await py("print(open('/workspace/services/tick.txt').read())")).stdout.trim()).toBe(applied);
  });

  it("a 100 MB one-line syntax error is refused with a short message, and the daemon does not grow with it", async () => {
    await py("open('/workspace/services/huge.py', 'w').write('x = (' + 'a' * (100 * 1024 * 1024) + ' b\\n')");
    const base = process.memoryUsage.rss();
    let peak = base;
    const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage.rss())), 5);
    let c: CheckpointResult;
    try {
      c = await checkpoint("huge line");
    } finally {
      clearInterval(sampler);
    }
    // over 10 MB: a person would be asked, but a file that does not compile is refused first
    expect(c.iteration?.state).toBe("rejected");
    const f = c.iteration?.failures.find((x) => x.rule === "workspace.python-compile");
    expect(f?.path).toBe("services/huge.py");
    expect(f?.message.length).toBeLessThan(2000);
    expect(peak - base).toBeLessThan(64 * 1024 * 1024);
    expect(await exists(path.join(project, "services", "huge.py"))).toBe(false);
    await okIteration();
  }, 300_000);

  it("overlay xattrs and whiteouts cannot be planted from inside; user.overlay.* are plain attributes the walk ignores", async () => {
    const r = await py(
      [
        "import os, stat",
        "def t(f):",
        "    try:",
        "        f()",
        "        return 'ok'",
        "    except OSError as e:",
        "        return str(e.errno)",
        "print(t(lambda: os.setxattr('/workspace/services', 'trusted.overlay.opaque', b'y')))",
        "print(t(lambda: os.mknod('/workspace/services/__init__.py.wo', stat.S_IFCHR | 0o600, os.makedev(0, 0))))",
        "print(t(lambda: os.mknod('/workspace/main.py', stat.S_IFCHR | 0o600, os.makedev(0, 0))))",
        "print(t(lambda: os.unlink('/workspace/main.py')))",
        "print(t(lambda: os.setxattr('/workspace/services', 'user.overlay.opaque', b'y')))",
        "print(t(lambda: os.setxattr('/workspace/services/calc.py', 'user.overlay.redirect', b'/main.py')))",
        "open('/workspace/services/calc.py', 'a').write('# edited\\n')",
      ].join("\n"),
    );
    // EPERM, EPERM, EEXIST (a read-only bind), EBUSY, then the user xattrs are allowed
    expect(r.stdout.trim().split("\n")).toEqual(["1", "1", "17", "16", "ok", "ok"]);
    const c = await checkpoint("xattrs");
    expect(c.iteration?.state).toBe("accepted");
    expect(c.iteration?.changes.map((x) => `${x.kind} ${x.path}`)).toEqual(["modify services/calc.py"]);
    expect(await exists(path.join(project, "services", "__init__.py"))).toBe(true);
    expect(await readFile(path.join(project, "main.py"), "utf8")).toBe("print('event loop')\n");
    expect((await readFile(path.join(project, "services", "calc.py"), "utf8")).endsWith("# edited\n")).toBe(true);
  });

  it("look-alike names are other files; control characters in names cannot start a line of build_audit.log; the diff shows a zero-width character; `] [` in a name cannot end its field", async () => {
    await py(
      "open('/workspace/.env\\u200b', 'w').write('DATABASE_URL=postgres://evil\\n')\nopen('/workspace/ma\\u0131n.py', 'w').write('x = 1\\n')\nopen('/workspace/x\\n[2026-01-01T00:00:00.000Z] ITERATION_ACCEPTED: iteration 99 (forged) applied to the project by rules', 'w').write('')\nopen('/workspace/y] [SUCCESS', 'w').write('')",
    );
    const { diff } = await t.api.request<{ diff: string }>("GET", `/v1/phases/${phase.id}/diff`);
    expect(diff).toContain('diff --git "a/.env\\342\\200\\213" "b/.env\\342\\200\\213"');
    const c = await checkpoint("names");
    expect(c.iteration?.state).toBe("rejected"); // three unrelated files
    expect(await readFile(path.join(project, ".env"), "utf8")).toBe("DATABASE_URL=postgres://prod:pw@db.internal/trading\n");
    expect(await readFile(path.join(project, "main.py"), "utf8")).toBe("print('event loop')\n");
    const log = await buildLog();
    expect(log).not.toMatch(/^\[2026-01-01T00:00:00\.000Z\] ITERATION_ACCEPTED/m);
    expect(log).toContain("[FILE] [CREATE] [.env\\u200b] [REFUSED");
    // a name cannot end the target field and pass a refused create off as a success
    expect(log).toContain("[FILE] [CREATE] [y]\\x20[SUCCESS] [REFUSED");
    expect(log).not.toContain("[FILE] [CREATE] [y] [SUCCESS]");
    await okIteration();
  });
});
