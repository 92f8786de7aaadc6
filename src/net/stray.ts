/**
 * Connections from a sandbox to anything that is not a service: another
 * port, another host, a host address. The kernel refuses them at once and
 * the daemon's conntrack watch sees each (src/runtime/netns.ts); this
 * records each as a refused `net.connect` event.
 *
 * Rate-limited like the tunnels: a loop of connects must not fill the audit
 * disk. Over the rate, refusals are counted and recorded as one summary a
 * second.
 */
import type { Logger } from "pino";
import { actionLine, timestamp } from "../audit/format.js";
import type { PhaseRecorder } from "../phases/recorder.js";
import type { RefusedConnection } from "../runtime/netns.js";
import type { Clock } from "../util/clock.js";
import { TokenBucket } from "./rate.js";
import { NETWORK_CLAUSE, listenList, unavailableAt, type PhaseServices } from "./services.js";

/** Where TCP to non-loopback addresses is redirected inside a phase container: nothing can listen there. */
export const DEAD_PORT = 1;

export const STRAY_RULE = "net.unlisted-destination";
const RATE_BURST = 100;
const RATE_PER_SECOND = 20;

export interface StrayOptions {
  phaseId: string;
  rec: PhaseRecorder;
  clock: Clock;
  log: Logger;
  /**
   * The phase's services: those it has are named in the refusal ("postgres
   * 127.0.0.1:5432, …"); a refused connection to the port of one it is listed
   * for but does not have (nothing listens there) is recorded with that
   * service's rule and reason.
   */
  services: () => PhaseServices;
}

export class StrayConnections {
  private readonly bucket: TokenBucket;
  private lastLossAt = -Infinity;
  private dropped = 0;
  private timer: NodeJS.Timeout | null = null;

  constructor(private readonly opts: StrayOptions) {
    this.bucket = new TokenBucket(RATE_BURST, RATE_PER_SECOND, () => opts.clock.monotonicMs());
  }

  /** Records one refused connection (or counts it, over the rate). */
  refused(m: RefusedConnection): void {
    if (!this.bucket.take()) {
      this.dropped++;
      this.timer ??= setTimeout(() => this.flush(), 1000);
      return;
    }
    const services = this.opts.services();
    const unavailable = unavailableAt(services, m.address, m.port);
    let target = `${m.address}:${m.port}`;
    let rule = STRAY_RULE;
    let clause = NETWORK_CLAUSE;
    let reason: string;
    if (unavailable) {
      // a service the policy lists, not configured for this phase: its own refusal
      target = `${unavailable.name} ${target}`;
      rule = unavailable.rule;
      clause = unavailable.clause;
      reason = `${m.proto} connection to ${unavailable.name} refused (nothing listens for it): ${unavailable.refusal ?? `${unavailable.name} has no upstream`}`;
    } else {
      const listed = listenList(services).map((s) => `${s.name} 127.0.0.1:${s.port}`).join(", ") || "none";
      reason = `${m.proto} connection to ${target} refused: not a service this phase may use (services: ${listed})`;
    }
    void this.opts.rec
      .record(
        {
          type: "net.connect",
          service: unavailable?.name ?? null,
          proto: m.proto,
          address: m.address,
          port: m.port,
          decision: "forbid",
          rule,
          clause,
          reason,
        },
        [actionLine(timestamp(this.opts.clock.now()), "NET", "CONNECT", target, `FORBID ${rule} (${clause}): ${reason}`)],
      )
      .catch((e: Error) => this.opts.log.error({ phase: this.opts.phaseId, err: e.message }, "could not record a refused connection"));
    this.opts.log.info({ phase: this.opts.phaseId, target }, "stray connection refused");
  }

  /**
   * The watch lost events (the kernel could not hand them all over): some
   * refused connections went unrecorded. Said once a second at most.
   */
  lost(what: string): void {
    const now = this.opts.clock.monotonicMs();
    if (now - this.lastLossAt < 1000) return;
    this.lastLossAt = now;
    const reason = `conntrack lost events, so some refused connections went unrecorded (they were still refused): ${what}`;
    void this.opts.rec
      .record({ type: "net.watch", lost: true, rule: STRAY_RULE, clause: NETWORK_CLAUSE, reason }, [
        actionLine(timestamp(this.opts.clock.now()), "NET", "WATCH", "conntrack", `LOST EVENTS: ${reason}`),
      ])
      .catch((e: Error) => this.opts.log.error({ phase: this.opts.phaseId, err: e.message }, "could not record lost watch events"));
  }

  /** Records what is still counted; call when the phase ends. */
  close(): void {
    if (this.timer) clearTimeout(this.timer);
    this.flush();
  }

  private flush(): void {
    this.timer = null;
    const n = this.dropped;
    this.dropped = 0;
    if (n === 0) return;
    const reason = `${n} more connection(s) to destinations that are not services refused (over ${RATE_PER_SECOND}/s, burst ${RATE_BURST}; not recorded one by one)`;
    void this.opts.rec
      .record({ type: "net.connect", service: null, port: null, decision: "forbid", rule: STRAY_RULE, clause: NETWORK_CLAUSE, reason, count: n }, [
        actionLine(timestamp(this.opts.clock.now()), "NET", "CONNECT", "*", `FORBID ${STRAY_RULE}: ${reason}`),
      ])
      .catch((e: Error) => this.opts.log.error({ phase: this.opts.phaseId, err: e.message }, "could not record refused connections"));
  }
}
