/**
 * The commands running now, each with an id of its own (`ex_…`, or `jb_…`
 * for a background job), so that a person or a harness can see them and
 * cancel one by id. A cancel is what a timeout does, asked for early:
 * SIGTERM to the command's process group, SIGKILL `killGraceMs` later (the
 * shim's per-command cgroup takes whatever the command started with it).
 * The cancel is recorded (`exec.cancel`) before the signal is sent; the
 * command's result then says `cancelled`.
 */
import { randomHex } from "../util/random.js";
import { SandboxdError } from "../errors.js";

export interface RunInfo {
  id: string;
  phaseId: string;
  argv: string[] | null;
  command: string | null;
  /** the directory it started in, inside the container */
  cwd: string;
  startedAt: string;
  /** null until the shim reports the start */
  pid: number | null;
  background: boolean;
  cancelled: { at: string; note: string | null } | null;
}

export class RunHandle {
  private killTimer: NodeJS.Timeout | null = null;
  /** set by exec while it waits for the outcome: ends the wait with an error (escalation.ts) */
  onAbandon: ((e: Error) => void) | null = null;

  constructor(
    readonly info: RunInfo,
    private readonly signal: (sig: "SIGTERM" | "SIGKILL") => void,
    private readonly killGraceMs: number,
  ) {}

  /** SIGTERM now, SIGKILL after the grace: the caller has recorded the cancel first. */
  cancel(at: string, note: string | null): void {
    if (this.info.cancelled) return;
    this.info.cancelled = { at, note };
    this.signal("SIGTERM");
    this.killTimer = setTimeout(() => this.signal("SIGKILL"), this.killGraceMs);
    this.killTimer.unref();
  }

  /**
   * The phase escalated under the command: SIGKILL is sent (a frozen shim
   * reads it when the container thaws) and its caller is answered with `e`
   * now, not when a result comes that never will.
   */
  abandon(e: Error): void {
    this.signal("SIGKILL");
    this.onAbandon?.(e);
  }

  /** The command ended: no late SIGKILL for an exec id the channel may reuse. */
  ended(): void {
    if (this.killTimer) clearTimeout(this.killTimer);
    this.killTimer = null;
  }
}

/** `ex_` or `jb_` followed by 12 hex digits, like phase ids. */
export function newRunId(background: boolean): string {
  return `${background ? "jb" : "ex"}_${randomHex(6)}`;
}

export class RunTable {
  private readonly runs = new Map<string, RunHandle>();

  add(h: RunHandle): void {
    this.runs.set(h.info.id, h);
  }

  remove(id: string): void {
    this.runs.get(id)?.ended();
    this.runs.delete(id);
  }

  handles(phaseId: string): RunHandle[] {
    return [...this.runs.values()].filter((h) => h.info.phaseId === phaseId);
  }

  of(phaseId: string): RunInfo[] {
    return [...this.runs.values()].filter((h) => h.info.phaseId === phaseId).map((h) => ({ ...h.info }));
  }

  get(phaseId: string, id: string): RunHandle {
    const h = this.runs.get(id);
    if (!h || h.info.phaseId !== phaseId) {
      throw new SandboxdError("SBX_ERR_EXEC_NOT_FOUND", `no command ${id} runs in phase ${phaseId}`, { details: { id, phaseId } });
    }
    return h;
  }
}
