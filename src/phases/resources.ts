/**
 * The resource watch (SKILLS.md Resource Limits): the daemon follows each
 * phase container's memory cgroup (src/runtime/cgroup.ts) once a second.
 *
 *   - Memory: the working set (usage less inactive file cache) at or above
 *     `limits.memoryEscalateBytes` (1 GiB) for `limits.memorySustainMs`
 *     (30 s), through dips below it of at most a third of that (MemoryWindow),
 *     escalates the phase — ">1GB sustained → escalate" — with the figures
 *     in the report. Judged only while the
 *     phase runs; the window starts again after a pause or a resume, so a
 *     person who resumes a phase that still holds the memory sees it
 *     escalate again after the sustain time.
 *   - OOM kills: every rise of the kernel's oom_kill count is recorded
 *     (`resource.oom`, with the figures). The command that was running is
 *     charged in exec.ts, which reads the count before and after it: a
 *     failed command that saw a kill is a `runtime` failure, counted.
 *   - A container that is gone (its cgroup removed: it exited, for any
 *     reason, or was removed) ends the phase `failed` at once through the
 *     same road as a lost shim (lifecycle.ts containerLost), also while the
 *     phase is frozen and no link would notice.
 *
 * What can be missed: a spike shorter than a second between two samples
 * (the hard limit, `limits.memoryBytes`, still holds: the kernel OOM-kills
 * above it, and that kill is counted); OOM kills while the daemon is down
 * are recorded at the first sample after re-adoption, charged to no command.
 */
import { actionLine, timestamp } from "../audit/format.js";
import type { MemoryProbe, MemorySample } from "../runtime/types.js";
import { formatBytes } from "./categorize.js";
import type { LivePhase, PhaseContext } from "./context.js";
import { escalate } from "./escalation.js";
import type { MemoryFigures } from "./failfast.js";
import { containerLost } from "./lifecycle.js";

/** How often the cgroup is read. Reading four small files costs well under a millisecond. */
export const SAMPLE_MS = 1_000;

/**
 * "Sustained": at or above the threshold for the sustain time, through dips
 * below it no longer than a third of the sustain time (DIP_GRACE). With a
 * window that any single low sample restarted, a process that let go of its
 * memory for one second in every thirty held 1.5 GiB for ever without an
 * escalation (the attack review of issue 8). Pure, so the edges are
 * unit-tested.
 */
export const DIP_GRACE = 1 / 3;

export class MemoryWindow {
  private since: number | null = null;
  /** the last sample at or above the threshold */
  private lastOver = 0;
  private peak = 0;
  private samples = 0;

  /** One sample; the figures when the memory has stayed high long enough (then the window starts again). */
  observe(s: Pick<MemorySample, "workingSetBytes" | "usageBytes" | "limitBytes">, nowMs: number, thresholdBytes: number, sustainMs: number): MemoryFigures | null {
    if (s.workingSetBytes < thresholdBytes) {
      // a dip: the window holds while it is short, and starts again once it lasts
      if (this.since !== null && nowMs - this.lastOver > sustainMs * DIP_GRACE) this.reset();
      return null;
    }
    if (this.since === null) this.since = nowMs;
    this.lastOver = nowMs;
    this.samples += 1;
    this.peak = Math.max(this.peak, s.workingSetBytes);
    const overMs = nowMs - this.since;
    if (overMs < sustainMs) return null;
    const figures: MemoryFigures = {
      thresholdBytes,
      sustainMs,
      overMs,
      samples: this.samples,
      currentBytes: s.workingSetBytes,
      peakBytes: this.peak,
      usageBytes: s.usageBytes,
      limitBytes: s.limitBytes,
    };
    this.reset();
    return figures;
  }

  reset(): void {
    this.since = null;
    this.peak = 0;
    this.samples = 0;
  }
}

/** A phase's watch: its probe, the memory window, the last OOM count seen. */
export class PhaseResources {
  readonly window = new MemoryWindow();
  private timer: NodeJS.Timeout | null = null;
  private ticking = false;
  /** the last sample, for the phase view and the reports */
  last: MemorySample | null = null;

  constructor(
    readonly probe: MemoryProbe,
    private lastOom: number,
  ) {}

  /** The OOM count now (synchronous; exec reads it before and after a command); null when unreadable. */
  oomKills(): number | null {
    return this.probe.oomKills();
  }

  start(tick: () => Promise<void>): void {
    this.timer = setInterval(() => {
      if (this.ticking) return;
      this.ticking = true;
      // tick handles its own errors; this only keeps two from overlapping
      void tick().finally(() => (this.ticking = false));
    }, SAMPLE_MS);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** New OOM kills since the last look (and remembers them). */
  newOomKills(count: number): number {
    const d = count - this.lastOom;
    this.lastOom = Math.max(this.lastOom, count);
    return d > 0 ? d : 0;
  }
}

/**
 * Starts the watch of a phase whose container runs (at start and at
 * re-adoption). Where the cgroup cannot be read, the phase runs without
 * one and its trail says so (`resource.watch`, watching: false).
 */
export async function watchResources(ctx: PhaseContext, live: LivePhase): Promise<void> {
  const { record } = live;
  if (!record.containerId) return;
  if (ctx.opts.failFast === false) {
    await live.rec
      .record({ type: "resource.watch", watching: false, reason: "fail-fast is off in this daemon (SANDBOXD_BENCH_NO_FAILFAST=1, the benchmark's side-by-side run)" }, [
        actionLine(timestamp(ctx.opts.clock.now()), "RESOURCE", "WATCH", `${record.name} (${record.id})`, "OFF: fail-fast is off in this daemon (benchmark run)"),
      ])
      .catch((e: Error) => ctx.opts.log.error({ phase: record.id, err: e.message }, "could not record that the resource watch is off"));
    return;
  }
  const probe = await ctx.opts.runtime.memoryProbe(record.containerId, live.pid).catch((e: Error) => {
    ctx.opts.log.warn({ phase: record.id, err: e.message }, "no memory probe for the container");
    return null;
  });
  const first = probe ? await probe.sample().catch(() => null) : null;
  if (!probe || !first) {
    await live.rec
      .record({ type: "resource.watch", watching: false, reason: "the container's memory cgroup cannot be read by this daemon" }, [
        actionLine(timestamp(ctx.opts.clock.now()), "RESOURCE", "WATCH", `${record.name} (${record.id})`, "OFF: the container's memory cgroup cannot be read; only the hard limit applies"),
      ])
      .catch((e: Error) => ctx.opts.log.error({ phase: record.id, err: e.message }, "could not record that the resource watch is off"));
    return;
  }
  // kills before the watch began (a re-adopted phase: while the daemon was down) are recorded at the first tick
  const res = new PhaseResources(probe, 0);
  res.last = first;
  live.resources = res;
  ctx.opts.log.info({ phase: record.id, cgroup: probe.dir, version: probe.version }, "resource watch started");
  res.start(() => tick(ctx, live, res));
}

export function stopWatch(live: LivePhase): void {
  live.resources?.stop();
}

async function tick(ctx: PhaseContext, live: LivePhase, res: PhaseResources): Promise<void> {
  const { record } = live;
  if (live.ending) {
    res.stop();
    return;
  }
  let s: MemorySample | null;
  try {
    s = await res.probe.sample();
  } catch (err) {
    ctx.opts.log.warn({ phase: record.id, err: (err as Error).message }, "reading the container's memory failed");
    return;
  }
  if (live.ending) return;
  if (s === null) {
    // the cgroup is gone: so is the container (exited, killed, removed)
    res.stop();
    ctx.opts.log.warn({ phase: record.id }, "the container's cgroup is gone");
    await containerLost(ctx, live, "its container's cgroup disappeared");
    return;
  }
  res.last = s;
  const kills = res.newOomKills(s.oomKills);
  if (kills > 0) await recordOom(ctx, live, kills, s);
  if (record.state !== "running") {
    res.window.reset();
    return;
  }
  const limits = ctx.limitsOf(live);
  const figures = res.window.observe(s, ctx.opts.clock.monotonicMs(), limits.memoryEscalateBytes, limits.memorySustainMs);
  if (!figures) return;
  // STOP at once: the commands holding the memory are frozen with it, for a person to inspect
  await escalate(ctx, live, { scope: "memory", category: "runtime", count: figures.samples, limit: 0, attempts: [], memory: figures }).catch((e: Error) =>
    ctx.opts.log.error({ phase: record.id, err: e.message }, "could not escalate for memory"),
  );
}

async function recordOom(ctx: PhaseContext, live: LivePhase, kills: number, s: MemorySample): Promise<void> {
  const { record } = live;
  const running = live.channel?.runningExecs ?? 0;
  const limit = s.limitBytes === null ? "no limit" : `limit ${formatBytes(s.limitBytes)}`;
  await live.rec
    .record(
      {
        type: "resource.oom",
        kills,
        total: s.oomKills,
        workingSetBytes: s.workingSetBytes,
        usageBytes: s.usageBytes,
        limitBytes: s.limitBytes,
        runningExecs: running,
      },
      [
        actionLine(
          timestamp(ctx.opts.clock.now()),
          "RESOURCE",
          "OOM",
          `${record.name} (${record.id})`,
          `the kernel's OOM killer killed ${kills} process(es) in the container (${limit}; now ${formatBytes(s.workingSetBytes)} in use; ${running} command(s) running)`,
        ),
      ],
    )
    .catch((e: Error) => ctx.opts.log.error({ phase: record.id, err: e.message }, "could not record an OOM kill"));
  ctx.opts.log.warn({ phase: record.id, kills, total: s.oomKills }, "OOM kill in the container");
}
