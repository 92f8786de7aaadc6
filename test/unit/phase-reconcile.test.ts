/**
 * What a restarted daemon does with what it finds: the decision table
 * (reconcileAction) for every combination of record and container, and each
 * branch carried out against a fake runtime on a real state dir.
 */
import { mkdir, readFile, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { reconcileAction } from "../../src/phases/reconcile.js";
import { PHASE_STATES, type PhaseRecord, type PhaseState, type PhaseView } from "../../src/phases/types.js";
import { LABELS } from "../../src/runtime/types.js";
import { SandboxdError } from "../../src/errors.js";
import { harness, type Harness } from "../helpers/fake-runtime.js";

let h: Harness;
afterEach(async () => {
  await h?.close();
});

const rec = (state: PhaseState) => ({ state }) as PhaseRecord;
const running = { running: true, state: "running" };
const exited = { running: false, state: "exited" };

describe("reconcileAction", () => {
  it("decides for every record state with a running, an exited or no container", () => {
    const table: Record<PhaseState, [string, string, string]> = {
      //          running container  exited container  no container
      starting: ["end", "end", "lost"],
      running: ["readopt", "end", "lost"],
      // a frozen phase is taken back frozen, its counters and report kept; its shim reconnects at resume
      escalated: ["readopt", "end", "lost"],
      paused: ["readopt", "end", "lost"],
      stopping: ["end", "end", "lost"],
      stopped: ["remove-ended", "remove-ended", "none"],
      failed: ["remove-ended", "remove-ended", "none"],
    };
    for (const s of PHASE_STATES) {
      const got = [reconcileAction(rec(s), running).kind, reconcileAction(rec(s), exited).kind, reconcileAction(rec(s), undefined).kind];
      expect(got, s).toEqual(table[s]);
    }
    // Docker lists a frozen container as "paused", not "running"
    expect(reconcileAction(rec("escalated"), { running: false, state: "paused" }).kind).toBe("readopt");
    expect(reconcileAction(undefined, running).kind).toBe("remove-orphan");
    expect(reconcileAction(undefined, undefined).kind).toBe("none");
    expect(reconcileAction(rec("running"), exited)).toEqual({ kind: "end", why: "container had exited" });
    expect(reconcileAction(rec("stopping"), running)).toEqual({ kind: "end", why: "record says stopping" });
    // a start the daemon died in: its client never learned the phase's id, so it is not re-adopted
    expect(reconcileAction(rec("starting"), running)).toMatchObject({ kind: "end", why: expect.stringMatching(/while the phase was starting/) });
    expect(reconcileAction(rec("starting"), undefined)).toMatchObject({ kind: "lost", why: expect.stringMatching(/before its container existed/) });
  });
});

/** The daemon "dies": its phases keep their containers and records; a new manager (h.restart) reconciles. */
async function crashWithPhases(n: number): Promise<PhaseView[]> {
  const views: PhaseView[] = [];
  for (let i = 0; i < n; i++) views.push(await h.manager.start({ project: h.project, phase: `p${i}`, mode: "backtest" }));
  return views;
}

/** Reconnects a phase's fake shim once the new daemon listens on its control socket (a new inode). */
async function reconnectWhenListening(v: PhaseView): Promise<void> {
  const sock = path.join(h.stateDir, "phases", v.id, "run", "control.sock");
  const before = (await stat(sock)).ino;
  for (let i = 0; i < 200; i++) {
    const now = await stat(sock).then((s) => s.ino, () => before);
    if (now !== before) {
      await h.runtime.reconnect(v.containerId!, sock, "t".repeat(64));
      return;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error("the restarted daemon never listened");
}

describe("reconcile after a restart", () => {
  it("readopt: a running phase whose shim reconnects stays running, recorded as re-adopted, and runs commands", async () => {
    h = await harness();
    const [v] = await crashWithPhases(1);
    const m = await h.restart();
    const [report] = await Promise.all([m.reconcile(), reconnectWhenListening(v!)]);
    expect(report).toEqual({ readopted: [v!.id], reaped: [], lost: [] });
    expect((await m.get(v!.id)).state).toBe("running");
    expect((await m.exec(v!.id, { argv: ["python3", "again"] })).stdout).toBe("again\n");
    expect((await h.records()).some((r) => r.type === "phase.readopt" && r.phase === v!.id)).toBe(true);
  });

  it("readopt frozen: an escalated phase taken back after a restart stays frozen with its counters, refuses exec (423 naming its report) until a person resumes; then its shim reconnects and counts start again", async () => {
    h = await harness();
    const v = await h.manager.start({ project: h.project, phase: "esc", mode: "backtest" });
    const failing = (): void => {
      h.runtime.shimOf(v.containerId)!.script = (msg, shim) => {
        shim.send({ type: "started", execId: msg.execId, pid: 100 });
        shim.output(msg.execId, "stderr", "ModuleNotFoundError: No module named 'nope'\n");
        shim.send({ type: "exit", execId: msg.execId, exitCode: 1, signal: null, timedOut: false, durationMs: 1 });
      };
    };
    failing();
    await h.manager.exec(v.id, { argv: ["python3", "main.py"] });
    const second = await h.manager.exec(v.id, { argv: ["python3", "main.py"] });
    expect(second.escalation).toMatchObject({ n: 1, category: "import" });
    expect(h.runtime.containers.get(v.containerId!)!.state).toBe("paused");

    // the daemon dies; the container stays frozen (its shim cannot reconnect)
    const m = await h.restart();
    expect(await m.reconcile()).toEqual({ readopted: [v.id], reaped: [], lost: [] });
    const after = await m.get(v.id);
    expect(after.state).toBe("escalated");
    expect(h.runtime.containers.get(v.containerId!)!.state).toBe("paused");
    expect(h.runtime.calls.filter((c) => c.startsWith("unpause "))).toEqual([]);
    const readopt = (await h.records()).filter((r) => r.type === "phase.readopt" && r.phase === v.id);
    expect(readopt).toEqual([expect.objectContaining({ state: "escalated", frozen: true, failFast: { import: 2 } })]);

    // every exec: 423 with the report, nothing sent, nothing recorded as run
    const e = await m.exec(v.id, { argv: ["python3", "main.py"] }).then(() => null, (x: unknown) => x);
    expect(e).toBeInstanceOf(SandboxdError);
    expect((e as SandboxdError).code).toBe("SBX_ERR_PHASE_ESCALATED");
    expect((e as SandboxdError).status).toBe(423);
    expect((e as SandboxdError).message).toContain(second.escalation!.report);
    expect((await h.records()).filter((r) => r.type === "exec.verdict" && r.phase === v.id)).toHaveLength(2);

    // a person resumes with a note: thawed, the shim reconnects, counters start again
    // (the restarted daemon listens since the reconcile: the thawed shim connects at once)
    const sock = path.join(h.stateDir, "phases", v.id, "run", "control.sock");
    const [resumed] = await Promise.all([m.resume(v.id, "package name fixed"), h.runtime.reconnect(v.containerId!, sock, "t".repeat(64))]);
    expect(resumed.state).toBe("running");
    expect(h.runtime.containers.get(v.containerId!)!.state).toBe("running");
    failing();
    const r = await m.exec(v.id, { argv: ["python3", "main.py"] });
    expect(r.failure).toMatchObject({ category: "import", count: 1, limit: 2 });
    expect(r.escalation).toBeNull();
  });

  it("readopt that fails (the shim never reconnects) ends the phase failed, container removed", async () => {
    h = await harness({ shimConnectTimeoutMs: 300 });
    const [v] = await crashWithPhases(1);
    const m = await h.restart();
    const report = await m.reconcile();
    expect(report.reaped).toEqual([{ id: v!.id, reason: "shim did not reconnect" }]);
    const after = await m.get(v!.id);
    expect(after.state).toBe("failed");
    expect(after.endReason).toMatch(/could not be re-adopted/);
    expect(h.runtime.containers.size).toBe(0);
  });

  it("readopt is refused when the phase's own policy can no longer be read", async () => {
    h = await harness();
    const [w] = await crashWithPhases(1);
    // the record names a phase policy that is gone by the time the daemon restarts
    const file = path.join(h.stateDir, "phases", w!.id, "phase.json");
    const record = JSON.parse(await readFile(file, "utf8")) as PhaseRecord;
    await writeFile(file, JSON.stringify({ ...record, policyFile: path.join(h.dir, "gone.yaml") }));
    const m = await h.restart();
    await m.reconcile();
    const after = await m.get(w!.id);
    expect(after.state).toBe("failed");
    expect(after.endReason).toMatch(/phase policy .*gone\.yaml unreadable after restart/);
  });

  it("end: a running record whose container exited ends failed with the cause, one PHASE_FAILED", async () => {
    h = await harness();
    const [v] = await crashWithPhases(1);
    const c = h.runtime.containers.get(v!.containerId!)!;
    c.running = false;
    c.state = "exited";
    const m = await h.restart();
    const report = await m.reconcile();
    expect(report.reaped).toEqual([{ id: v!.id, reason: "container had exited" }]);
    const after = await m.get(v!.id);
    expect(after.state).toBe("failed");
    expect(after.endReason).toBe("reaped after daemon restart (container had exited)");
    expect((await h.records()).filter((r) => r.type === "phase.failed" && r.phase === v!.id)).toHaveLength(1);
    expect(h.runtime.containers.size).toBe(0);
  });

  it("lost: a running record with no container ends failed", async () => {
    h = await harness();
    const [v] = await crashWithPhases(1);
    h.runtime.containers.clear();
    const m = await h.restart();
    expect(await m.reconcile()).toEqual({ readopted: [], reaped: [], lost: [v!.id] });
    const after = await m.get(v!.id);
    expect(after.state).toBe("failed");
    expect(after.endReason).toBe("container vanished while the daemon was down");
  });

  it("a phase found starting whose start was never recorded (killed between its state dir and its start record) gets a deferred phase.start, then its phase.failed", async () => {
    h = await harness();
    const [v] = await crashWithPhases(1);
    // a second phase as the daemon leaves it when killed right after making its state dir
    const id = "ph_cut000000000";
    const dir = path.join(h.stateDir, "phases", id);
    const record = JSON.parse(await readFile(path.join(h.stateDir, "phases", v!.id, "phase.json"), "utf8")) as PhaseRecord;
    await mkdir(path.join(dir, "run"), { recursive: true });
    await writeFile(path.join(dir, "token"), "t".repeat(64));
    await writeFile(path.join(dir, "dotenv"), "PIP_INDEX_URL=https://example.invalid/simple\n");
    await writeFile(
      path.join(dir, "phase.json"),
      JSON.stringify({ ...record, id, name: "cut", state: "starting", containerId: null, containerName: `sandboxd-${id}`, buildLog: path.join(dir, "build_audit.log") }),
    );
    // and a third, killed inside the state dir's making: a folder with no phase.json
    const unborn = path.join(h.stateDir, "phases", "ph_unborn0000000");
    await mkdir(path.join(unborn, "run"), { recursive: true });
    const m = await h.restart();
    await Promise.all([m.reconcile(), reconnectWhenListening(v!)]);
    expect(await stat(unborn).catch(() => null)).toBeNull();
    expect((await h.records()).filter((r) => r.phase === "ph_unborn0000000")).toEqual([]);
    const mine = (await h.records()).filter((r) => r.phase === id);
    expect(mine.map((r) => r.type)).toEqual(["phase.start", "phase.failed"]);
    expect(mine[0]).toMatchObject({ state: "starting", deferred: true, name: "cut", envReserved: ["PIP_INDEX_URL"] });
    expect((await m.get(id)).state).toBe("failed");
    // the phase whose start was recorded gets no second one
    expect((await h.records()).filter((r) => r.phase === v!.id && r.type === "phase.start")).toHaveLength(1);
  });

  it("remove-ended: a stopped phase's leftover container is removed, its log kept, no second end recorded", async () => {
    h = await harness();
    const v = await h.manager.start({ project: h.project, phase: "p", mode: "backtest" });
    await h.manager.stop(v.id);
    h.runtime.add({ name: v.containerName, labels: { [LABELS.phase]: v.id, [LABELS.instance]: "0123456789abcdef" }, running: true, state: "running" });
    const m = await h.restart();
    const report = await m.reconcile();
    expect(report.reaped).toEqual([{ id: v.id, reason: "record says stopped" }]);
    expect((await m.get(v.id)).state).toBe("stopped");
    expect((await h.records()).filter((r) => r.type === "phase.complete")).toHaveLength(1);
    expect(h.runtime.containers.size).toBe(0);
  });

  it("remove-orphan: a container of this instance with no record is removed; another instance's is left alone", async () => {
    h = await harness();
    h.runtime.add({ name: "sandboxd-ph_00000000dead", labels: { [LABELS.phase]: "ph_00000000dead", [LABELS.instance]: "0123456789abcdef" }, running: true, state: "running" });
    const other = h.runtime.add({ name: "theirs", labels: { [LABELS.phase]: "ph_00000000beef", [LABELS.instance]: "fedcba9876543210" }, running: true, state: "running" });
    const report = await h.manager.reconcile();
    expect(report.reaped).toEqual([{ id: "ph_00000000dead", reason: "no phase record" }]);
    expect([...h.runtime.containers.keys()]).toEqual([other.id]);
  });

  it("none: nothing found, nothing done", async () => {
    h = await harness();
    expect(await h.manager.reconcile()).toEqual({ readopted: [], reaped: [], lost: [] });
  });
});
