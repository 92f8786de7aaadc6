/**
 * A harness writes and reads a phase's files through the daemon (PUT/GET
 * /v1/phases/:id/files/<path>, `sandboxd put|cat`), under the real daemon
 * with a real sandbox: the write lands in the phase's view (never in the
 * project before a checkpoint), atomically, size-checked, Python compiled in
 * the sandbox before it lands; bad paths and links — planted on the host
 * and by the agent — are refused, and the daemon never reads or writes
 * through them.
 */
import http from "node:http";
import { lstat, mkdir, readFile, readdir, rm, symlink, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import type { CheckpointResult, FileChange } from "../../src/workspace/index.js";
import { cli, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
let project: string;
let outside: string;
let phase: PhaseView;

interface PutAnswer {
  file: { path: string; created: boolean; size: number; mode: number; sha256: string; atCheckpoint: Array<{ rule: string }> };
}

async function py(code: string): Promise<ExecResult> {
  const script = await writeScript(project, code);
  const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", script] });
  return result;
}

const url = (rel: string) => `/v1/phases/${phase.id}/files/${rel}`;

function put(rel: string, body: string | Buffer): Promise<PutAnswer> {
  return t.api.requestBytes<PutAnswer>("PUT", url(rel.split("/").map(encodeURIComponent).join("/")), Buffer.from(body));
}

/** A request exactly as given (no client normalising the path): status and body. */
function raw(method: string, urlPath: string, body?: Buffer): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { socketPath: t.socket, method, path: urlPath, headers: body ? { "content-type": "application/octet-stream", "content-length": body.length } : {} },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

const code = (r: { body: Buffer }) => (JSON.parse(r.body.toString()) as { error?: { code: string } }).error?.code;

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
  project = await makeProject();
  outside = await tempDir("outside");
  await writeFile(path.join(outside, "secret.txt"), "HOST-SECRET\n");
  await writeFile(path.join(project, ".env"), "FLAG=one\n");
  await mkdir(path.join(project, ".git"));
  await writeFile(path.join(project, ".git", "config"), "[core]\n");
  // links planted on the host, in the project: to a host file and to a host folder
  await symlink(path.join(outside, "secret.txt"), path.join(project, "hostfile.txt"));
  await symlink(outside, path.join(project, "hostdir"));
  ({ phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "2.1", mode: "backtest" }));
});

afterAll(async () => {
  await t?.close();
  if (project) await removeDir(project);
  if (outside) await rm(outside, { recursive: true, force: true });
});

describe("writing through the daemon", () => {
  it("a module and its test land in the view (not the project), as the owner, readable back and from the sandbox; the checkpoint applies them", async () => {
    const a = await put("services/risk.py", "def limit() -> int:\n    return 3\n");
    expect(a.file).toMatchObject({ path: "services/risk.py", created: true, size: 33, mode: 0o644 });
    // a folder that does not exist yet is made
    const b = await put("tests/unit/test_risk.py", "from services.risk import limit\n\n\ndef test_limit():\n    assert limit() == 3\n");
    expect(b.file.created).toBe(true);
    await expect(lstat(path.join(project, "services", "risk.py"))).rejects.toMatchObject({ code: "ENOENT" });
    const inside = await py("import os\nst = os.stat('/workspace/services/risk.py')\nprint(open('/workspace/services/risk.py').read().splitlines()[1].strip(), st.st_uid, oct(st.st_mode & 0o777))");
    expect(inside.stdout.trim()).toBe("return 3 1000 0o644");
    const back = await t.api.stream("GET", url("services/risk.py"));
    expect(back.headers["x-sandboxd-mode"]).toBe("0644");
    let text = "";
    for await (const c of back) text += (c as Buffer).toString();
    expect(text).toBe("def limit() -> int:\n    return 3\n");
    expect((await cli(["cat", phase.id, "tests/unit/test_risk.py"], { socket: t.socket })).stdout).toContain("assert limit() == 3");
    const { changes } = await t.api.request<{ changes: FileChange[] }>("GET", `/v1/phases/${phase.id}/files`);
    expect(changes.filter((c) => !c.isDir).map((c) => `${c.kind} ${c.path}`).sort()).toEqual(["create services/risk.py", "create tests/unit/test_risk.py"]);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/\[FILE\] \[PUT\] \[services\/risk\.py\] \[SUCCESS created 33 bytes sha256 [0-9a-f]{64}\]/);
    const { iteration } = await t.api.request<CheckpointResult>("POST", `/v1/phases/${phase.id}/checkpoint`, { message: "risk limit and its test" });
    expect(iteration?.state).toBe("accepted");
    expect(await readFile(path.join(project, "services", "risk.py"), "utf8")).toBe("def limit() -> int:\n    return 3\n");
  });

  it("Python that does not compile is refused with the compiler's message before it lands; the old bytes stay, no temporary file is left", async () => {
    const r = await raw("PUT", url("services/risk.py"), Buffer.from("def limit(:\n    return 4\n"));
    expect(r.status).toBe(422);
    const err = JSON.parse(r.body.toString()) as { error: { code: string; message: string } };
    expect(err.error.code).toBe("SBX_ERR_PYTHON_SYNTAX");
    expect(err.error.message).toMatch(/services\/risk\.py:1:\d+: SyntaxError/);
    expect(err.error.message).not.toContain("sbx-put");
    const inside = await py("import os\nprint(open('/workspace/services/risk.py').read().count('return 3'), sorted(os.listdir('/workspace/services')))");
    expect(inside.stdout).toContain("1 [");
    expect(inside.stdout).not.toContain("sbx-put");
    expect((await t.api.request<{ changes: FileChange[] }>("GET", `/v1/phases/${phase.id}/files`)).changes).toEqual([]);
    expect(await readFile(phase.buildLog, "utf8")).toMatch(/\[FILE\] \[PUT\] \[services\/risk\.py\] \[REFUSED SBX_ERR_PYTHON_SYNTAX/);
    // through the CLI, from standard input is the default; a file argument works too
    const src = path.join(outside, "ok.py");
    await writeFile(src, "X = 1\n");
    const c = await cli(["put", phase.id, "services/x.py", src], { socket: t.socket });
    expect(c.stderr).toBe("");
    expect(c.stdout).toBe("created services/x.py (6 bytes)\n");
    await py("import os\nos.remove('/workspace/services/x.py')");
  });

  it("a file over the policy's size limit is refused; protected paths are refused; .env is not there to read", async () => {
    await expect(put("data/big.bin", Buffer.alloc(11 * 1024 * 1024, 1))).rejects.toMatchObject({ code: "SBX_ERR_FILE_TOO_LARGE" });
    await expect(put(".env", "DATABASE_URL=postgres://prod\n")).rejects.toMatchObject({ code: "SBX_ERR_PATH_PROTECTED" });
    await expect(put(".git/config", "[core]\n\tfsmonitor = /tmp/x\n")).rejects.toMatchObject({ code: "SBX_ERR_PATH_PROTECTED" });
    await expect(put(".git/hooks/pre-commit", "#!/bin/sh\n")).rejects.toMatchObject({ code: "SBX_ERR_PATH_PROTECTED" });
    expect(await readFile(path.join(project, ".git", "config"), "utf8")).toBe("[core]\n");
    expect(await readFile(path.join(project, ".env"), "utf8")).toBe("FLAG=one\n");
    expect(code(await raw("GET", url(".env")))).toBe("SBX_ERR_FILE_NOT_FOUND");
    expect((await t.api.request<{ changes: FileChange[] }>("GET", `/v1/phases/${phase.id}/files`)).changes).toEqual([]);
  });

  it("`..`, absolute paths and NUL bytes are refused", async () => {
    for (const p of ["../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "services/../../x", "%2Fetc%2Fpasswd", "/etc/passwd", "services/a%00.py", "services//a.py", "./conftest.py"]) {
      const g = await raw("GET", `/v1/phases/${phase.id}/files/${p}`);
      expect([400, 404], `GET ${p}: ${g.body.toString()}`).toContain(g.status);
      expect(g.body.toString()).not.toContain("root:");
      const w = await raw("PUT", `/v1/phases/${phase.id}/files/${p}`, Buffer.from("x = 1\n"));
      expect([400, 404], `PUT ${p}: ${w.body.toString()}`).toContain(w.status);
    }
    expect(code(await raw("GET", url("%2e%2e/%2e%2e/etc/passwd")))).toBe("SBX_ERR_PATH_INVALID");
    expect(code(await raw("GET", url("services/a%00.py")))).toBe("SBX_ERR_PATH_INVALID");
    expect(code(await raw("GET", url("%2Fetc%2Fpasswd")))).toBe("SBX_ERR_PATH_INVALID");
    expect((await t.api.request<{ changes: FileChange[] }>("GET", `/v1/phases/${phase.id}/files`)).changes).toEqual([]);
  });

  it("links planted on the host: never read or written through", async () => {
    expect(code(await raw("GET", url("hostfile.txt")))).toBe("SBX_ERR_PATH_INVALID");
    const viaDir = await raw("GET", url("hostdir/secret.txt"));
    expect(code(viaDir)).toBe("SBX_ERR_PATH_INVALID");
    expect(viaDir.body.toString()).not.toContain("HOST-SECRET");
    await expect(put("hostdir/planted.txt", "x")).rejects.toMatchObject({ code: "SBX_ERR_PATH_INVALID" });
    await expect(lstat(path.join(outside, "planted.txt"))).rejects.toMatchObject({ code: "ENOENT" });
    // writing at the link's own path replaces the link in the view; the host file is untouched
    await put("hostfile.txt", "agent notes\n");
    expect(await readFile(path.join(outside, "secret.txt"), "utf8")).toBe("HOST-SECRET\n");
    expect((await py("import os\nprint(os.path.islink('/workspace/hostfile.txt'), open('/workspace/hostfile.txt').read().strip())")).stdout.trim()).toBe("False agent notes");
    await py("import os\nos.remove('/workspace/hostfile.txt')\nos.symlink(" + JSON.stringify(path.join(outside, "secret.txt")) + ", '/workspace/hostfile.txt')");
  });

  it("links the agent plants (to a host file, to a host folder): never read or written through", async () => {
    const r = await py(
      [
        "import os",
        `os.symlink(${JSON.stringify(path.join(outside, "secret.txt"))}, '/workspace/agentfile.txt')`,
        `os.symlink(${JSON.stringify(outside)}, '/workspace/services/agentdir')`,
      ].join("\n"),
    );
    expect(r.exitCode).toBe(0);
    const g = await raw("GET", url("agentfile.txt"));
    expect(code(g)).toBe("SBX_ERR_PATH_INVALID");
    expect(g.body.toString()).not.toContain("HOST-SECRET");
    expect(code(await raw("GET", url("services/agentdir/secret.txt")))).toBe("SBX_ERR_PATH_INVALID");
    await expect(put("services/agentdir/planted.txt", "x")).rejects.toMatchObject({ code: "SBX_ERR_PATH_INVALID" });
    await expect(put("services/agentdir/secret.txt", "overwritten")).rejects.toMatchObject({ code: "SBX_ERR_PATH_INVALID" });
    await put("agentfile.txt", "replaced the link\n");
    expect(await readFile(path.join(outside, "secret.txt"), "utf8")).toBe("HOST-SECRET\n");
    expect(await readdir(outside)).toEqual(["ok.py", "secret.txt"]);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/\[FILE\] \[PUT\] \[services\/agentdir\/planted\.txt\] \[REFUSED SBX_ERR_PATH_INVALID/);
  });

  it("diff --all: the whole phase, from the project as the phase found it, across accepted iterations and the pending one", async () => {
    await py("import os\nos.remove('/workspace/agentfile.txt')\nos.remove('/workspace/services/agentdir')");
    const checkpoint = async (message: string) => (await t.api.request<CheckpointResult>("POST", `/v1/phases/${phase.id}/checkpoint`, { message })).iteration;
    await put("services/calc.py", '"""Tiny module under test."""\n\n\ndef add(a: int, b: int) -> int:\n    return b + a  # v2\n');
    expect((await checkpoint("v2"))?.state).toBe("accepted");
    await py("import os\nos.remove('/workspace/tests/test_broken.py')");
    expect((await checkpoint("drop the broken test"))?.state).toBe("accepted");
    await put("services/calc.py", '"""Tiny module under test."""\n\n\ndef add(a: int, b: int) -> int:\n    return int(a) + int(b)  # v3\n');
    const pending = await cli(["diff", phase.id], { socket: t.socket });
    expect(pending.stdout).toContain("-    return b + a  # v2");
    expect(pending.stdout).toContain("+    return int(a) + int(b)  # v3");
    expect(pending.stdout).not.toContain("test_broken");
    const all = await cli(["diff", phase.id, "--all"], { socket: t.socket });
    expect(all.stderr).toBe("");
    expect(all.stdout).toContain("diff --git a/services/calc.py b/services/calc.py");
    expect(all.stdout).toContain("-    return a + b");
    expect(all.stdout).toContain("+    return int(a) + int(b)  # v3");
    expect(all.stdout).not.toContain("# v2");
    expect(all.stdout).toMatch(/diff --git a\/tests\/test_broken\.py b\/tests\/test_broken\.py\ndeleted file mode 100644/);
    expect(all.stdout).toMatch(/diff --git a\/services\/risk\.py b\/services\/risk\.py\nnew file mode 100644/);
    expect(all.stdout).toContain("+    assert limit() == 3");
    // a file the phase never changed is not in it, and the host file behind a link never is
    expect(all.stdout).not.toContain("conftest.py");
    expect(all.stdout).not.toContain("HOST-SECRET");
    const api = await t.api.request<{ diff: string }>("GET", `/v1/phases/${phase.id}/diff?all=1`);
    expect(api.diff).toBe(all.stdout);
  });
});
