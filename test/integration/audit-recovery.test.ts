/**
 * A full audit disk no longer needs a restart (issue 11): the daemon's state
 * dir and a project on a small real tmpfs; a command fills it, so its result
 * cannot be recorded (503 saying it may have run, naming its verdict); a
 * phase stopped meanwhile; space is freed; the journal recovers by itself,
 * records the gap with its cause and the stopped phase's end, and the chain
 * verifies.
 */
import { execFileSync } from "node:child_process";
import { chown, mkdir, readFile, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import pino from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { verifyJournal } from "../../src/audit/verify.js";
import { ApiClient } from "../../src/cli/client.js";
import { resolveSettings } from "../../src/config/settings.js";
import { startDaemon } from "../../src/daemon.js";
import type { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { OWNER, TEST_ENV, containersOf, requireEngineAndImage, tempDir } from "../helpers/sandbox.js";

let mnt = "";

beforeAll(async () => {
  await requireEngineAndImage();
});

afterAll(async () => {
  if (!mnt) return;
  for (const c of await containersOf(path.join(mnt, "state")).catch(() => [])) execFileSync("docker", ["rm", "-f", c.Id]);
  execFileSync("umount", [mnt]);
  await rm(mnt, { recursive: true, force: true });
});

describe("a full audit disk recovers without a restart", () => {
  it("fills, answers 503 'may have run' with the verdict's seq, recovers when space returns, records the gap and the deferred phase end", async () => {
    mnt = await tempDir("recover");
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", mnt]);
    const stateDir = path.join(mnt, "state");
    const project = path.join(mnt, "proj");
    await mkdir(project);
    await chown(project, OWNER.uid, OWNER.gid);
    await writeFile(
      path.join(project, "fill.py"),
      ["print('output the result record must keep ' * 500)", "n = 0", "try:", "    with open('filler', 'wb') as f:", "        while True:", "            f.write(b'0' * 65536); f.flush(); n += 1", "except OSError as e:", "    print('full after', n, e.errno)"].join("\n") + "\n",
    );
    await writeFile(path.join(project, "ok.py"), "print('ok')\n");
    await chown(path.join(project, "fill.py"), OWNER.uid, OWNER.gid);
    await chown(path.join(project, "ok.py"), OWNER.uid, OWNER.gid);
    const sockDir = await tempDir("recsock");
    const socket = path.join(sockDir, "s.sock");
    const daemon = await startDaemon(resolveSettings({ socket, stateDir }, { ...TEST_ENV, SANDBOXD_AUDIT_KEY: path.join(sockDir, "audit-signing.key") }), { log: pino({ level: "silent" }) });
    const api = new ApiClient(socket);
    try {
      const { phase: a } = await api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "a", mode: "test" });
      const { phase: b } = await api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "b", mode: "test" });
      // the command runs (its verdict is durable) and fills the disk: its result cannot be recorded
      const e = (await api.request("POST", `/v1/phases/${a.id}/exec`, { argv: ["python3", "fill.py"] }).then(
        () => null,
        (x: unknown) => x,
      )) as SandboxdError | null;
      expect(e?.code).toBe("SBX_ERR_AUDIT_FAILED");
      expect(e!.status).toBe(503);
      expect(e!.message).toMatch(/ENOSPC/);
      expect(e!.message).toMatch(/may have run/);
      const verdictSeq = (e!.details as { verdictSeq: number }).verdictSeq;
      expect(verdictSeq).toBeGreaterThan(0);
      // nothing new runs while it is full; a phase stopped meanwhile still stops
      await expect(api.request("POST", `/v1/phases/${a.id}/exec`, { argv: ["python3", "ok.py"] })).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_FAILED" });
      await api.request("DELETE", `/v1/phases/${b.id}`);
      // space returns: the daemon takes work again by itself
      // the command's file is wherever its writes land (the project, or the phase's change layer in the state dir)
      // (not through the overlay's merged view, which the daemon owns: the file itself, in its upper dir)
      const fillers = execFileSync("find", [mnt, "-name", "filler", "-type", "f", "-not", "-path", "*/view/*"], { encoding: "utf8" }).trim().split("\n").filter(Boolean);
      expect(fillers.length).toBeGreaterThan(0);
      for (const f of fillers) await rm(f);
      let result: ExecResult | null = null;
      for (let i = 0; i < 50 && !result; i++) {
        await new Promise((r) => setTimeout(r, 200));
        result = await api.request<{ result: ExecResult }>("POST", `/v1/phases/${a.id}/exec`, { argv: ["python3", "ok.py"] }).then(
          (r) => r.result,
          () => null,
        );
      }
      expect(result?.stdout).toBe("ok\n");
      const recs = (await readFile(path.join(stateDir, "audit.jsonl"), "utf8"))
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l) as Record<string, any>);
      expect(recs.find((r) => r.seq === verdictSeq)).toMatchObject({ type: "exec.verdict", phase: a.id, decision: "allow" });
      const gapAt = recs.findIndex((r) => r.type === "audit.gap");
      expect(gapAt).toBeGreaterThan(0);
      expect(recs[gapAt]).toMatchObject({ errno: "ENOSPC", afterSeq: recs[gapAt - 1]!.seq });
      expect(recs[gapAt]!.refusedAppends).toBeGreaterThan(0);
      expect(recs[gapAt + 1]).toMatchObject({ type: "phase.complete", phase: b.id, deferred: true });
      expect(recs.slice(gapAt).some((r) => r.type === "exec.result" && r.phase === a.id && r.exitCode === 0)).toBe(true);
      expect(await verifyJournal(stateDir)).toMatchObject({ ok: true });
    } finally {
      await daemon.close().catch(() => undefined);
      await rm(sockDir, { recursive: true, force: true });
    }
  }, 180_000);
});
