/**
 * Fail-fast across a daemon crash: the daemon (its own process, the real
 * CLI's `start`) is killed with SIGKILL while one phase has two failed test
 * runs on its counter and another is escalated and frozen. The restarted
 * daemon re-adopts both: the first escalates on its next failure (the third,
 * not the first), the second is still escalated, still frozen (docker
 * inspect), still 423, and a person's resume thaws it, its shim reconnects
 * and work goes on.
 */
import { afterAll, describe, expect, it } from "vitest";
import { readFile } from "node:fs/promises";
import { ApiClient } from "../../src/cli/client.js";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { cli, docker, makeProject, removeDir, requireEngineAndImage, spawnDaemon, tempDir, waitExit } from "../helpers/sandbox.js";

const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await removeDir(d);
});

describe("fail-fast across a daemon restart", () => {
  it("kill -9 and re-adoption keep the consecutive-failure counts; an escalated phase stays escalated and frozen until a person resumes it", async () => {
    await requireEngineAndImage();
    const stateDir = await tempDir("ffcrash");
    const socket = `${stateDir}/d.sock`;
    const [pa, pb] = [await makeProject(), await makeProject()];
    dirs.push(stateDir, pa, pb);
    const api = new ApiClient(socket);
    let d = await spawnDaemon(stateDir, socket);
    const ids: string[] = [];
    try {
      const exec = async (id: string, argv: string[]) => (await api.request<{ result: ExecResult }>("POST", `/v1/phases/${id}/exec`, { argv })).result;
      const view = async (id: string) => (await api.request<{ phase: PhaseView }>("GET", `/v1/phases/${id}`)).phase;
      const broken = ["pytest", "-q", "tests/test_broken.py"];
      const { phase: a } = await api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: pa, phase: "5.1", mode: "test" });
      const { phase: b } = await api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: pb, phase: "5.2", mode: "test" });
      ids.push(a.id, b.id);
      expect((await exec(a.id, broken)).failure?.count).toBe(1);
      expect((await exec(a.id, broken)).failure?.count).toBe(2);
      for (let i = 0; i < 3; i++) await exec(b.id, broken);
      expect((await view(b.id)).state).toBe("escalated");
      expect((await docker.getContainer(b.containerId!).inspect()).State.Paused).toBe(true);

      d.child.kill("SIGKILL");
      await waitExit(d.child);
      d = await spawnDaemon(stateDir, socket);

      // A: re-adopted with its count; the third failure in a row escalates
      expect((await view(a.id)).state).toBe("running");
      const r3 = await exec(a.id, broken);
      expect(r3.failure).toMatchObject({ category: "test", count: 3, limit: 3 });
      expect(r3.escalation).toMatchObject({ n: 1, category: "test" });
      const report = await readFile(r3.escalation!.report, "utf8");
      // the attempts before the crash are in the report too
      expect(report.match(/^ {2}\d\. \[[^\]]+\] pytest -q tests\/test_broken\.py → FAIL exit 1/gm)).toHaveLength(3);

      // B: still escalated and frozen, 423 for every call, in the list of open escalations
      const vb = await view(b.id);
      expect(vb.state).toBe("escalated");
      expect((await docker.getContainer(b.containerId!).inspect()).State.Paused).toBe(true);
      const refused = await exec(b.id, ["pytest", "-q"]).then(() => null, (e: unknown) => e as SandboxdError);
      expect(refused?.code).toBe("SBX_ERR_PHASE_ESCALATED");
      expect(refused?.status).toBe(423);
      const ls = await cli(["escalations", "ls"], { socket });
      expect(ls.stdout).toContain(b.id);
      // a person resumes: the container thaws, the shim reconnects, work goes on
      const resumed = await cli(["phase", "resume", b.id, "--note", "fixture fixed"], { socket });
      expect(resumed.code, resumed.stderr).toBe(0);
      expect((await docker.getContainer(b.containerId!).inspect()).State.Paused).toBe(false);
      expect((await exec(b.id, ["pytest", "-q", "tests/test_calc.py"])).exitCode).toBe(0);
      // counters reset by the resume: one more failure is 1, not 4
      expect((await exec(b.id, broken)).failure?.count).toBe(1);

      // the trail says both were re-adopted, with their state and counts
      const events = await api.stream("GET", `/v1/events?since=0&follow=0`);
      let text = "";
      for await (const c of events) text += (c as Buffer).toString("utf8");
      const readopts = text
        .split("\n")
        .filter(Boolean)
        .map((l) => JSON.parse(l) as Record<string, unknown>)
        .filter((e) => e.type === "phase.readopt");
      expect(readopts.find((e) => e.phase === a.id)).toMatchObject({ state: "running", failFast: { test: 2 } });
      expect(readopts.find((e) => e.phase === b.id)).toMatchObject({ state: "escalated", frozen: true, failFast: { test: 3 } });
    } finally {
      for (const id of ids) await api.request("DELETE", `/v1/phases/${id}`).catch(() => undefined);
      if (d.child.exitCode === null) {
        d.child.kill("SIGTERM");
        await waitExit(d.child).catch(() => undefined);
      }
    }
  }, 240_000);
});
