/**
 * Redaction keeps the audit trail's structure (issue 11), through a real
 * daemon and a real sandbox: with QuestDB's default login in the project's
 * .env (`postgresql://admin:quest@…`), record types, field names and output
 * such as `requests handled: 3; questdb ok` stay intact, while the password
 * as a token is scrubbed — in audit.jsonl, build_audit.log, the API answer
 * and the daemon's own log. And streaming stays live with a .env: only a
 * partial match of a secret is held back, the stream says `started` at once,
 * and a tail held back when the phase stops is flushed, scrubbed.
 */
import { spawn } from "node:child_process";
import { chown, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { createHash } from "node:crypto";
import { CLI, OWNER, ROOT, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
const logLines: string[] = [];
const cleanup: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon({ logLines });
});

afterAll(async () => {
  await t?.close();
  for (const d of cleanup) await removeDir(d);
});

describe("redaction keeps structure", () => {
  it("QUESTDB_URL=postgresql://admin:quest@…: types, keys and ordinary words intact; the password as a token scrubbed", async () => {
    const project = await makeProject();
    cleanup.push(project);
    await writeFile(path.join(project, ".env"), "QUESTDB_URL=postgresql://admin:quest@localhost:8812/qdb\n");
    await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "q.1", mode: "test" });

    // an approval request, with the password in the agent's reason
    const asked = await t.api.request("POST", `/v1/phases/${phase.id}/exec`, { argv: ["curl", "http://example.com"], reason: "retry with quest" }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(asked).toBeInstanceOf(SandboxdError);
    expect((asked as SandboxdError).code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");

    const script = await writeScript(project, ["print('requests handled: 3; questdb ok')", "print('login admin:quest@db')", "print('request quest')"].join("\n"));
    const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", script] });
    expect(result.exitCode).toBe(0);
    const want = "requests handled: 3; questdb ok\nlogin admin:[REDACTED]@db\nrequest [REDACTED]\n";
    expect(result.stdout).toBe(want);

    // the daemon's log: a line carrying outside error text passes the phase's secrets; its own words do not change
    t.daemon.log.error({ phase: phase.id, err: "upstream said: password quest rejected for request" }, "could not record a tunnel connection; refused");
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);

    const records = (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8"))
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((r) => r.phase === phase.id);
    const types = records.map((r) => r.type);
    expect(types).toEqual(expect.arrayContaining(["phase.start", "exec.verdict", "approval.request", "exec.result", "phase.complete"]));
    const verdict = records.find((r) => r.type === "exec.verdict" && (r.argv as string[])[0] === "curl")!;
    expect(Object.keys(verdict)).toContain("requestReason");
    expect(verdict.requestReason).toBe("retry with [REDACTED]");
    const res = records.find((r) => r.type === "exec.result")!;
    expect(res.stdout).toBe(want);
    const journal = records.map((r) => JSON.stringify(r)).join("\n");
    expect(journal).not.toMatch(/re\[REDACTED\]|\[REDACTED\]db|:quest@|quest rejected/);

    const build = await readFile(phase.buildLog, "utf8");
    expect(build).toContain("[APPROVAL] [REQUEST]");
    expect(build).toContain("requests handled: 3; questdb ok");
    expect(build).toContain("login admin:[REDACTED]@db");
    expect(build).toContain('reason="retry with [REDACTED]"');
    expect(build).not.toMatch(/re\[REDACTED\]|\[REDACTED\]db|:quest@|request quest/);

    const log = logLines.join("");
    expect(log).toContain('"msg":"phase started"');
    expect(log).toContain("upstream said: password [REDACTED] rejected for request");
    expect(log).not.toMatch(/re\[REDACTED\]|password quest/);
  });
});

async function projectWithEnv(): Promise<string> {
  const project = await makeProject();
  cleanup.push(project);
  await writeFile(
    path.join(project, ".env"),
    "QUESTDB_URL=postgresql://admin:quest@localhost:8812/qdb\nEXCHANGE_API_KEY=AKIAEXAMPLEKEY123456\nDB_PASSWORD=line-pw-7\n",
  );
  await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
  return project;
}

async function startPhase(project: string): Promise<PhaseView> {
  return (await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "s.1", mode: "test" })).phase;
}

describe("streaming stays live with a .env", () => {
  it("a line a second, timed from the real CLI: each line arrives whole within 200 ms of its print", async () => {
    const project = await projectWithEnv();
    const phase = await startPhase(project);
    // each line carries its print time; `quest` ends it as a token, `line` begins a secret (line-pw-7).
    // One write per line (print() makes two: the text, then "\n"; a short secret just before the
    // newline then waits for it — milliseconds — as it must, since `questX` would not be a token)
    const script = await writeScript(
      project,
      ["import sys, time", "for i in range(4):", "    sys.stdout.write(f'line {i} at {time.time():.3f} quest\\n'); sys.stdout.flush()", "    time.sleep(1)"].join("\n"),
    );
    const child = spawn(process.execPath, [CLI, "--socket", t.socket, "exec", phase.id, "--", "python3", script], { stdio: ["ignore", "pipe", "pipe"] });
    const chunks: Array<{ at: number; text: string }> = [];
    child.stdout.on("data", (c: Buffer) => chunks.push({ at: Date.now() / 1000, text: c.toString() }));
    let stderr = "";
    child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
    const code = await new Promise<number | null>((resolve) => child.on("close", resolve));
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    expect(stderr).toBe("");
    expect(code).toBe(0);
    // never split mid-line
    for (const c of chunks) expect(c.text.endsWith("\n")).toBe(true);
    const lines = chunks.flatMap((c) => c.text.trimEnd().split("\n").map((l) => ({ at: c.at, l })));
    expect(lines).toHaveLength(4);
    const delays = lines.map(({ at, l }) => {
      const m = /^line (\d) at ([\d.]+) \[REDACTED\]$/.exec(l);
      expect(m, l).not.toBeNull();
      return Math.round((at - Number(m![2])) * 1000);
    });
    console.log(`line delays from print to the CLI's stdout (ms): ${delays.join(", ")}`);
    for (const d of delays) expect(d).toBeLessThan(200);
  }, 60_000);

  it("the stream answers `started` at once, before the command's first output", async () => {
    const project = await projectWithEnv();
    const phase = await startPhase(project);
    const script = await writeScript(project, "import time\ntime.sleep(2)\nprint('done')");
    const t0 = Date.now();
    const res = await t.api.stream("POST", `/v1/phases/${phase.id}/exec?stream=1`, { argv: ["python3", script] });
    let body = "";
    let firstAt = 0;
    for await (const c of res) {
      if (!firstAt) firstAt = Date.now() - t0;
      body += (c as Buffer).toString();
    }
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const events = body.trim().split("\n").map((l) => JSON.parse(l) as { type: string; pid?: number; data?: string; rule?: { id: string } });
    // print() may write "done" and "\n" apart, and the shim may read them apart: one or two stdout events
    expect(events.map((e) => e.type).filter((ty, i, all) => ty !== "stdout" || all[i - 1] !== "stdout")).toEqual(["started", "stdout", "exit"]);
    expect(events.filter((e) => e.type === "stdout").map((e) => e.data).join("")).toBe("done\n");
    expect(events[0]!.pid).toBeGreaterThan(0);
    expect(events[0]!.rule?.id).toMatch(/^shell\./);
    expect(firstAt).toBeLessThan(1500);
  }, 60_000);

  it("when the phase stops mid-command, the tail held back (a possible secret) is flushed, scrubbed, to the stream and the record", async () => {
    const project = await projectWithEnv();
    const phase = await startPhase(project);
    // ends in the first half of the API key: held back, since the next output could complete it
    const script = await writeScript(
      project,
      ["import sys, time", "sys.stdout.write('key AKIAEXAMPLEKEY123456 progress AKIAEX'); sys.stdout.flush()", "time.sleep(60)"].join("\n"),
    );
    const res = await t.api.stream("POST", `/v1/phases/${phase.id}/exec?stream=1`, { argv: ["python3", script] });
    let body = "";
    let stopped = false;
    let stopping: Promise<unknown> = Promise.resolve(null);
    for await (const c of res) {
      body += (c as Buffer).toString();
      if (!stopped && body.includes("progress ")) {
        stopped = true;
        expect(body).not.toContain("AKIAEX\"");
        stopping = t.api.request("DELETE", `/v1/phases/${phase.id}`).then(() => null, (e: unknown) => e);
      }
    }
    const events = body.trim().split("\n").map((l) => JSON.parse(l) as { type: string; data?: string });
    const out = events.filter((e) => e.type === "stdout").map((e) => e.data).join("");
    expect(out).toBe("key [REDACTED] progress AKIAEX");
    expect(events.at(-1)!.type).toBe("error");
    expect(await stopping).toBeNull();
    const records = (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8"))
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((r) => r.phase === phase.id && r.type === "exec.error");
    expect(records).toHaveLength(1);
    expect(records[0]!.stdout).toBe("key [REDACTED] progress AKIAEX");
  }, 60_000);
});

describe("policy reloads are on record", () => {
  it("accepted and refused reloads alike record the content's SHA-256, size and rule count", async () => {
    const dir = await tempDir("reload");
    cleanup.push(dir);
    const file = path.join(dir, "policy.yaml");
    const good = await readFile(path.join(ROOT, "policies", "default.yaml"), "utf8");
    await writeFile(file, good);
    const rt = await startTestDaemon({ policy: file });
    try {
      expect(await rt.daemon.reload()).toBe(true);
      const broken = good.replace("version: 1", "version: 2");
      await writeFile(file, broken);
      expect(await rt.daemon.reload()).toBe(false);
      const recs = (await readFile(path.join(rt.stateDir, "audit.jsonl"), "utf8"))
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l) as Record<string, any>);
      const sha = (t: string) => createHash("sha256").update(t).digest("hex");
      const ok = recs.find((r) => r.type === "policy.reload")!;
      expect(ok).toMatchObject({ file, sha256: sha(good), bytes: Buffer.byteLength(good) });
      expect(ok.rules).toBeGreaterThan(10);
      const refused = recs.find((r) => r.type === "policy.reload_refused")!;
      expect(refused).toMatchObject({ file, sha256: sha(broken), rules: ok.rules });
      expect(refused.error).toMatch(/version/);
    } finally {
      await rt.close();
    }
  });
});
