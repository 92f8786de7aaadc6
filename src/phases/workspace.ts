/**
 * A phase's workspace (src/workspace/): the change layer made at start,
 * re-attached after a restart, checkpointed by the operator, before
 * validation commands and at stop, and removed at the end.
 */
import path from "node:path";
import { actionLine, timestamp } from "../audit/format.js";
import { SandboxdError } from "../errors.js";
import { SHIM_PATHS } from "../shim/protocol.js";
import type { WorkspacePolicy } from "../policy/index.js";
import { PhaseWorkspace, WorkspaceLayer, isValidationCommand, protectedRootEntries, type CheckpointResult, type FileChange, type IterationRecord } from "../workspace/index.js";
import type { LivePhase, PhaseContext } from "./context.js";
import { BUILD_LOG_NAME, commandEnv } from "./project.js";
import type { PhaseRecord } from "./types.js";
import { recordAttempt, recordSuccess } from "./escalation.js";

const COMPILE_TIMEOUT_MS = 30_000;

/** The policy's workspace section for this phase (the daemon's, narrowed by the phase's own). */
export function workspacePolicy(ctx: PhaseContext, live: LivePhase): WorkspacePolicy {
  return ctx.policyFor(live.phasePolicy).workspace;
}

/** The phase's workspace: the layer (not mounted yet) and its iterations. */
export async function makeWorkspace(ctx: PhaseContext, live: LivePhase): Promise<PhaseWorkspace> {
  const { record } = live;
  const ws = workspacePolicy(ctx, live);
  const allowMainPy = (record.allow ?? []).includes("main.py");
  const extra: string[] = [];
  // the build log in the project is the phase's audit trail: read-only whatever the policy's globs say
  if (record.buildLog === path.join(record.project, BUILD_LOG_NAME)) extra.push(BUILD_LOG_NAME);
  const { hidden, readOnly } = await protectedRootEntries(record.project, ws, { allowMainPy, extraReadOnly: extra });
  const layer = new WorkspaceLayer({
    phaseDir: ctx.store.dir(record.id),
    project: record.project,
    hidden,
    readOnly,
    budgetBytes: ws.disk.layerBytes,
  });
  return new PhaseWorkspace(
    layer,
    {
      containerPid: () => containerPid(ctx, live),
      runInSandbox: (argv) => runInSandbox(live, argv),
      record: async (event, lines) => void (await live.rec.record(event, lines)),
      now: () => timestamp(ctx.opts.clock.now()),
      decided: (it) => iterationDecided(ctx, live, it),
    },
    {
      uid: record.uid,
      gid: record.gid,
      allowMainPy,
      policy: () => workspacePolicy(ctx, live),
      stateFile: ctx.store.iterationsPath(record.id),
    },
  );
}

async function containerPid(ctx: PhaseContext, live: LivePhase): Promise<number | null> {
  if (!live.record.containerId) return null;
  try {
    return await ctx.opts.runtime.containerPid(live.record.containerId);
  } catch {
    return null;
  }
}

/** A check the daemon runs in the sandbox as the project owner (the compile check): its stdout. */
async function runInSandbox(live: LivePhase, argv: string[]): Promise<string> {
  const channel = live.channel;
  if (!channel?.connected) throw new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${live.record.id} is not connected; the iteration cannot be checked`);
  const stdout: Buffer[] = [];
  const exit = await new Promise<{ code: number | null; spawn?: string }>((resolve, reject) => {
    channel.exec(
      {
        argv,
        cwd: SHIM_PATHS.workspace,
        env: commandEnv(live.record),
        timeoutMs: COMPILE_TIMEOUT_MS,
        killGraceMs: 1_000,
        uid: live.record.uid,
        gid: live.record.gid,
      },
      {
        onStarted: () => undefined,
        onStdout: (c) => void stdout.push(c),
        onStderr: () => undefined,
        onExit: (e) => resolve({ code: e.exitCode }),
        onSpawnError: (_code, message) => resolve({ code: null, spawn: message }),
        onLost: reject,
      },
    );
  });
  if (exit.spawn) throw new SandboxdError("SBX_ERR_WORKSPACE", `could not run the compile check in the sandbox: ${exit.spawn}`);
  return live.rec.redact(Buffer.concat(stdout).toString("utf8").slice(0, 1024 * 1024));
}

/**
 * SKILLS.md "Files Modified" (phase and escalation reports): the project
 * paths the phase's accepted iterations changed, in the order they were
 * first changed — created, modified, deleted or renamed (both names) —
 * folders left out. Null when the phase has no change layer (nothing is
 * tracked).
 */
export function filesModified(live: Pick<LivePhase, "workspace">): string[] | null {
  const ws = live.workspace;
  if (!ws) return null;
  const out = new Set<string>();
  for (const it of ws.iterations) {
    if (it.state !== "accepted") continue;
    for (const c of it.changes) {
      if (c.isDir) continue;
      if (c.kind === "rename" && c.from) out.add(c.from);
      out.add(c.path);
    }
  }
  return [...out];
}

/** Changes in the layer not judged yet (what the next checkpoint would see); [] when they cannot be read. */
export async function unjudgedFiles(ctx: PhaseContext, live: LivePhase): Promise<string[]> {
  if (!live.workspace) return [];
  try {
    return (await live.workspace.files()).filter((c) => !c.isDir).map((c) => c.path);
  } catch (err) {
    ctx.opts.log.warn({ phase: live.record.id, err: (err as Error).message }, "could not read the layer's pending changes for a report");
    return [];
  }
}

/**
 * SKILLS.md fail-fast, category `iteration`: a refused iteration (by the
 * rules at a checkpoint, or by an operator) is a failed attempt — counted,
 * recorded (`failfast.attempt`) and, at failFast.maxAttempts.iteration (3),
 * escalated; an accepted one is a success of the checkpoint and resets the
 * count. Iterations decided while the phase ends count nothing.
 */
async function iterationDecided(ctx: PhaseContext, live: LivePhase, it: IterationRecord): Promise<void> {
  const st = live.record.state;
  if (live.ending || (st !== "running" && st !== "paused" && st !== "escalated")) return;
  if (it.state === "accepted") {
    await recordSuccess(ctx, live, "checkpoint");
    return;
  }
  if (it.state !== "rejected") return;
  const first = it.failures[0];
  const byRules = it.decidedBy === "rules";
  await recordAttempt(ctx, live, {
    category: "iteration",
    source: "checkpoint",
    action: `iteration ${it.n} (${it.message}): ${it.changes.filter((c) => !c.isDir).map((c) => c.path).join(", ") || "no files"}`,
    result: byRules ? `REFUSED ${first?.rule ?? "workspace"}` : `REJECTED by ${it.decidedBy ?? "operator"}`,
    evidence: first ? `${first.rule}: ${first.message}` : `rejected by ${it.decidedBy ?? "operator"}`,
    lastError: it.failures.map((f) => `${f.rule} (${f.clause}): ${f.message}`).join("\n") || `rejected by ${it.decidedBy ?? "operator"}`,
  });
}

/** The error a command or checkpoint gets when its iteration was refused. */
export function iterationError(it: IterationRecord): SandboxdError {
  const why = it.failures.map((f) => `${f.rule}: ${f.message}`).join("; ");
  return new SandboxdError("SBX_ERR_ITERATION_REJECTED", `iteration ${it.n} (${it.message}) was refused and discarded: ${why}`, {
    details: { iteration: it.n, failures: it.failures, changes: it.changes },
  });
}

/**
 * Before a validation command (pytest, pylint, …): the changes so far are an
 * iteration. Refused → the command does not run (it would test the discarded
 * state) and the caller gets why.
 */
export async function checkpointBeforeValidation(live: LivePhase, parts: ReadonlyArray<readonly string[]>, cmd: string): Promise<void> {
  const ws = live.workspace;
  const rule = ws?.policy.checkpointBeforeValidation;
  if (!ws || !rule?.value || !isValidationCommand(parts, rule.programs)) return;
  const { iteration } = await ws.checkpoint(`before ${cmd}`, "validation");
  if (iteration?.state === "rejected") throw iterationError(iteration);
  if (iteration?.state === "pending") ws.assertNotPending();
}

export async function checkpoint(ctx: PhaseContext, id: string, message: string): Promise<CheckpointResult> {
  ctx.assertServing();
  const live = await ctx.running(id);
  if (!live.workspace) throw new SandboxdError("SBX_ERR_WORKSPACE", `phase ${id} has no workspace layer`);
  return live.workspace.checkpoint(message, "api");
}

export async function pendingFiles(ctx: PhaseContext, id: string): Promise<FileChange[]> {
  const live = await ctx.running(id);
  if (!live.workspace) return [];
  return live.workspace.files();
}

export async function pendingDiff(ctx: PhaseContext, id: string): Promise<string> {
  const live = await ctx.running(id);
  if (!live.workspace) return "";
  return live.workspace.diff();
}

export async function decideIteration(ctx: PhaseContext, id: string, n: number, decision: "accept" | "reject", note?: string): Promise<IterationRecord> {
  ctx.assertServing();
  const live = await ctx.running(id);
  if (!live.workspace) throw new SandboxdError("SBX_ERR_ITERATION_NOT_FOUND", `phase ${id} has no iterations`);
  return live.workspace.decide(n, decision, note);
}

/**
 * At the end of a phase: the last changes are an iteration when the sandbox
 * can still check them (an operator's stop, no command running); otherwise
 * they are discarded, recorded. Then the layer goes.
 */
export async function endWorkspace(ctx: PhaseContext, live: LivePhase, state: "stopped" | "failed", why: string): Promise<void> {
  const ws = live.workspace;
  if (!ws) return;
  try {
    const canJudge = state === "stopped" && live.channel?.connected === true && ws.gate.runningCommands === 0 && !ws.pending();
    if (canJudge) await ws.checkpoint(`phase end: ${why}`, "stop");
    else await ws.discardAtEnd(state === "failed" ? `the phase failed (${why})` : ws.pending() ? "the phase ended before a human decided" : "commands were still running when the phase ended");
  } catch (err) {
    ctx.opts.log.error({ phase: live.record.id, err: (err as Error).message }, "final checkpoint failed; the last changes are discarded");
    await live.rec
      .record({ type: "workspace.discard", reason: (err as Error).message }, [
        actionLine(timestamp(ctx.opts.clock.now()), "FILE", "DISCARD", live.record.name, `FAILED final checkpoint: ${(err as Error).message}`),
      ])
      // eslint-disable-next-line no-restricted-syntax -- the discard already happened; a record that fails is the journal failing, which fails closed and reports itself
      .catch(() => undefined);
  }
}

export async function destroyWorkspace(ctx: PhaseContext, live: LivePhase): Promise<void> {
  if (!live.workspace) return;
  await live.workspace.layer.destroy(null).catch((e: Error) => ctx.opts.log.error({ phase: live.record.id, err: e.message }, "could not remove the workspace layer"));
}
