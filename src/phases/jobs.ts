/**
 * Background jobs: a command started with `background: true` answers as
 * soon as it runs, with an id of its own (`jb_…`), and goes on without the
 * request that started it — the one thing that may outlive its starting
 * call. It is an ordinary command in every other way: judged, recorded,
 * bounded by its timeout, run in a cgroup of its own in the sandbox (the
 * shim kills everything it started when it ends), counted by fail-fast, and
 * holding the workspace's gate while it runs (a checkpoint waits for it as
 * for any command). It ends when its program exits, at its timeout, when
 * killed by id, or when its phase stops (the shim kills every command).
 *
 * Jobs are kept in the daemon's memory: a restarted daemon knows none (the
 * audit trail has each one's verdict and result).
 */
import { timestamp } from "../audit/format.js";
import { SandboxdError, type ErrorBody } from "../errors.js";
import type { PhaseContext } from "./context.js";
import { HeadTailText, exec, type ExecRequest, type ExecResult } from "./exec.js";
import { newRunId } from "./runs.js";

/** Jobs a phase may have running at once. */
export const MAX_RUNNING_JOBS = 8;
/** Ended jobs remembered (oldest forgotten first). */
const KEEP_ENDED = 256;

export type JobState = "running" | "exited" | "failed";

export interface JobView {
  id: string;
  phaseId: string;
  argv: string[] | null;
  command: string | null;
  cwd: string;
  state: JobState;
  pid: number | null;
  startedAt: string;
  endedAt: string | null;
  /** the command's result once it exited (its output as kept: head and tail) */
  result: ExecResult | null;
  /** what ended it otherwise (the shim lost, the phase stopped mid-command) */
  error: ErrorBody["error"] | null;
}

export interface JobOutput {
  id: string;
  state: JobState;
  stdout: string;
  stderr: string;
  /** scrubbed bytes seen so far, and those left out between the kept head and tail */
  stdoutBytes: number;
  stderrBytes: number;
  stdoutOmitted: number;
  stderrOmitted: number;
}

class Job {
  state: JobState = "running";
  pid: number | null = null;
  endedAt: string | null = null;
  result: ExecResult | null = null;
  error: ErrorBody["error"] | null = null;
  readonly out: HeadTailText;
  readonly err: HeadTailText;
  readonly done: Promise<void>;
  settle!: () => void;

  constructor(
    readonly id: string,
    readonly phaseId: string,
    readonly argv: string[] | null,
    readonly command: string | null,
    readonly startedAt: string,
    capBytes: number,
    readonly cwd: string,
  ) {
    this.out = new HeadTailText(capBytes);
    this.err = new HeadTailText(capBytes);
    this.done = new Promise((r) => (this.settle = r));
  }

  view(): JobView {
    return {
      id: this.id,
      phaseId: this.phaseId,
      argv: this.result?.argv ?? this.argv,
      command: this.result?.command ?? this.command,
      cwd: this.cwd,
      state: this.state,
      pid: this.pid,
      startedAt: this.startedAt,
      endedAt: this.endedAt,
      result: this.result,
      error: this.error,
    };
  }

  output(): JobOutput {
    const o = this.out.view();
    const e = this.err.view();
    return {
      id: this.id,
      state: this.state,
      stdout: this.out.text(),
      stderr: this.err.text(),
      stdoutBytes: this.out.seen,
      stderrBytes: this.err.seen,
      stdoutOmitted: o.omitted,
      stderrOmitted: e.omitted,
    };
  }
}

export class JobTable {
  private readonly jobs = new Map<string, Job>();

  constructor(private readonly ctx: PhaseContext) {}

  /**
   * Starts a job: resolves with it once the command runs (or ended before
   * it could be seen running: a program not found), rejects with the
   * refusal when it does not run (policy, approval, validation).
   */
  async start(phaseId: string, req: ExecRequest): Promise<JobView> {
    const running = [...this.jobs.values()].filter((j) => j.phaseId === phaseId && j.state === "running").length;
    if (running >= MAX_RUNNING_JOBS) {
      throw new SandboxdError("SBX_ERR_JOB_LIMIT", `phase ${phaseId} has ${running} background jobs running, the most it may have`, { details: { running, limit: MAX_RUNNING_JOBS } });
    }
    const live = this.ctx.phases.get(phaseId);
    const cap = live ? this.ctx.limitsOf(live).outputCapBytes : 1024 * 1024;
    const id = newRunId(true);
    const job = new Job(id, phaseId, req.argv ?? null, req.argv ? null : (req.command ?? null), timestamp(this.ctx.opts.clock.now()), cap, req.cwd ?? ".");
    let seen = false;
    let onStart!: () => void;
    const started = new Promise<void>((resolve) => (onStart = resolve));
    const show = () => {
      if (seen) return;
      seen = true;
      this.add(job);
      onStart();
    };
    const finished = exec(
      this.ctx,
      phaseId,
      { ...req, background: true, runId: id },
      {
        started: (info) => {
          job.pid = info.pid;
          show();
        },
        stdout: (t) => job.out.push(t),
        stderr: (t) => job.err.push(t),
      },
    ).then(
      (result) => {
        job.result = result;
        job.state = "exited";
        show();
      },
      (e: unknown) => {
        job.state = "failed";
        job.error = (e instanceof SandboxdError ? e : new SandboxdError("SBX_ERR_INTERNAL", (e as Error).message)).toBody().error;
        if (!seen) throw e; // it never ran: the caller gets the refusal
      },
    );
    finished
      .finally(() => {
        job.endedAt = timestamp(this.ctx.opts.clock.now());
        job.settle();
      })
      // eslint-disable-next-line no-restricted-syntax -- a refusal is the start's answer (awaited below); nothing else can reject here
      .catch(() => undefined);
    await Promise.race([started, finished]);
    return job.view();
  }

  private add(job: Job): void {
    this.jobs.set(job.id, job);
    const ended = [...this.jobs.values()].filter((j) => j.state !== "running");
    for (const j of ended.slice(0, Math.max(0, ended.length - KEEP_ENDED))) this.jobs.delete(j.id);
  }

  list(phaseId: string): JobView[] {
    return [...this.jobs.values()].filter((j) => j.phaseId === phaseId).map((j) => j.view());
  }

  private job(phaseId: string, id: string): Job {
    const j = this.jobs.get(id);
    if (!j || j.phaseId !== phaseId) throw new SandboxdError("SBX_ERR_EXEC_NOT_FOUND", `no background job ${id} in phase ${phaseId}`, { details: { id, phaseId } });
    return j;
  }

  get(phaseId: string, id: string): JobView {
    return this.job(phaseId, id).view();
  }

  output(phaseId: string, id: string): JobOutput {
    return this.job(phaseId, id).output();
  }

  /** Waits until the job ends or `timeoutMs` passes (or the caller leaves): the job as it is then. */
  async wait(phaseId: string, id: string, timeoutMs: number, abort?: AbortSignal): Promise<JobView> {
    const j = this.job(phaseId, id);
    if (j.state === "running") {
      let timer: NodeJS.Timeout | undefined;
      let onAbort: (() => void) | undefined;
      await Promise.race([
        j.done,
        new Promise<void>((r) => {
          timer = setTimeout(r, timeoutMs);
          onAbort = () => r();
          abort?.addEventListener("abort", onAbort, { once: true });
        }),
      ]);
      clearTimeout(timer);
      if (onAbort) abort?.removeEventListener("abort", onAbort);
    }
    return j.view();
  }
}
