/**
 * The package's exported client (`import { Sandboxd } from "sandboxd"`, the
 * built dist/client) against the real daemon, and what it loads: nothing of
 * the daemon's engine (zod, fastify, the policy and SQL parsers).
 */
import { readFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Sandboxd, SandboxdError, verifyAuditBundle } from "sandboxd";
import { ROOT, auditEvents, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, testAuditKey, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let d: TestDaemon;
const dirs: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
  d = await startTestDaemon();
});

afterAll(async () => {
  await d?.close();
  for (const x of dirs) await removeDir(x);
});

/** Every module dist/client/index.js reaches through static imports (type imports are gone in JS). */
async function importGraph(entry: string): Promise<{ files: Set<string>; packages: Set<string> }> {
  const files = new Set<string>();
  const packages = new Set<string>();
  const todo = [entry];
  while (todo.length) {
    const file = todo.pop()!;
    if (files.has(file)) continue;
    files.add(file);
    const src = await readFile(file, "utf8");
    for (const m of src.matchAll(/^\s*(?:import|export)\s[^;]*?from\s+"([^"]+)"|^\s*import\s+"([^"]+)"|import\("([^"]+)"\)/gm)) {
      const spec = m[1] ?? m[2] ?? m[3]!;
      if (spec.startsWith(".")) todo.push(path.resolve(path.dirname(file), spec));
      else packages.add(spec);
    }
  }
  return { files, packages };
}

describe('import { Sandboxd } from "sandboxd"', () => {
  it("loads only node built-ins", async () => {
    const { packages } = await importGraph(path.join(ROOT, "dist", "client", "index.js"));
    expect([...packages].filter((p) => !p.startsWith("node:"))).toEqual([]);
  });

  it("drives a phase: start, streamed exec, refusal with its code, approvals, audit, stop", async () => {
    const project = await makeProject();
    dirs.push(project);
    const sbx = new Sandboxd({ socket: d.socket });
    expect((await sbx.health()).ok).toBe(true);
    const phase = await sbx.startPhase({ project, phase: "7.2", mode: "test" });
    expect(phase.state).toBe("running");

    let streamed = "";
    const result = await sbx.exec(phase.id, { argv: ["pytest", "-q", "tests/test_calc.py"] }, { onStdout: (t) => (streamed += t) });
    expect(result.exitCode).toBe(0);
    expect(streamed).toMatch(/1 passed/);
    expect((await sbx.exec(phase.id, { argv: ["pytest", "-q", "tests/test_broken.py"] })).exitCode).toBe(1);

    const refused = await sbx.exec(phase.id, { argv: ["rm", "-rf", "/"] }).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(SandboxdError);
    expect((refused as SandboxdError).code).toBe("SBX_ERR_POLICY_DENIED");

    const asked = (await sbx.exec(phase.id, { argv: ["ls"] }).catch((e: unknown) => e)) as SandboxdError;
    expect(asked.code).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    const approvalId = (asked.details as { approvalId: string }).approvalId;
    expect((await sbx.approvals({ phase: phase.id })).map((a) => a.id)).toContain(approvalId);
    await sbx.deny(approvalId, "not now");
    expect((await sbx.approval(approvalId)).state).toBe("denied");

    const ac = new AbortController();
    const seen: string[] = [];
    for await (const r of sbx.followAudit({ phase: phase.id, signal: ac.signal })) {
      seen.push(r.type);
      if (r.type === "approval.deny") ac.abort();
    }
    expect(seen).toEqual(expect.arrayContaining(["phase.start", "exec.verdict", "exec.result", "approval.request", "approval.deny"]));

    expect((await sbx.stopPhase(phase.id)).state).toBe("stopped");
    expect((await sbx.verifyAudit()).ok).toBe(true);
    const missing = await new Sandboxd({ socket: d.socket + ".nope" }).health().catch((e: unknown) => e);
    expect((missing as SandboxdError).code).toBe("SBX_ERR_DAEMON_UNREACHABLE");
  });

  it("a streamed exec, read off the socket: both streams as text (a character split between writes joined), started first, a refusal coded, an abort that ends the command, a handler's own exception as it is", async () => {
    const project = await makeProject();
    dirs.push(project);
    const script = await writeScript(
      project,
      [
        "import sys, time",
        // 'é' (2 bytes) and '😀' (4 bytes) each split over two flushed writes: two frames
        "for b in (b'caf\\xc3', b'\\xa9 ', b'\\xf0\\x9f', b'\\x98\\x80\\n'):",
        "    sys.stdout.buffer.write(b); sys.stdout.flush(); time.sleep(0.05)",
        "sys.stderr.write('to stderr\\n'); sys.stderr.flush()",
        "if len(sys.argv) > 1:",
        "    print('waiting', flush=True); time.sleep(60)",
        "sys.exit(3)",
      ].join("\n"),
    );
    const sbx = new Sandboxd({ socket: d.socket });
    const phase = await sbx.startPhase({ project, phase: "7.3", mode: "test" });
    const seen: string[] = [];
    let out = "";
    let err = "";
    const result = await sbx.exec(phase.id, { argv: ["python3", script] }, {
      onStarted: () => seen.push("started"),
      onStdout: (t) => {
        seen.push("stdout");
        out += t;
      },
      onStderr: (t) => (err += t),
    });
    expect(result.exitCode).toBe(3);
    expect(out).toBe("café 😀\n");
    expect(out).not.toContain("\ufffd");
    expect(err).toBe("to stderr\n");
    expect(seen[0]).toBe("started");

    // the same as bytes: what the command wrote, in the pieces it came in, each piece the handler's to keep
    const pieces: Buffer[] = [];
    const errBytes: Buffer[] = [];
    const asBytes = await sbx.exec(phase.id, { argv: ["python3", script] }, { onStdoutBytes: (b) => pieces.push(b), onStderrBytes: (b) => errBytes.push(b) });
    expect(asBytes.exitCode).toBe(3);
    expect(Buffer.concat(pieces).equals(Buffer.from("café 😀\n", "utf8"))).toBe(true);
    expect(pieces.length).toBeGreaterThan(1);
    expect(Buffer.concat(errBytes).toString()).toBe("to stderr\n");

    // refused before the stream: the coded error, as without handlers
    const refused = (await sbx.exec(phase.id, { argv: ["rm", "-rf", "/"] }, { onStdout: () => undefined }).catch((e: unknown) => e)) as SandboxdError;
    expect(refused).toBeInstanceOf(SandboxdError);
    expect(refused.code).toBe("SBX_ERR_POLICY_DENIED");

    // the caller aborts: the exec rejects, the command is ended, and its result is recorded as killed
    const ac = new AbortController();
    const aborted = (await sbx
      .exec(phase.id, { argv: ["python3", script, "wait"] }, { signal: ac.signal, onStdout: (t) => t.includes("waiting") && ac.abort() })
      .catch((e: unknown) => e)) as SandboxdError;
    expect(aborted).toBeInstanceOf(SandboxdError);
    expect(aborted.message).toBe("the exec was aborted by its caller");
    await expect
      .poll(async () => (await auditEvents<{ type: string; argv?: string[]; signal?: string | null }>(d.stateDir)).filter((r) => r.type === "exec.result" && r.argv?.[2] === "wait").length, { timeout: 15_000 })
      .toBe(1);

    // a handler that throws: its exception, not a lost stream
    const thrown = await sbx
      .exec(phase.id, { argv: ["python3", script] }, {
        onStdout: () => {
          throw new Error("the harness's own failure");
        },
      })
      .catch((e: unknown) => e);
    expect((thrown as Error).message).toBe("the harness's own failure");
    expect(thrown).not.toBeInstanceOf(SandboxdError);
    await sbx.stopPhase(phase.id);
  }, 90_000);

  it("the audit key and a bundle export answering a nonce, checked against that key", async () => {
    const sbx = new Sandboxd({ socket: d.socket });
    const key = await sbx.auditKey();
    expect(key.keyFile).toBe(testAuditKey(d.stateDir));
    expect(key.fingerprint).toMatch(/^[0-9a-f]{64}$/);
    expect(key.publicKey).toMatch(/^-----BEGIN PUBLIC KEY-----/);
    const dir = await tempDir("ts-bundle");
    dirs.push(dir);
    const file = path.join(dir, "trail.bundle");
    const ex = await sbx.exportAudit(file, { nonce: "ts-client.1" });
    expect(ex).toMatchObject({ file, key: key.fingerprint, nonce: "ts-client.1" });
    expect(ex.records).toBe(ex.lastSeq);
    const lines = (await readFile(file, "utf8")).trimEnd().split("\n");
    expect(lines.length).toBe(ex.records + 2);
    expect(JSON.parse(lines.at(-2)!)).toMatchObject({ type: "audit.export", nonce: "ts-client.1", key: key.fingerprint });
    expect(await verifyAuditBundle(file, { pinned: [key.fingerprint], nonce: "ts-client.1" })).toMatchObject({ ok: true, pinned: true });
    expect(await verifyAuditBundle(file, { nonce: "another" })).toMatchObject({ ok: false, reason: expect.stringMatching(/answers nonce "ts-client.1", not "another"/) });
    const bad = (await sbx.exportAudit(path.join(dir, "x"), { nonce: "no spaces" }).catch((e: unknown) => e)) as SandboxdError;
    expect(bad.code).toBe("SBX_ERR_VALIDATION");
  });
});
