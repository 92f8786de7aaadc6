/**
 * One streaming consumer's share of a phase's flow control.
 *
 * Invariants (test/unit/flow.test.ts):
 * - it holds at most one pause of the channel at a time;
 * - `close()` releases whatever it holds, and after it nothing it is asked
 *   can pause the channel again (a late write to a departed client cannot
 *   re-pause a link nobody will resume);
 * - whatever else pauses or resumes the channel, this consumer releases
 *   only its own pause.
 * - once bound to its exec (`bind`), its pause is that exec's alone when the
 *   shim can pause one exec ("execflow"): a slow client of one command does
 *   not hold up another's output or exit (it once made a concurrent `echo`
 *   wait 60 s and be answered SBX_ERR_SHIM_LOST).
 */
export interface PauseGate {
  /** `execId`: the exec whose output this consumer takes, when known */
  hold(consumer: object, execId?: number): void;
  release(consumer: object): void;
}

export class FlowConsumer {
  private holding = false;
  private closed = false;
  private execId: number | undefined;

  constructor(private readonly gate: PauseGate | null) {}

  /** The consumer cannot take more now: stop reading from the shim until it drains. */
  pause(): void {
    if (this.closed || this.holding || !this.gate) return;
    this.holding = true;
    this.gate.hold(this, this.execId);
  }

  /** The exec this consumer takes output from: its pause is that exec's from now on. */
  bind(execId: number): void {
    if (this.closed || this.execId !== undefined) return;
    this.execId = execId;
    if (this.holding) this.gate?.hold(this, execId); // held before the exec was sent: now it is its own
  }

  /** The consumer drained. */
  resume(): void {
    if (!this.holding) return;
    this.holding = false;
    this.gate?.release(this);
  }

  /** The consumer is gone or its exec answered: release for good. */
  close(): void {
    this.closed = true;
    this.resume();
  }

  get isHolding(): boolean {
    return this.holding;
  }

  get isClosed(): boolean {
    return this.closed;
  }
}
