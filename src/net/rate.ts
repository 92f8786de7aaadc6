/**
 * A token bucket: `burst` at once, refilled at `perSecond`. Used where a loop
 * inside the sandbox could otherwise make the daemon write a durable record
 * per attempt and fill the audit disk (tunnel connections, refused
 * connections); what is over the rate is counted and recorded as a summary.
 */
export class TokenBucket {
  private tokens: number;
  private at = 0;

  constructor(
    readonly burst: number,
    readonly perSecond: number,
    private readonly monotonicMs: () => number,
  ) {
    this.tokens = burst;
  }

  /** Takes one token; false when the bucket is empty. */
  take(): boolean {
    const now = this.monotonicMs();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.at) / 1000) * this.perSecond);
    this.at = now;
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }
}
