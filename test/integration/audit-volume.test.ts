/**
 * The audit trail stays bounded (issue 11), through a real daemon, a real
 * sandbox and a real PostgreSQL: a 4 MiB SQL statement is recorded capped in
 * both logs with its byte count and SHA-256 (25 of them add far less than
 * 100 MiB); a body with 200k unknown keys gets a small error; a phase that
 * passes its audit budget refuses new work with SBX_ERR_AUDIT_BUDGET and
 * the trail says why.
 */
import { readFile, readdir, stat, writeFile, chown } from "node:fs/promises";
import http from "node:http";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { startPostgres, type TestPostgres } from "../helpers/postgres.js";
import { OWNER, ROOT, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
const cleanup: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
});

afterAll(async () => {
  await t?.close();
  for (const d of cleanup) await removeDir(d);
});

async function records(phaseId: string): Promise<Array<Record<string, any>>> {
  return (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8"))
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as Record<string, any>)
    .filter((r) => r.phase === phaseId);
}

describe("SQL through the gateway", () => {
  let db: TestPostgres;
  beforeAll(async () => {
    db = await startPostgres();
  }, 120_000);
  afterAll(async () => {
    await db?.stop();
  });

  it("25 statements of 4 MiB: each recorded capped, with byte count and SHA-256, in both logs; far less than 100 MiB added", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const gw = `${db.gateway.user}:${encodeURIComponent(db.gateway.password)}@127.0.0.1:${db.port}`;
    await writeFile(path.join(project, ".env"), `DATABASE_URL_TEST=postgresql://${gw}/trading_test\n`);
    await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "vol", mode: "test" });
    const journal = path.join(t.stateDir, "audit.jsonl");
    const before = { journal: (await stat(journal)).size, build: (await stat(phase.buildLog)).size };
    const script = await writeScript(
      project,
      [
        "import os, psycopg2",
        "conn = psycopg2.connect(os.environ['DATABASE_URL_TEST'])",
        "cur = conn.cursor()",
        "for i in range(5):",
        "    cur.execute(\"SELECT length('\" + 'x' * (4 * 1024 * 1024) + \"') AS n\")",
        "    print(cur.fetchone()[0])",
        "conn.close()",
      ].join("\n"),
    );
    // five commands of five statements: each command well within the 60 s limit on a busy machine
    for (let k = 0; k < 5; k++) {
      const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", script], timeoutMs: 60_000 });
      expect(result.stderr).toBe("");
      expect(result.stdout.trim().split("\n")).toEqual(Array(5).fill(String(4 * 1024 * 1024)));
    }
    const added = { journal: (await stat(journal)).size - before.journal, build: (await stat(phase.buildLog)).size - before.build };
    console.log(`25 × 4 MiB SQL added ${added.journal} bytes to audit.jsonl and ${added.build} bytes to build_audit.log`);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    expect(added.journal).toBeLessThan(2 * 1024 * 1024);
    expect(added.build).toBeLessThan(2 * 1024 * 1024);

    const queries = (await records(phase.id)).filter((r) => r.type === "db.query" && String(r.sql).startsWith("SELECT length("));
    expect(queries).toHaveLength(25);
    for (const q of queries) {
      expect(q.capped.sql.bytes).toBeGreaterThan(4 * 1024 * 1024);
      expect(q.capped.sql.sha256).toMatch(/^[0-9a-f]{64}$/);
      expect(Buffer.byteLength(q.sql)).toBeLessThanOrEqual(16 * 1024 + 3);
    }
    const log = await readFile(phase.buildLog, "utf8");
    const capped = log.split("\n").filter((l) => /DB_QUERY \[PostgreSQL\]: SELECT length\('x+… \[\d+ more bytes not kept; \d+ bytes, sha256 [0-9a-f]{64}\]$/.test(l));
    expect(capped).toHaveLength(25);
  }, 180_000);
});

describe("long outputs keep their head and their tail", () => {
  it("a 115 kB pytest run keeps its summary line in audit.jsonl, build_audit.log and the API result", async () => {
    const project = await makeProject();
    cleanup.push(project);
    await writeFile(
      path.join(project, "tests", "test_many.py"),
      ["import pytest", "", "@pytest.mark.parametrize('i', range(1400))", "def test_many(i):", "    assert i != 1399", ""].join("\n"),
    );
    await chown(path.join(project, "tests", "test_many.py"), OWNER.uid, OWNER.gid);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "long", mode: "test" });
    const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, {
      argv: ["python3", "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_many.py", "tests/test_broken.py"],
      timeoutMs: 60_000,
    });
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    console.log(`pytest printed ${result.stdoutBytes} bytes`);
    expect(result.stdoutBytes).toBeGreaterThan(100_000);
    const summary = /=+ 2 failed, 1399 passed in [\d.]+s =+/;
    expect(result.stdout).toMatch(summary);
    expect(result.stdout).toMatch(/^=+ test session starts =+/);
    const rec = (await records(phase.id)).find((r) => r.type === "exec.result")!;
    expect(rec.stdoutOmitted).toBeGreaterThan(30_000);
    expect(Buffer.byteLength(rec.stdout)).toBeLessThan(64 * 1024 + 100);
    expect(rec.stdout).toMatch(summary);
    expect(rec.stdout).toMatch(/FAILED tests\/test_many.py::test_many\[1399\]/);
    expect(rec.stdout).toMatch(/^=+ test session starts =+/);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/ {4}~ \[\d+ bytes not kept\]\n/);
    expect(log).toMatch(new RegExp(`\\n {4}\\| ${summary.source}\\n`));
  }, 120_000);
});

describe("the API and the budget", () => {
  it("a body with 200k unknown keys gets a small error naming a few of them", async () => {
    const body: Record<string, number> = {};
    for (let i = 0; i < 200_000; i++) body[`k${i}`] = 1;
    const payload = JSON.stringify({ project: "/tmp", phase: "x", mode: "test", ...body });
    const answer = await new Promise<{ status: number; text: string }>((resolve, reject) => {
      const req = http.request({ socketPath: t.socket, method: "POST", path: "/v1/phases", headers: { "content-type": "application/json" } }, (res) => {
        let text = "";
        res.on("data", (c: Buffer) => (text += c.toString()));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, text }));
      });
      req.on("error", reject);
      req.end(payload);
    });
    expect(answer.status).toBe(400);
    expect(answer.text.length).toBeLessThan(4096);
    const err = (JSON.parse(answer.text) as { error: { code: string; message: string; details: { issueCount: number } } }).error;
    expect(err.code).toBe("SBX_ERR_VALIDATION");
    expect(err.message).toMatch(/unknown field\(s\) k0, k1, .* and 199990 more/);
  });

  it("a phase past its audit byte budget refuses new work with SBX_ERR_AUDIT_BUDGET; the trail says why", async () => {
    const base = await readFile(path.join(ROOT, "policies", "default.yaml"), "utf8");
    const dir = await tempDir("policy");
    cleanup.push(dir);
    const file = path.join(dir, "small-budget.yaml");
    expect(base).toContain("    bytes: 256MiB");
    await writeFile(file, base.replace("    bytes: 256MiB", "    bytes: 40KiB"));
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "budget", mode: "test", policy: file });
    const script = await writeScript(project, "print('z' * 8000)");
    let refused: { code?: string; message?: string } | null = null;
    let ran = 0;
    for (let i = 0; i < 50 && !refused; i++) {
      await t.api.request("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", script] }).then(
        () => (ran += 1),
        (e: { code?: string; message?: string }) => (refused = e),
      );
    }
    expect(ran).toBeGreaterThan(1);
    expect(refused).toMatchObject({ code: "SBX_ERR_AUDIT_BUDGET" });
    expect(refused!.message).toMatch(/more than 40960 bytes/);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const recs = await records(phase.id);
    const types = recs.map((r) => r.type);
    expect(types.filter((x) => x === "audit.budget_spent")).toHaveLength(1);
    expect(types).toContain("audit.budget_summary");
    expect(types.at(-1)).toBe("phase.complete");
    expect(recs.find((r) => r.type === "audit.budget_summary")!.refused).toEqual({ "exec.verdict": 1 });
  }, 120_000);
});

describe("build_audit.log stays bounded", () => {
  it("rotates at audit.buildLog.rotateBytes into the state dir (keep K); the sandbox still reads the live log", async () => {
    const base = await readFile(path.join(ROOT, "policies", "default.yaml"), "utf8");
    const dir = await tempDir("policy");
    cleanup.push(dir);
    expect(base).toContain("    rotateBytes: 16MiB");
    const policy = path.join(dir, "small-log.yaml");
    await writeFile(policy, base.replace("    rotateBytes: 16MiB", "    rotateBytes: 8KiB").replace("    keep: 3 ", "    keep: 2 "));
    const rt = await startTestDaemon({ policy });
    try {
      const project = await makeProject();
      cleanup.push(project);
      const { phase } = await rt.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "rot", mode: "test" });
      const script = await writeScript(project, "import sys\nprint('r' * 3000)\nprint(open('build_audit.log').read().splitlines()[0][:40])");
      let last: ExecResult | null = null;
      for (let i = 0; i < 12; i++) last = (await rt.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", script], reason: `run ${i}` })).result;
      // inside the sandbox, the live log (a bind mount of the same file) starts with a recent line, not the phase's start
      expect(last!.stdout).not.toContain("PHASE");
      await rt.api.request("DELETE", `/v1/phases/${phase.id}`);
      expect((await stat(phase.buildLog)).size).toBeLessThanOrEqual(8 * 1024);
      const rotatedRoot = path.join(rt.stateDir, "rotated");
      const [projectDir] = await readdir(rotatedRoot);
      expect(projectDir).toMatch(new RegExp(`^${path.basename(project)}-[0-9a-f]{8}$`));
      expect((await readdir(path.join(rotatedRoot, projectDir!))).sort()).toEqual(["build_audit.log.1", "build_audit.log.2"]);
      const older = await readFile(path.join(rotatedRoot, projectDir!, "build_audit.log.1"), "utf8");
      expect(older).toMatch(/SHELL_EXEC: python3/);
      const live = await readFile(phase.buildLog, "utf8");
      expect(live).toMatch(/PHASE_COMPLETE/);
    } finally {
      await rt.close();
    }
  }, 120_000);
});
