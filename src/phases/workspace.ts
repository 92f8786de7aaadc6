/**
 * A phase's workspace (src/workspace/): the change layer made at start,
 * re-attached after a restart, checkpointed by the operator, before
 * validation commands and at stop, and removed at the end.
 */
import path from "node:path";
import { actionLine, timestamp } from "../audit/format.js";
import type { AuditEvent } from "../audit/journal.js";
import { changedFiles } from "../approvals/queue.js";
import { SandboxdError } from "../errors.js";
import { SHIM_PATHS } from "../shim/protocol.js";
import type { WorkspacePolicy } from "../policy/index.js";
import { fileEventRecord, fileEventsDroppedRecord } from "../workspace/audit.js";
import type { ViewFile } from "../workspace/files.js";
import { PhaseWorkspace, WorkspaceLayer, hiddenBelowRoot, isValidationCommand, protectedRootEntries, type CheckpointResult, type FileChange, type IterationRecord } from "../workspace/index.js";
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
  // the walk for credential files below the root runs while the container starts (the layer awaits it before the view is mounted)
  const { hidden, readOnly } = await protectedRootEntries(record.project, ws, { allowMainPy, extraReadOnly: extra, deep: false });
  const layer = new WorkspaceLayer({
    phaseDir: ctx.store.dir(record.id),
    project: record.project,
    hidden,
    findHidden: () => hiddenBelowRoot(record.project, ws),
    readOnly,
    budgetBytes: ws.disk.layerBytes,
    // a cold start takes the spare layer disk if its budget matches (a pooled claim never calls prepare)
    takeSpare: (budget) => ctx.spare.take(budget),
  });
  const now = () => timestamp(ctx.opts.clock.now());
  // live file events are recorded in the order the watcher delivered them, one batch after the other
  let recorded: Promise<unknown> = Promise.resolve();
  const recordLive = (pairs: Array<{ event: AuditEvent; lines: string[] }>) => {
    recorded = recorded
      .then(() => live.rec.recordMany(pairs))
      .catch((err: Error) => ctx.opts.log.warn({ phase: record.id, err: err.message }, "a live file event was not recorded"));
  };
  return new PhaseWorkspace(
    layer,
    {
      containerPid: () => containerPid(ctx, live),
      runInSandbox: (argv) => runInSandbox(live, argv),
      record: async (event, lines) => void (await live.rec.record(event, lines)),
      now,
      askHuman: async (it, files) => {
        const strictest = it.failures.find((f) => f.decision === "ask") ?? it.failures[0];
        const why = it.failures.map((f) => `${f.rule}: ${f.message}`).join("; ");
        const paths = it.changes.filter((c) => !c.isDir).map((c) => (c.kind === "rename" ? `${c.from ?? "?"} -> ${c.path}` : c.path));
        const a = await ctx.opts.approvals.requestIteration(
          record.id,
          { n: it.n, paths },
          { ruleId: strictest?.rule ?? "workspace.failed-iteration", clause: strictest?.clause ?? "SKILLS.md §1", policyReason: why, requestReason: it.message },
          files,
        );
        await live.rec.record(
          { type: "approval.request", approval: a.id, workspace: a.workspace, rule: a.ruleId, clause: a.clause, reason: why, requestReason: it.message, files },
          [actionLine(now(), "APPROVAL", "REQUEST", `iteration ${it.n}: ${paths.join(", ")}`, `${a.id} pending: ${why}`)],
        );
        ctx.opts.log.info({ phase: record.id, approval: a.id, iteration: it.n }, "iteration waits for approval");
        ctx.opts.notify?.(a);
        return a.id;
      },
      fileEvents: (batch) => recordLive(batch.map((e) => fileEventRecord({ event: e.kind, path: e.path, isDir: e.isDir, ts: now() }))),
      fileEventsDropped: (count, windowMs) => recordLive([fileEventsDroppedRecord({ count, windowMs, ts: now() })]),
      watchFailed: (err) => {
        ctx.opts.log.error({ phase: record.id, err: err.message }, "the workspace watcher failed; live file events stop (checkpoints still see every change)");
        recordLive([
          {
            event: { type: "workspace.watch.failed", reason: err.message },
            lines: [actionLine(now(), "FILE", "WATCH", "(layer)", `FAILED ${err.message}; live file events stop, the checkpoint still lists every change`)],
          },
        ]);
      },
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
        onStdout: (c) => void stdout.push(Buffer.from(c)), // a copy: the piece is lent for the call (shim-channel.ts)
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

/** The pending iteration's diff, or with `all` the whole phase's (from the project as the phase found it). */
export async function pendingDiff(ctx: PhaseContext, id: string, all = false): Promise<string> {
  const live = await ctx.running(id);
  if (!live.workspace) return "";
  return all ? live.workspace.diffAll() : live.workspace.diff();
}

/** Files served by GET /v1/phases/:id/files/<path> at most (a larger one is read in the phase or the project). */
export const MAX_SERVED_FILE_BYTES = 64 * 1024 * 1024;

/** A file of the phase's view (GET /v1/phases/:id/files/<path>): also while the phase is escalated or paused. */
export async function readPhaseFile(ctx: PhaseContext, id: string, rel: string): Promise<ViewFile> {
  const live = ctx.phases.get(id);
  if (!live || !["running", "escalated", "paused"].includes(live.record.state)) await ctx.running(id); // its error
  if (!live?.workspace) throw new SandboxdError("SBX_ERR_WORKSPACE", `phase ${id} has no workspace layer`);
  return live.workspace.readFile(rel, MAX_SERVED_FILE_BYTES);
}

/** A harness writes a file through the daemon (PUT /v1/phases/:id/files/<path>). */
export async function writePhaseFile(ctx: PhaseContext, id: string, rel: string, bytes: Buffer, mode?: number): Promise<Awaited<ReturnType<PhaseWorkspace["writeFile"]>>> {
  ctx.assertServing();
  const live = await ctx.running(id);
  if (!live.workspace) throw new SandboxdError("SBX_ERR_WORKSPACE", `phase ${id} has no workspace layer`);
  return live.workspace.writeFile(rel, bytes, mode === undefined ? {} : { mode });
}

/**
 * An operator decides a pending iteration (`sandboxd iteration accept|reject`,
 * or its approval request: `sandboxd approvals approve|deny`). Either way
 * the iteration and its request end decided together: approving applies the
 * files bound in the request, and only if the layer still holds those bytes.
 */
export async function decideIteration(ctx: PhaseContext, id: string, n: number, decision: "accept" | "reject", note?: string, viaApproval = false): Promise<IterationRecord> {
  ctx.assertServing();
  const live = await ctx.running(id);
  const ws = live.workspace;
  if (!ws) throw new SandboxdError("SBX_ERR_ITERATION_NOT_FOUND", `phase ${id} has no iterations`);
  const it = ws.iterations.find((i) => i.n === n);
  const request = ctx.opts.approvals.forIteration(id, n);
  if (decision === "accept" && request && it?.state === "pending") {
    // a person approves exactly what will be applied
    const now = await ws.bindings(await ws.layer.changes());
    const changed = changedFiles(request.files, now);
    if (changed.length > 0) {
      throw new SandboxdError("SBX_ERR_APPROVAL_STALE", `iteration ${n} changed since it was put to a person: ${changed.join(", ")}; nothing was applied`, {
        hint: "reject it, or look at `sandboxd diff` again",
      });
    }
  }
  const decided = await ws.decide(n, decision, viaApproval && request ? `${note ?? ""}${note ? " " : ""}(${request.id})`.trim() : note);
  // decided here, its request ends with it (through the request, the caller decides it)
  if (request && !viaApproval) {
    if (request.state === "pending") await ctx.opts.approvals.decide(request.id, decision === "accept" ? "approve" : "deny", note);
    if (decision === "accept") await ctx.opts.approvals.use(request.id, request.files);
    ctx.opts.approvals.announce(request.id);
  }
  return decided;
}

/**
 * At the end of a phase: the last changes are an iteration when the sandbox
 * can still check them (an operator's stop, no command running); otherwise
 * they are discarded, recorded. Then the layer goes.
 */
export async function endWorkspace(ctx: PhaseContext, live: LivePhase, state: "stopped" | "failed", why: string): Promise<void> {
  const ws = live.workspace;
  if (!ws) return;
  await ws.unwatch();
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
  await live.workspace.unwatch();
  await live.workspace.layer.destroy(null).catch((e: Error) => ctx.opts.log.error({ phase: live.record.id, err: e.message }, "could not remove the workspace layer"));
}
