/**
 * The shim's log (the container's, through Docker's log driver) carries its
 * own events, not one line per command: each exec's start and exit are
 * `debug`, written only when the daemon logs at debug (SANDBOXD_LOG_LEVEL),
 * which sets SANDBOXD_SHIM_LOG_LEVEL=debug in the container. Every command is
 * in the audit trail either way. Real daemons, real containers.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { docker, makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";

const daemons: TestDaemon[] = [];
const cleanup: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
});

afterAll(async () => {
  for (const t of daemons) await t.close();
  for (const d of cleanup) await removeDir(d);
});

/** A phase of a daemon started with `env`, two commands run in it, then the container's log and the commands' results. */
async function twoCommands(env: NodeJS.ProcessEnv): Promise<{ log: string; results: ExecResult[]; phase: PhaseView }> {
  const t = await startTestDaemon({ env });
  daemons.push(t);
  const project = await makeProject();
  cleanup.push(project);
  const script = await writeScript(project, "print('hello from the command')");
  const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "shim-log", mode: "test" });
  const results: ExecResult[] = [];
  for (let i = 0; i < 2; i++) results.push((await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python", script] })).result);
  const log = (await docker.getContainer(phase.containerName).logs({ stdout: true, stderr: true })).toString("utf8");
  await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  return { log, results, phase };
}

describe("the shim's log", () => {
  it("at the default level: the shim's own events, no line per command", async () => {
    const { log, results } = await twoCommands({});
    expect(results.map((r) => [r.exitCode, r.stdout])).toEqual([
      [0, "hello from the command\n"],
      [0, "hello from the command\n"],
    ]);
    // the shim logged (its start, its forker), so the log was read and is the shim's
    expect(log).toContain('"msg":"forker ready"');
    expect(log).not.toContain('"msg":"exec started"');
    expect(log).not.toContain('"msg":"exec exited"');
    expect(log).not.toContain('"level":"debug"');
  });

  it("with the daemon at SANDBOXD_LOG_LEVEL=debug: each command's start and exit, as debug lines", async () => {
    const { log, results } = await twoCommands({ SANDBOXD_LOG_LEVEL: "debug" });
    expect(results.every((r) => r.exitCode === 0)).toBe(true);
    const lines = log
      .split("\n")
      .map((l) => l.slice(l.indexOf("{")))
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { level: string; msg: string; execId?: number; exitCode?: number });
    const started = lines.filter((l) => l.msg === "exec started");
    const exited = lines.filter((l) => l.msg === "exec exited");
    expect(started).toHaveLength(2);
    expect(exited).toHaveLength(2);
    expect([...started, ...exited].every((l) => l.level === "debug" && typeof l.execId === "number")).toBe(true);
    expect(exited.map((l) => l.exitCode)).toEqual([0, 0]);
    expect(lines.some((l) => l.msg === "forker ready" && l.level === "info")).toBe(true);
  });
});
