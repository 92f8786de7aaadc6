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
 */
export interface PauseGate {
  hold(consumer: object): void;
  release(consumer: object): void;
}

export class FlowConsumer {
  private holding = false;
  private closed = false;

  constructor(private readonly gate: PauseGate | null) {}

  /** The consumer cannot take more now: stop reading from the shim until it drains. */
  pause(): void {
    if (this.closed || this.holding || !this.gate) return;
    this.holding = true;
    this.gate.hold(this);
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
