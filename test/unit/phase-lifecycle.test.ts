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

const types = async (): Promise<string[]> => (await h.records()).map((r) => String(r.type));

describe("phase lifecycle with a fake runtime", () => {
  it("start: starting → running, a labelled container, phase.start before anything exists and phase.ready once it runs, the shim welcomed", async () => {
    h = await harness();
    const v = await h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" });
    expect(v.state).toBe("running");
    const c = h.runtime.containers.get(v.containerId!)!;
    expect(c.labels[LABELS.phase]).toBe(v.id);
    expect(c.labels[LABELS.instance]).toBe("0123456789abcdef");
    expect(c.shim!.received.map((m) => m.type)).toEqual(expect.arrayContaining(["welcome", "listen"]));
    // a fake container has no cgroup: the trail says the resource watch is off
    expect(await types()).toEqual(["phase.start", "net.confine", "phase.ready", "resource.watch"]);
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

  it("a start whose container cannot be created ends failed, with its start and end on record, and leaves no container", async () => {
    h = await harness();
    h.runtime.faults.runPhaseContainer = new SandboxdError("SBX_ERR_DOCKER", "engine said no");
    expect(await codeOf(h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" }))).toBe("SBX_ERR_DOCKER");
    const [p] = await h.manager.list();
    expect({ state: p?.state, endReason: p?.endReason }).toEqual({ state: "failed", endReason: "the start failed: engine said no" });
    expect(await types()).toEqual(["phase.start", "phase.failed"]);
    expect(h.runtime.containers.size).toBe(0);
  });

  it("a start whose shim never connects times out, removes the container and ends failed, recorded", async () => {
    h = await harness({ shimConnectTimeoutMs: 300 });
    h.runtime.faults.noShim = true;
    expect(await codeOf(h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" }))).toBe("SBX_ERR_SHIM_TIMEOUT");
    expect((await h.manager.list()).map((p) => p.state)).toEqual(["failed"]);
    expect((await types()).filter((t) => t.startsWith("phase."))).toEqual(["phase.start", "phase.failed"]);
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

  it("stop during start: the start aborts cleanly, the container made meanwhile is removed, one record and one end", async () => {
    h = await harness();
    let open!: () => void;
    h.runtime.faults.gateRun = new Promise<void>((r) => (open = r));
    const starting = h.manager.start({ project: h.project, phase: "race", mode: "backtest" }).then(
      () => null,
      (e: unknown) => e,
    );
    let id = "";
    for (let i = 0; i < 100 && !id; i++) {
      id = (await h.manager.list())[0]?.id ?? "";
      if (!id) await new Promise((r) => setTimeout(r, 10));
    }
    expect((await h.manager.get(id)).state).toBe("starting");
    const stopped = await h.manager.stop(id);
    expect(stopped.state).toBe("stopped");
    open();
    const err = (await starting) as SandboxdError;
    expect(err).toBeInstanceOf(SandboxdError);
    expect(err.code).toBe("SBX_ERR_PHASE_NOT_RUNNING");
    expect(err.message).toMatch(/ended while it started/);
    expect(h.runtime.containers.size).toBe(0);
    const phases = await h.manager.list();
    expect(phases.map((p) => [p.id, p.state])).toEqual([[id, "stopped"]]);
    expect((await types()).filter((t) => t.startsWith("phase."))).toEqual(["phase.start", "phase.complete"]);
  });

  it("stop while the start waits for its shim: the wait ends at once, not at the connect timeout", async () => {
    h = await harness({ shimConnectTimeoutMs: 20_000 });
    h.runtime.faults.noShim = true;
    const t0 = Date.now();
    const starting = h.manager.start({ project: h.project, phase: "race", mode: "backtest" }).catch((e: unknown) => e);
    let id = "";
    for (let i = 0; i < 200; i++) {
      const p = (await h.manager.list())[0];
      if (p?.containerId) {
        id = p.id;
        break;
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    await h.manager.stop(id);
    expect(((await starting) as SandboxdError).code).toBe("SBX_ERR_PHASE_NOT_RUNNING");
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(h.runtime.containers.size).toBe(0);
    expect((await h.manager.get(id)).state).toBe("stopped");
  });

  it("a Docker error while finishing ends the phase failed, with the error, not stopping forever", async () => {
    h = await harness();
    const v = await h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" });
    h.runtime.faults.stopAndRemove = new SandboxdError("SBX_ERR_DOCKER", "Docker engine: stopping container failed: boom");
    const after = await h.manager.stop(v.id);
    expect(after.state).toBe("failed");
    expect(after.endReason).toMatch(/stopped by operator; its container could not be removed: .*boom/);
    expect((await h.manager.get(v.id)).state).toBe("failed");
    expect((await types()).filter((t) => t.startsWith("phase."))).toEqual(["phase.start", "phase.ready", "phase.failed"]);
    h.runtime.faults = {};
  });

  it("shutdown racing a stop ends the phase once (one PHASE_COMPLETE)", async () => {
    h = await harness();
    const v = await h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" });
    const [stopped] = await Promise.all([h.manager.stop(v.id), h.manager.shutdown(), h.manager.shutdown()]);
    expect(stopped.state).toBe("stopped");
    expect((await types()).filter((t) => t === "phase.complete")).toHaveLength(1);
  });

  it("a container killed from outside ends the phase failed with the cause; later execs are refused before any verdict", async () => {
    h = await harness();
    const v = await h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" });
    h.runtime.kill(v.containerId!);
    for (let i = 0; i < 200 && !(await types()).includes("phase.failed"); i++) await new Promise((r) => setTimeout(r, 10));
    const after = await h.manager.get(v.id);
    expect(after.state).toBe("failed");
    expect(after.endReason).toMatch(/its container stopped \(exited, exit code 137, killed by SIGKILL\)/);
    const before = (await types()).length;
    expect(await codeOf(h.manager.exec(v.id, { argv: ["python3", "x"] }))).toBe("SBX_ERR_PHASE_NOT_RUNNING");
    expect((await types()).length).toBe(before);
    expect(await codeOf(h.manager.stop(v.id))).toBe("SBX_ERR_PHASE_NOT_RUNNING");
    expect((await types()).filter((t) => t.startsWith("phase.") || t.startsWith("net."))).toEqual(["phase.start", "net.confine", "phase.ready", "phase.failed"]);
  });

  it("a container removed from outside says so", async () => {
    h = await harness();
    const v = await h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" });
    const shim = h.runtime.shimOf(v.containerId)!;
    h.runtime.containers.delete(v.containerId!);
    shim.destroy();
    for (let i = 0; i < 200 && (await h.manager.get(v.id)).state !== "failed"; i++) await new Promise((r) => setTimeout(r, 10));
    expect((await h.manager.get(v.id)).endReason).toBe("its container was removed from outside sandboxd");
  });

  it("a shim that drops its link while the container runs and reconnects keeps the phase running", async () => {
    h = await harness();
    const v = await h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" });
    const c = h.runtime.containers.get(v.containerId!)!;
    c.shim!.destroy();
    await new Promise((r) => setTimeout(r, 50));
    await h.runtime.reconnect(v.containerId!, path.join(h.stateDir, "phases", v.id, "run", "control.sock"), "t".repeat(64));
    await new Promise((r) => setTimeout(r, 50));
    expect((await h.manager.get(v.id)).state).toBe("running");
    expect((await h.manager.exec(v.id, { argv: ["python3", "back"] })).stdout).toBe("back\n");
  });

  it("a shim that drops its link and never comes back ends the phase failed after the connect timeout", async () => {
    h = await harness({ shimConnectTimeoutMs: 300 });
    const v = await h.manager.start({ project: h.project, phase: "1.1", mode: "backtest" });
    h.runtime.containers.get(v.containerId!)!.shim!.destroy();
    for (let i = 0; i < 200 && (await h.manager.get(v.id)).state !== "failed"; i++) await new Promise((r) => setTimeout(r, 10));
    expect((await h.manager.get(v.id)).endReason).toMatch(/did not reconnect within 300 ms/);
  });
});
