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
import type { Approval } from "../approvals/queue.js";
import { SandboxdError } from "../errors.js";
import { PhaseContext, type ManagerOptions } from "./context.js";
import { exec, type ExecRequest, type ExecResult, type ExecSink } from "./exec.js";
import { shutdown, start, stop, type StartRequest } from "./lifecycle.js";
import { reconcile, type ReconcileReport } from "./reconcile.js";
import type { PhaseView } from "./types.js";

export type { ManagerOptions } from "./context.js";
export type { ExecRequest, ExecResult, ExecSink } from "./exec.js";
export type { StartRequest } from "./lifecycle.js";
export { BUILD_LOG_NAME } from "./project.js";
export type { ReconcileReport } from "./reconcile.js";

export class PhaseManager {
  private readonly ctx: PhaseContext;

  constructor(opts: ManagerOptions) {
    this.ctx = new PhaseContext(opts);
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
   * After a restart: re-adopt running phases whose shim reconnects, clean up
   * everything else this instance created. Says which in the report and log.
   */
  reconcile(): Promise<ReconcileReport> {
    return reconcile(this.ctx);
  }

  /* --------------------------------- exec -------------------------------- */

  exec(id: string, req: ExecRequest, sink?: ExecSink, abort?: AbortSignal): Promise<ExecResult> {
    return exec(this.ctx, id, req, sink, abort);
  }

  /** Flow control for a streaming client of this phase. */
  flow(id: string): { pause(): void; resume(): void } {
    const ch = this.ctx.phases.get(id)?.channel;
    return { pause: () => ch?.pause(), resume: () => ch?.resume() };
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

  /* ------------------------------ approvals ----------------------------- */

  async decideApproval(approvalId: string, decision: "approve" | "deny", note?: string): Promise<Approval> {
    this.ctx.assertServing();
    const before = this.ctx.opts.approvals.get(approvalId);
    const live = this.ctx.phases.get(before.phaseId);
    if (!live) {
      throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${before.phaseId} of approval ${approvalId} is no longer running`);
    }
    const a = await this.ctx.opts.approvals.decide(approvalId, decision, note);
    const cmd = live.rec.redact(a.argv ? quoteArgv(a.argv) : a.sql !== null ? `SQL: ${a.sql}` : (a.command ?? ""));
    await live.rec.record({ type: `approval.${decision}`, approval: a.id, argv: a.argv, command: a.command, sql: a.sql, note: note ?? null }, [
      actionLine(
        timestamp(this.ctx.opts.clock.now()),
        "APPROVAL",
        decision === "approve" ? "APPROVE" : "DENY",
        cmd,
        `${a.id} by operator${note ? `: ${note}` : ""}`,
      ),
    ]);
    this.ctx.opts.log.info({ phase: a.phaseId, approval: a.id, decision }, "approval decided");
    return a;
  }
}
