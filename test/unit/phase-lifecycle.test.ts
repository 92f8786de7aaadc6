/**
 * The phase lifecycle against a fake ContainerRuntime and a scripted shim on
 * the real control socket: start, exec, stop, a start that fails at each
 * step, and shutdown — each checked in the record, the store and the journal.
 */
import { access } from "node:fs/promises";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import { LABELS } from "../../src/runtime/types.js";
import { harness, type Harness } from "../helpers/fake-runtime.js";

let h: Harness;
afterEach(async () => {
  await h?.close();
});

const exists = (p: string) =>
  access(p).then(
    () => true,
    () => false,
  );

async function codeOf(p: Promise<unknown>): Promise<string> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(SandboxdError);
  return (e as SandboxdError).code;
}

const types = async () => (await h.records()).map((r) => r.type);

describe("phase lifecycle with a fake runtime", () => {
  it("start: starting → running, a labelled container, PHASE_START recorded, the shim welcomed", async () => {
    h = await harness();
    const v = await h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" });
    expect(v.state).toBe("running");
    const c = h.runtime.containers.get(v.containerId!)!;
    expect(c.labels[LABELS.phase]).toBe(v.id);
    expect(c.labels[LABELS.instance]).toBe("0123456789abcdef");
    expect(c.shim!.received.map((m) => m.type)).toEqual(expect.arrayContaining(["welcome", "listen"]));
    expect(await types()).toEqual(["net.confine", "phase.start"]);
    expect((await h.manager.get(v.id)).state).toBe("running");
  });

  it("exec runs through the shim and records verdict then result", async () => {
    h = await harness();
    const v = await h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" });
    const r = await h.manager.exec(v.id, { argv: ["python3", "hello"] });
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toBe("hello\n");
    expect((await types()).slice(-2)).toEqual(["exec.verdict", "exec.result"]);
  });

  it("stop: running → stopping → stopped, one PHASE_COMPLETE, container gone; a second stop and an exec are refused", async () => {
    h = await harness();
    const v = await h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" });
    const stopped = await h.manager.stop(v.id);
    expect(stopped.state).toBe("stopped");
    expect(stopped.stoppedAt).not.toBeNull();
    expect(h.runtime.containers.size).toBe(0);
    expect(await codeOf(h.manager.stop(v.id))).toBe("SBX_ERR_PHASE_NOT_RUNNING");
    expect(await codeOf(h.manager.exec(v.id, { argv: ["python3", "x"] }))).toBe("SBX_ERR_PHASE_NOT_RUNNING");
    expect((await types()).filter((t) => t === "phase.complete")).toHaveLength(1);
    expect(await exists(path.join(h.stateDir, "phases", v.id, "container.log"))).toBe(true);
  });

  it("a start whose container cannot be created leaves nothing behind", async () => {
    h = await harness();
    h.runtime.faults.runPhaseContainer = new SandboxdError("SBX_ERR_DOCKER", "engine said no");
    expect(await codeOf(h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" }))).toBe("SBX_ERR_DOCKER");
    expect(await h.manager.list()).toEqual([]);
    expect(h.runtime.containers.size).toBe(0);
  });

  it("a start whose shim never connects times out, removes the container and leaves no record", async () => {
    h = await harness({ shimConnectTimeoutMs: 300 });
    h.runtime.faults.noShim = true;
    expect(await codeOf(h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" }))).toBe("SBX_ERR_SHIM_TIMEOUT");
    expect(await h.manager.list()).toEqual([]);
    expect(h.runtime.containers.size).toBe(0);
  });

  it("shutdown ends every phase once, each with one PHASE_COMPLETE, and refuses new work", async () => {
    h = await harness();
    const a = await h.manager.start({ project: h.project, phase: "a", mode: "backtest" });
    const b = await h.manager.start({ project: h.project, phase: "b", mode: "test" });
    await h.manager.shutdown();
    expect((await h.manager.get(a.id)).state).toBe("stopped");
    expect((await h.manager.get(b.id)).state).toBe("stopped");
    expect((await types()).filter((t) => t === "phase.complete")).toHaveLength(2);
    expect(h.runtime.containers.size).toBe(0);
    expect(await codeOf(h.manager.start({ project: h.project, phase: "c", mode: "backtest" }))).toBe("SBX_ERR_SHUTTING_DOWN");
  });
});
