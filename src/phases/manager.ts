/**
 * The phase registry: the one object the API, the console and the daemon
 * hold. It keeps no logic of its own beyond queries; each concern lives in
 * its module:
 *
 *   state.ts      the lifecycle table and its guard (every state change)
 *   lifecycle.ts  start, stop, finish, shutdown
 *   exec.ts       one command: verdict, run, result
 *   project.ts    the project directory, its .env, the commands' environment
 *   network.ts    service tunnels, the SQL gateway hand-off, confinement
 *   reconcile.ts  what a restarted daemon does with what it finds
 *
 * Every container it creates carries the phase id and this daemon's instance
 * id as labels, so a restarted daemon finds them (reconcile) and nothing is
 * orphaned.
 */
import { actionLine, quoteArgv, timestamp } from "../audit/format.js";
import { realpath, stat } from "node:fs/promises";
import { bindFiles, filesRun } from "../approvals/binding.js";
import type { Grant, GrantRequest } from "../approvals/grants.js";
import type { Approval } from "../approvals/queue.js";
import { readProjectFile } from "./project.js";
import { SandboxdError } from "../errors.js";
import { PhaseContext, type ManagerOptions } from "./context.js";
import { FlowConsumer } from "./flow.js";
import { exec, type ExecRequest, type ExecResult, type ExecSink } from "./exec.js";
import { JobTable, type JobOutput, type JobView } from "./jobs.js";
import type { RunInfo } from "./runs.js";
import { shutdown, start, stop, type StartRequest } from "./lifecycle.js";
import { abortPhase, pausePhase, recordAttempt, type AttemptInput, type AttemptOutcome } from "./escalation.js";
import { resumePhase } from "./escalation.js";
import { reconcile, type ReconcileReport } from "./reconcile.js";
import type { PoolStatus } from "./pool.js";
import { detachAll } from "./detach.js";
import { buildReport, type PhaseReport } from "./report.js";
import type { Escalation, PhaseView } from "./types.js";
import { checkpoint, decideIteration, pendingDiff, pendingFiles, readPhaseFile, writePhaseFile } from "./workspace.js";
import type { ViewFile } from "../workspace/files.js";
import type { CheckpointResult, FileChange, IterationRecord } from "../workspace/index.js";

export type { ManagerOptions } from "./context.js";
export type { ExecRequest, ExecResult, ExecSink } from "./exec.js";
export type { StartRequest } from "./lifecycle.js";
export type { FlowConsumer } from "./flow.js";
export { BUILD_LOG_NAME } from "./project.js";
export type { ReconcileReport } from "./reconcile.js";
export type { JobOutput, JobView } from "./jobs.js";
export type { RunInfo } from "./runs.js";
export type { PhaseReport } from "./report.js";
export type { PoolStatus } from "./pool.js";

export class PhaseManager {
  private readonly ctx: PhaseContext;
  private readonly jobs: JobTable;

  constructor(opts: ManagerOptions) {
    this.ctx = new PhaseContext(opts);
    this.jobs = new JobTable(this.ctx);
  }

  /* ------------------------------- queries ------------------------------- */

  async list(): Promise<PhaseView[]> {
    const { records } = await this.ctx.store.loadAll();
    return records
      .map((r) => this.ctx.view(this.ctx.phases.get(r.id)?.record ?? r))
      .sort((a, b) => a.createdAt.localeCompare(b.createdAt));
  }

  get(id: string): Promise<PhaseView> {
    return this.ctx.get(id);
  }

  /* ------------------------------ lifecycle ------------------------------ */

  start(req: StartRequest): Promise<PhaseView> {
    return start(this.ctx, req);
  }

  stop(id: string, why = "stopped by operator"): Promise<PhaseView> {
    return stop(this.ctx, id, why);
  }

  /** SIGTERM: refuse new work, stop every phase, leave nothing running. */
  shutdown(): Promise<void> {
    return shutdown(this.ctx);
  }

  /**
   * A planned restart (`sandboxd stop --keep-phases`): commands drain (then
   * are cancelled), every phase is left running for the next daemon to
   * re-adopt (detach.ts). Refused, changing nothing, when a phase is not
   * running. Answers the ids of the phases left running.
   */
  detach(drainMs: number): Promise<string[]> {
    return detachAll(this.ctx, drainMs);
  }

  /**
   * After a restart: re-adopt running phases whose shim reconnects, clean up
   * everything else this instance created. Says which in the report and log.
   */
  reconcile(): Promise<ReconcileReport> {
    return reconcile(this.ctx);
  }

  /** After the reconcile: the warm pool begins to fill (nothing when its size is 0), and the spare layer disk is made. */
  startPool(): void {
    this.ctx.pool.refill();
    // the spare layer disk: a previous daemon's removed, one made for the next cold start
    this.ctx.spare.refill();
  }

  /** The warm pool's state, size and hit rate (`sandboxd ps`). */
  poolStatus(): PoolStatus {
    return this.ctx.pool.status();
  }

  /* ------------------------ fail-fast, a person's hand ------------------------ */

  pause(id: string, note?: string): Promise<PhaseView> {
    return pausePhase(this.ctx, id, note ?? null);
  }

  resume(id: string, note?: string): Promise<PhaseView> {
    return resumePhase(this.ctx, id, note ?? null);
  }

  abort(id: string, note?: string): Promise<PhaseView> {
    return abortPhase(this.ctx, id, note ?? null);
  }

  /**
   * The fail-fast hook for failures that are not a command's result — an
   * iteration refused at a checkpoint: `{category: "iteration", source:
   * "checkpoint", action: "iteration 3", result: "REJECTED", evidence: rule}`.
   * Recorded (`failfast.attempt`) and counted; at the limit the phase escalates.
   */
  async recordAttempt(id: string, attempt: AttemptInput): Promise<AttemptOutcome> {
    const live = this.ctx.phases.get(id);
    if (!live || live.record.state !== "running") return this.ctx.running(id).then(() => recordAttempt(this.ctx, live!, attempt));
    return recordAttempt(this.ctx, live, attempt);
  }

  /** Escalations of every phase: open ones (the phase is escalated) only, unless `all`. */
  async escalations(all: boolean): Promise<Array<Escalation & { phase: string; name: string; state: string }>> {
    const out: Array<Escalation & { phase: string; name: string; state: string }> = [];
    for (const p of await this.list()) {
      for (const e of p.escalations ?? []) {
        if (all || (e.resolved === null && p.state === "escalated")) out.push({ ...e, phase: p.id, name: p.name, state: p.state });
      }
    }
    return out;
  }

  /** The phase report: built now for a live phase, as kept at its end for an ended one. */
  async report(id: string): Promise<PhaseReport> {
    const live = this.ctx.phases.get(id);
    const approvals = this.ctx.opts.approvals.list({ all: true, phaseId: id });
    if (live) return buildReport(live.record, live, approvals);
    const view = await this.ctx.get(id);
    try {
      return (await this.ctx.store.loadReport(id)) as PhaseReport;
    } catch {
      // a phase that ended before reports existed, or whose report could not be kept
      return buildReport(view, undefined, approvals);
    }
  }

  /* --------------------------------- exec -------------------------------- */

  exec(id: string, req: ExecRequest, sink?: ExecSink, abort?: AbortSignal): Promise<ExecResult> {
    return exec(this.ctx, id, req, sink, abort);
  }

  /* ------------------------ running commands, jobs ----------------------- */

  /** The phase's commands running now (foreground and background), by id. */
  async runs(id: string): Promise<RunInfo[]> {
    await this.ctx.get(id); // 404 for an unknown phase
    return this.ctx.runs.of(id);
  }

  /**
   * Cancels a running command by id: recorded (`exec.cancel`) before the
   * signal; SIGTERM to its process group now, SIGKILL after the mode's kill
   * grace. Its own caller gets its result, with `cancelled`.
   */
  async cancel(id: string, runId: string, note?: string): Promise<RunInfo> {
    this.ctx.assertServing();
    const run = this.ctx.runs.get(id, runId);
    const live = this.ctx.phases.get(id);
    if (!run.info.cancelled && live) {
      const cmd = live.rec.redact(run.info.argv ? quoteArgv(run.info.argv) : (run.info.command ?? ""));
      const at = timestamp(this.ctx.opts.clock.now());
      await live.rec.record({ type: "exec.cancel", id: runId, background: run.info.background, argv: run.info.argv, command: run.info.command, note: note ?? null }, [
        actionLine(at, "SHELL", "CANCEL", cmd, `${runId} by operator${note ? `: ${note}` : ""}`),
      ]);
      run.cancel(at, note ?? null);
      this.ctx.opts.log.info({ phase: id, run: runId }, "command cancelled");
    }
    return { ...run.info };
  }

  /** Starts a background job: answers once it runs (exec.ts judges and records it as any command). */
  startJob(id: string, req: ExecRequest): Promise<JobView> {
    this.ctx.assertServing();
    return this.jobs.start(id, req);
  }

  async listJobs(id: string): Promise<JobView[]> {
    await this.ctx.get(id);
    return this.jobs.list(id);
  }

  job(id: string, jobId: string): JobView {
    return this.jobs.get(id, jobId);
  }

  jobOutput(id: string, jobId: string): JobOutput {
    return this.jobs.output(id, jobId);
  }

  waitJob(id: string, jobId: string, timeoutMs: number, abort?: AbortSignal): Promise<JobView> {
    return this.jobs.wait(id, jobId, timeoutMs, abort);
  }

  /** Kills a job (a cancel by its id) and answers once it has ended (at most its kill grace and a few seconds later). */
  async killJob(id: string, jobId: string, note?: string): Promise<JobView> {
    const job = this.jobs.get(id, jobId);
    if (job.state !== "running") return job;
    await this.cancel(id, jobId, note);
    const live = this.ctx.phases.get(id);
    const grace = live ? this.ctx.limitsOf(live).killGraceMs : 2_000;
    return this.jobs.wait(id, jobId, grace + 10_000);
  }

  /**
   * Flow control for one streaming client of this phase: it may hold the
   * phase's channel paused while it drains, and releases that pause when it
   * closes (./flow.ts). Close it however the client's request ends.
   */
  flow(id: string): FlowConsumer {
    return new FlowConsumer(this.ctx.phases.get(id)?.channel ?? null);
  }

  /* --------------------------------- logs -------------------------------- */

  async logs(id: string, follow: boolean): Promise<{ stream: NodeJS.ReadableStream } | { file: string }> {
    const live = this.ctx.phases.get(id);
    if (live?.record.containerId && live.record.state === "running") {
      return { stream: await this.ctx.opts.runtime.logs(live.record.containerId, { follow }) };
    }
    await this.ctx.get(id); // 404 for an unknown id
    return { file: this.ctx.store.containerLogPath(id) };
  }

  /* ------------------------------ workspace ------------------------------ */

  /** Judge the phase's changes since the last checkpoint now (src/workspace). */
  checkpoint(id: string, message: string): Promise<CheckpointResult> {
    return checkpoint(this.ctx, id, message);
  }

  /** What a checkpoint now would judge. */
  files(id: string): Promise<FileChange[]> {
    return pendingFiles(this.ctx, id);
  }

  /** The pending iteration as a unified diff; with `all`, everything the phase changed since it started. */
  diff(id: string, all = false): Promise<string> {
    return pendingDiff(this.ctx, id, all);
  }

  /** A file as the phase sees it. */
  readFile(id: string, rel: string): Promise<ViewFile> {
    return readPhaseFile(this.ctx, id, rel);
  }

  /** A file written into the phase's view (atomic, size-checked, Python compiled first). */
  writeFile(id: string, rel: string, bytes: Buffer, mode?: number): ReturnType<typeof writePhaseFile> {
    return writePhaseFile(this.ctx, id, rel, bytes, mode);
  }

  decideIteration(id: string, n: number, decision: "accept" | "reject", note?: string): Promise<IterationRecord> {
    return decideIteration(this.ctx, id, n, decision, note);
  }

  /* ------------------------------ approvals ----------------------------- */

  async decideApproval(approvalId: string, decision: "approve" | "deny", note?: string): Promise<Approval> {
    this.ctx.assertServing();
    const before = this.ctx.opts.approvals.get(approvalId);
    const live = this.ctx.phases.get(before.phaseId);
    if (!live) {
      throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${before.phaseId} of approval ${approvalId} is no longer running`);
    }
    const previous = before.state;
    if (before.workspace) return this.decideIterationApproval(before, decision, note);
    const a = await this.ctx.opts.approvals.decide(approvalId, decision, note);
    const cmd = live.rec.redact(a.argv ? quoteArgv(a.argv) : a.sql !== null ? `SQL: ${a.sql}` : (a.command ?? ""));
    // approving a denied request: the person changed their mind, and the trail says so
    await live.rec.record({ type: `approval.${decision}`, approval: a.id, argv: a.argv, command: a.command, sql: a.sql, note: note ?? null, previous }, [
      actionLine(
        timestamp(this.ctx.opts.clock.now()),
        "APPROVAL",
        decision === "approve" ? "APPROVE" : "DENY",
        cmd,
        `${a.id} by operator${previous === "denied" ? " (was denied)" : ""}${note ? `: ${note}` : ""}`,
      ),
    ]);
    this.ctx.opts.log.info({ phase: a.phaseId, approval: a.id, decision }, "approval decided");
    // after the decision's record: a waiting exec's records follow it in the trail
    this.ctx.opts.approvals.announce(a.id);
    return a;
  }

  /**
   * The request of a workspace iteration (a shared/ edit, a file over 10 MB):
   * approving applies the iteration — only with the bytes the request bound —
   * and denying discards it, as `sandboxd iteration accept|reject` does.
   */
  private async decideIterationApproval(before: Approval, decision: "approve" | "deny", note?: string): Promise<Approval> {
    const n = before.workspace!.iteration;
    const live = this.ctx.phases.get(before.phaseId)!;
    const it = live.workspace?.iterations.find((i) => i.n === n);
    if (!it || it.state !== "pending" || before.state !== "pending") {
      throw new SandboxdError("SBX_ERR_APPROVAL_DECIDED", `approval ${before.id} (iteration ${n}) is already ${before.state === "pending" ? `decided: the iteration was ${it?.state ?? "not found"}` : before.state}`);
    }
    const ts = timestamp(this.ctx.opts.clock.now());
    const what = `iteration ${n}: ${before.workspace!.paths.join(", ")}`;
    if (decision === "approve") {
      // checked against the layer before the request is marked approved: a stale request applies nothing
      await decideIteration(this.ctx, before.phaseId, n, "accept", note, true);
    }
    const a = await this.ctx.opts.approvals.decide(before.id, decision, note);
    await live.rec.record({ type: `approval.${decision}`, approval: a.id, workspace: a.workspace, note: note ?? null, previous: "pending" }, [
      actionLine(ts, "APPROVAL", decision === "approve" ? "APPROVE" : "DENY", live.rec.redact(what), `${a.id} by operator${note ? `: ${note}` : ""}`),
    ]);
    if (decision === "deny") await decideIteration(this.ctx, before.phaseId, n, "reject", note, true);
    else await this.ctx.opts.approvals.use(a.id, a.files);
    this.ctx.opts.approvals.announce(a.id);
    return this.ctx.opts.approvals.get(a.id);
  }

  /* ------------------------- standing approvals ------------------------- */

  private get grantStore() {
    const g = this.ctx.opts.grants;
    if (!g) throw new SandboxdError("SBX_ERR_INTERNAL", "this daemon keeps no standing approvals");
    return g;
  }

  listGrants(all = false): Grant[] {
    return this.grantStore.list({ all });
  }

  /**
   * A person grants a standing approval. Phase scope: the phase must be
   * running. An argv grant is bound to the files its command runs as they
   * are now (in the project). Recorded in audit.jsonl (and the phase's build
   * log) before it can be used.
   */
  async grant(req: GrantRequest): Promise<Grant> {
    this.ctx.assertServing();
    let project = req.project;
    const live = req.phaseId ? this.ctx.phases.get(req.phaseId) : undefined;
    if (req.phaseId) {
      if (!live) throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${req.phaseId} is not running; a standing approval of a phase needs it running`);
      project = live.record.project;
    } else {
      const ok = project ? await stat(project).then((s) => s.isDirectory(), () => false) : false;
      if (!ok) throw new SandboxdError("SBX_ERR_PROJECT_NOT_FOUND", `project ${project ?? "(none)"} is not a directory`);
      // as phases record it: the real path
      project = await realpath(project!);
    }
    const files = req.argv ? await bindFiles(filesRun({ argv: req.argv }), (rel) => readProjectFile({ project: project! }, rel)) : [];
    const g = await this.grantStore.grant({ ...req, project }, files);
    const what = g.argv ? quoteArgv(g.argv) : `pattern ${JSON.stringify(g.pattern)}`;
    const event = { type: "grant.create", grant: g.id, phaseId: g.phaseId, project: g.project, argv: g.argv, pattern: g.pattern, expiresAt: g.expiresAt, maxTimeoutMs: g.maxTimeoutMs, note: g.note, files: g.files };
    if (live) {
      await live.rec.record(event, [
        actionLine(timestamp(this.ctx.opts.clock.now()), "APPROVAL", "GRANT", what, `${g.id} by operator until ${g.expiresAt}${g.note ? `: ${g.note}` : ""}`),
      ]);
    } else {
      await this.ctx.opts.journal.append(event);
    }
    this.ctx.opts.log.info({ grant: g.id, phase: g.phaseId, project: g.project }, "standing approval granted");
    return g;
  }

  async revokeGrant(id: string, note?: string): Promise<Grant> {
    this.ctx.assertServing();
    const g = await this.grantStore.revoke(id, note);
    const event = { type: "grant.revoke", grant: g.id, phaseId: g.phaseId, project: g.project, note: note ?? null, uses: g.uses };
    const live = g.phaseId ? this.ctx.phases.get(g.phaseId) : undefined;
    if (live) {
      const what = g.argv ? quoteArgv(g.argv) : `pattern ${JSON.stringify(g.pattern)}`;
      await live.rec.record(event, [actionLine(timestamp(this.ctx.opts.clock.now()), "APPROVAL", "REVOKE", what, `${g.id} by operator${note ? `: ${note}` : ""}`)]);
    } else {
      await this.ctx.opts.journal.append(event);
    }
    return g;
  }
}
