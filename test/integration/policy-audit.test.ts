/**
 * The policy engine and the audit trail through a real daemon and real
 * sandboxes: secrets scrubbed by value everywhere, command strings judged part
 * by part, phase policies that can only narrow, reload, `audit verify`
 * against tampering, and failing closed when the audit disk is full.
 */
import { execFileSync } from "node:child_process";
import { chown, mkdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import {
  OWNER,
  TEST_ENV,
  ROOT,
  cli,
  containersOf,
  makeProject,
  removeDir,
  requireEngineAndImage,
  startTestDaemon,
  tempDir,
  writeScript,
  type TestDaemon,
} from "../helpers/sandbox.js";

let t: TestDaemon;
const cleanup: string[] = [];

async function startPhase(project: string, extra: Record<string, unknown> = {}): Promise<PhaseView> {
  const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "3.1", mode: "test", ...extra });
  return phase;
}

async function exec(phase: PhaseView, body: Record<string, unknown>): Promise<ExecResult> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, body)).result;
}

async function refusal(p: Promise<unknown>): Promise<SandboxdError> {
  const e = await p.then(
    () => null,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(SandboxdError);
  return e as SandboxdError;
}

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
});

afterAll(async () => {
  await t?.close();
  for (const d of cleanup) await removeDir(d);
});

describe("secrets never reach a log", () => {
  it("a .env secret a command prints is passed to it but scrubbed from every record", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const secret = "s3cr3t-Pa55w0rd-9f8e7d";
    const apiKey = "AKIAEXAMPLEKEY123456";
    await writeFile(
      path.join(project, ".env"),
      `DATABASE_URL=postgres://trader:${secret}@localhost:5432/trading\nEXCHANGE_API_KEY=${apiKey}\nLOG_LEVEL=debug\n`,
    );
    await chown(path.join(project, ".env"), OWNER.uid, OWNER.gid);
    const phase = await startPhase(project);
    // printed whole, split across writes, and in the command's own arguments
    const script = await writeScript(
      project,
      [
        "import hashlib, os, sys, time",
        "print(os.environ['DATABASE_URL'])",
        "print('sha', hashlib.sha256(os.environ['EXCHANGE_API_KEY'].encode()).hexdigest())",
        "k = os.environ['EXCHANGE_API_KEY']",
        "sys.stdout.write(k[:7]); sys.stdout.flush(); time.sleep(0.2)",
        "sys.stdout.write(k[7:] + '\\n'); sys.stdout.flush()",
        "print('key', k, file=sys.stderr)",
      ].join("\n"),
    );
    const r = await exec(phase, { argv: ["python3", script, apiKey], reason: `debug ${secret}` });
    expect(r.exitCode).toBe(0);
    // the command really had the values…
    const { createHash } = await import("node:crypto");
    expect(r.stdout).toContain(`sha ${createHash("sha256").update(apiKey).digest("hex")}`);
    // …and nothing stored or returned shows them
    const streamed = await t.api.stream("POST", `/v1/phases/${phase.id}/exec?stream=1`, { argv: ["python3", script] });
    let body = "";
    for await (const c of streamed) body += (c as Buffer).toString();
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);

    const stored = [
      JSON.stringify(r),
      body,
      await readFile(phase.buildLog, "utf8"),
      await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8"),
      await readFile(path.join(t.stateDir, "phases", phase.id, "container.log"), "utf8"),
    ];
    for (const text of stored) {
      expect(text).not.toContain(secret);
      expect(text).not.toContain(apiKey);
      expect(text).not.toContain(apiKey.slice(7));
    }
    expect(stored.join("")).toContain("[REDACTED]");
    expect(body).toMatch(/\[REDACTED\]/);
  });
});

describe("command strings", () => {
  let project: string;
  let phase: PhaseView;
  beforeAll(async () => {
    project = await makeProject();
    cleanup.push(project);
    phase = await startPhase(project);
  });

  it("runs a compound string whose every part is allowed", async () => {
    const r = await exec(phase, { command: "pytest -q -p no:cacheprovider tests/test_calc.py && black --version" });
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toMatch(/1 passed/);
    expect(r.stdout).toMatch(/black/);
    expect(r.command).toBe("pytest -q -p no:cacheprovider tests/test_calc.py && black --version");
  });

  it("refuses a string with a forbidden part, and runs none of it", async () => {
    const e = await refusal(exec(phase, { command: "pytest -q tests/ ; rm -rf /workspace/services" }));
    expect(e.code).toBe("SBX_ERR_POLICY_DENIED");
    expect((await stat(path.join(project, "services", "calc.py"))).isFile()).toBe(true);
  });

  it("refuses what the parser cannot vouch for: substitutions, expansions, redirections", async () => {
    for (const command of ["pytest $(touch /workspace/pwned)", "pytest `touch /workspace/pwned`", "pytest ${HOME}", "pytest > /workspace/pwned"]) {
      const e = await refusal(exec(phase, { command }));
      expect(["SBX_ERR_COMMAND_PARSE", "SBX_ERR_POLICY_DENIED"]).toContain(e.code);
    }
    await expect(stat(path.join(project, "pwned"))).rejects.toThrow();
  });

  it("judges `bash -c` by its inner command", async () => {
    const e = await refusal(exec(phase, { argv: ["bash", "-c", "sudo id"] }));
    expect(e.code).toBe("SBX_ERR_POLICY_DENIED");
    expect(e.message).toMatch(/sudo/);
  });
});

describe("phase policies and reload", () => {
  it("a stricter phase policy narrows what the phase may run", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const strict = path.join(ROOT, "policies", "examples", "strict.yaml");
    const phase = await startPhase(project, { policy: strict });
    expect(phase.policyFile).toBe(strict);
    const e = await refusal(exec(phase, { argv: ["pip", "install", "requests"] }));
    expect(["SBX_ERR_POLICY_DENIED", "SBX_ERR_POLICY_NEEDS_APPROVAL"]).toContain(e.code);
    // the same command is not refused that way in a phase on the daemon's policy
    const plain = await startPhase(project);
    const v = await exec(plain, { argv: ["pip", "--version"] });
    expect(v.exitCode).toBe(0);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    await t.api.request("DELETE", `/v1/phases/${plain.id}`);
  });

  it("a broken phase policy is refused with every problem listed, and leaves nothing behind", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const dir = await tempDir("policy");
    cleanup.push(dir);
    const bad = path.join(dir, "bad.yaml");
    await writeFile(bad, "version: 1\nshell:\n  unknown: maybe\n  rules:\n    - id: x\n      decision: perhaps\n");
    const before = (await containersOf(t.stateDir)).length;
    const e = await refusal(startPhase(project, { policy: bad }));
    expect(e.code).toBe("SBX_ERR_POLICY_INVALID");
    expect(e.message).toContain(bad);
    expect(e.message).toMatch(/unknown/);
    expect(e.message).toMatch(/decision/);
    expect((await containersOf(t.stateDir)).length).toBe(before);
  });

  it("reload keeps the policy in force when the new file is broken", async () => {
    const ok = await t.daemon.reload();
    expect(ok).toBe(true);
    const records = await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8");
    expect(records).toMatch(/"type":"policy.reload"/);
  });
});

describe("audit verify", () => {
  it("passes after a real session and names the record after tampering", async () => {
    const dir = await tempDir("verify");
    cleanup.push(dir);
    const good = await cli(["audit", "verify", "--state-dir", t.stateDir]);
    expect(good.code).toBe(0);
    const n = Number(/intact up to (\d+)/.exec(good.stdout)?.[1]);
    expect(n).toBeGreaterThan(10);

    // tamper with a copy: edit a middle record's field
    await mkdir(dir, { recursive: true });
    const lines = (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8")).split("\n");
    const mid = Math.floor(n / 2);
    const edited = lines.map((l, i) => (i === mid - 1 ? l.replace(/"type":"([a-z.]+)"/, '"type":"$1x"') : l));
    await writeFile(path.join(dir, "audit.jsonl"), edited.join("\n"));
    await writeFile(path.join(dir, "audit.anchor"), await readFile(path.join(t.stateDir, "audit.anchor")));
    const bad = await cli(["audit", "verify", "--state-dir", dir]);
    expect(bad.code).toBe(1);
    expect(bad.stdout).toMatch(new RegExp(`broken at seq ${mid}\\b`));

    // truncate the tail: the anchor notices
    await writeFile(path.join(dir, "audit.jsonl"), lines.slice(0, n - 2).join("\n") + "\n");
    const cut = await cli(["audit", "verify", "--state-dir", dir]);
    expect(cut.code).toBe(1);
    expect(cut.stdout).toMatch(/truncated/);

    // and through the daemon
    const live = await cli(["audit", "verify", "--json"], { socket: t.socket });
    expect(JSON.parse(live.stdout)).toMatchObject({ ok: true });
  });

  it("audit show and tail print a phase's records", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const phase = await startPhase(project);
    await exec(phase, { argv: ["pytest", "--version"] });
    const show = await cli(["audit", "show", phase.id], { socket: t.socket });
    expect(show.code).toBe(0);
    expect(show.stdout).toMatch(/phase\.start/);
    expect(show.stdout).toMatch(/exec\.verdict\s+ALLOW\s+shell\.\S+\s+pytest --version/);
    expect(show.stdout).toMatch(/exec\.result\s+exit=0/);
    const tail = await cli(["audit", "tail", "-n", "2", "--json", "--phase", phase.id], { socket: t.socket });
    const recs = tail.stdout.trim().split("\n").map((l) => JSON.parse(l) as { phase: string; type: string });
    expect(recs).toHaveLength(2);
    expect(recs.every((r) => r.phase === phase.id)).toBe(true);
    expect(recs.at(-1)?.type).toBe("exec.result");
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  });
});

describe("fail closed", () => {
  it("when the audit disk is full, nothing runs and the daemon says why", async () => {
    // A real full disk: the daemon's state dir on a small tmpfs, filled up.
    const mnt = await tempDir("fullfs");
    cleanup.push(mnt);
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", mnt]);
    const other = await startTestDaemonAt(mnt);
    try {
      const project = await makeProject();
      cleanup.push(project);
      const { phase } = await other.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "f", mode: "test" });
      execFileSync("sh", ["-c", `dd if=/dev/zero of=${mnt}/filler bs=4k 2>/dev/null || true`]);
      // The journal's last page may still hold a record or two: run until the journal fails.
      const run = async (n: number) =>
        other.api.request("POST", `/v1/phases/${phase.id}/exec`, {
          argv: ["python3", await writeScript(project, `open('/workspace/marker-${n}', 'w')`)],
        });
      let first: SandboxdError | null = null;
      for (let n = 0; n < 200 && !first; n++) first = await run(n).then(() => null, (x: SandboxdError) => x);
      expect(first).toBeInstanceOf(SandboxdError);
      expect(first!.code).toBe("SBX_ERR_AUDIT_FAILED");
      expect(first!.status).toBe(503);
      expect(first!.message).toMatch(/ENOSPC/);
      // From then on nothing runs: no marker for the next command, and the daemon stays closed.
      const e = await refusal(run(999));
      expect(e.code).toBe("SBX_ERR_AUDIT_FAILED");
      await expect(stat(path.join(project, "marker-999"))).rejects.toThrow();
      const again2 = await refusal(other.api.request("POST", "/v1/phases", { project, phase: "g", mode: "test" }));
      expect(again2.code).toBe("SBX_ERR_AUDIT_FAILED");
      await rm(path.join(mnt, "filler"));
    } finally {
      await other.close().catch(() => undefined);
      for (const c of await containersOf(mnt).catch(() => [])) {
        execFileSync("docker", ["rm", "-f", c.Id]);
      }
      execFileSync("umount", [mnt]);
    }
  });
});

async function startTestDaemonAt(stateDir: string) {
  const { resolveSettings } = await import("../../src/config/settings.js");
  const { startDaemon } = await import("../../src/daemon.js");
  const pino = (await import("pino")).default;
  const { ApiClient } = await import("../../src/cli/client.js");
  const sockDir = await tempDir("fullsock");
  const socket = path.join(sockDir, "s.sock");
  const daemon = await startDaemon(resolveSettings({ socket, stateDir }, { ...TEST_ENV, SANDBOXD_AUDIT_KEY: path.join(sockDir, "audit-signing.key") }), { log: pino({ level: "silent" }) });
  return {
    api: new ApiClient(socket),
    close: async () => {
      await daemon.close();
      await rm(sockDir, { recursive: true, force: true });
    },
  };
}
