/**
 * After a restart, the daemon reconciles what its records say with what
 * Docker reports: a running phase whose shim reconnects is re-adopted,
 * everything else this instance created is ended (recorded) and removed.
 * The decision for each phase is `reconcileAction`, a pure function of the
 * record and the container; the rest carries it out.
 */
import type { BuildLog } from "../audit/buildlog.js";
import { actionLine, quoteArgv, timestamp } from "../audit/format.js";
import type { AuditRecord } from "../audit/journal.js";
import { readRecords } from "../audit/read.js";
import { resolveServices } from "../net/services.js";
import { loadPolicy } from "../policy/index.js";
import { LABELS, type ContainerSummary } from "../runtime/types.js";
import type { LivePhase, PhaseContext } from "./context.js";
import { FailFastState, failFastSnapshotSchema, type FailFastSnapshot } from "./failfast.js";
import { watchResources } from "./resources.js";
import { acquirePackages, endPhase, openChannel, saveContainerLogs, startRecord } from "./lifecycle.js";
import { confineNetwork, openTunnels } from "./network.js";
import { readFile } from "node:fs/promises";
import dotenv from "dotenv";
import { makeWorkspace } from "./workspace.js";
import { destroySlot } from "./pool.js";
import { splitDotenv } from "../policy/env.js";
import { isTerminal } from "./state.js";
import type { PhaseRecord } from "./types.js";

export interface ReconcileReport {
  readopted: string[];
  reaped: Array<{ id: string; reason: string }>;
  lost: string[];
  /** a dead daemon's warm pool, removed: slot folders and containers no phase claimed */
  pool?: { slots: number; containers: number };
}

/** What reconcile does with one phase, given its record (if any) and its container (if any). */
export type ReconcileAction =
  /**
   * a running phase and its running container: reconnect the shim and carry on;
   * an escalated or paused phase and its (frozen) container: taken back frozen,
   * its counters and report as they were, the shim reconnecting at its resume
   */
  | { kind: "readopt" }
  /**
   * end it as failed and remove the container: a phase whose container is not
   * running, one that was stopping, or one that was still starting (its client
   * never learned it started: the start call died with the daemon)
   */
  | { kind: "end"; why: string }
  /** the phase already ended; only its container was left: keep its log, remove it */
  | { kind: "remove-ended" }
  /** a container of this instance with no record: remove it */
  | { kind: "remove-orphan" }
  /** a live record whose container is gone: end it as failed */
  | { kind: "lost"; why: string }
  /** an ended phase with nothing left behind */
  | { kind: "none" };

export function reconcileAction(record: PhaseRecord | undefined, container: Pick<ContainerSummary, "running" | "state"> | undefined): ReconcileAction {
  if (!record) return container ? { kind: "remove-orphan" } : { kind: "none" };
  if (isTerminal(record.state)) return container ? { kind: "remove-ended" } : { kind: "none" };
  if (!container) {
    return {
      kind: "lost",
      why: record.state === "starting" ? "the daemon stopped while the phase was starting, before its container existed" : "container vanished while the daemon was down",
    };
  }
  // Docker lists a frozen container as "paused" (it still runs)
  const alive = container.running || container.state === "paused";
  if (alive && (record.state === "running" || record.state === "escalated" || record.state === "paused")) return { kind: "readopt" };
  if (record.state === "starting") return { kind: "end", why: "the daemon stopped while the phase was starting; its client was never told it started" };
  return { kind: "end", why: container.running ? `record says ${record.state}` : `container had ${container.state}` };
}

export async function reconcile(ctx: PhaseContext): Promise<ReconcileReport> {
  const report: ReconcileReport = { readopted: [], reaped: [], lost: [] };
  const containers = await ctx.opts.runtime.list({ [LABELS.instance]: ctx.opts.instance });
  const { records, broken, unborn } = await ctx.store.loadAll();
  for (const b of broken) ctx.opts.log.warn({ phase: b.id, err: b.error }, "unreadable phase record skipped");
  const slots: string[] = [];
  for (const id of unborn) {
    if (await ctx.store.isSlot(id)) {
      // a warm pool's slot no phase claimed (pool.ts): its mounts go with it; its container, labelled, goes below
      slots.push(id);
      await destroySlot(ctx, id, { containerId: null, channel: null, watch: null });
      continue;
    }
    // its start was cut before its record existed: nothing else of it was made or recorded
    ctx.opts.log.info({ phase: id }, "removing the state of a phase whose start was cut before its record was written");
    await ctx.store.remove(id);
  }
  const byId = new Map(records.map((r) => [r.id, r]));
  const seen = new Set<string>();
  /** containers of the warm pool no phase claimed (they carry the pool label and have no record) */
  const poolContainers: string[] = [];

  await Promise.all(
    containers.map(async (c) => {
      const id = c.labels[LABELS.phase] ?? "";
      seen.add(id);
      const record = byId.get(id);
      const action = reconcileAction(record, c);
      switch (action.kind) {
        case "readopt": {
          const { live, refusal } = await revive(ctx, { ...record!, containerId: c.id });
          ctx.phases.set(id, live);
          try {
            if (refusal) throw new Error(refusal);
            await readopt(ctx, live);
            report.readopted.push(id);
          } catch (err) {
            await endPhase(ctx, live, "failed", `daemon restarted and the phase could not be re-adopted: ${(err as Error).message}`);
            report.reaped.push({ id, reason: "shim did not reconnect" });
          }
          return;
        }
        case "end": {
          const { live } = await revive(ctx, { ...record!, containerId: c.id });
          await recordStartIfCut(ctx, live);
          await endPhase(ctx, live, "failed", `reaped after daemon restart (${action.why})`);
          report.reaped.push({ id, reason: action.why });
          return;
        }
        case "remove-ended":
          await removeEnded(ctx, record!, c.id);
          report.reaped.push({ id, reason: `record says ${record!.state}` });
          return;
        case "remove-orphan":
          await ctx.opts.runtime.stopAndRemove(c.id, 0);
          if (c.labels[LABELS.pool] === "1") poolContainers.push(id || c.name);
          else report.reaped.push({ id: id || c.name, reason: "no phase record" });
          return;
        case "lost":
        case "none":
          return; // not reachable with a container
      }
    }),
  );

  for (const r of records) {
    const action = reconcileAction(r, undefined);
    if (seen.has(r.id) || action.kind !== "lost") continue;
    const { live } = await revive(ctx, { ...r, containerId: null });
    await recordStartIfCut(ctx, live);
    await endPhase(ctx, live, "failed", action.why);
    report.lost.push(r.id);
  }
  if (slots.length + poolContainers.length > 0) {
    report.pool = { slots: slots.length, containers: poolContainers.length };
    await ctx.opts.journal
      .append({ type: "pool.reaped", slots, containers: poolContainers, reason: "the daemon restarted; a warm pool's unclaimed containers are never handed to a phase of another daemon" })
      .catch((e: Error) => ctx.opts.log.error({ err: e.message }, "could not record the pool's reap"));
  }
  // package disks a dead daemon left mounted for phases that did not come back (src/workspace/packages.ts)
  await ctx.packages
    .sweep()
    .catch((e: Error) => ctx.opts.log.warn({ err: e.message }, "could not unmount the package disks of ended phases"));
  if (report.readopted.length + report.reaped.length + report.lost.length > 0) {
    ctx.opts.log.info(report, "reconciled phases after restart");
  }
  return report;
}

/**
 * A phase found `starting` at a restart: its start record is written right
 * after its state dir is made, before anything else of it exists; a daemon
 * killed in between left a phase with no start on record. It gets one now,
 * marked deferred, so the end record reconcile writes next has its start.
 */
async function recordStartIfCut(ctx: PhaseContext, live: LivePhase): Promise<void> {
  const { record } = live;
  if (record.state !== "starting") return;
  const mine = await readRecords(ctx.opts.stateDir, { phase: record.id });
  if (mine.some((r) => r.type === "phase.start")) return;
  const envReserved = splitDotenv(dotenv.parse(await readFile(ctx.store.dotenvPath(record.id), "utf8").catch(() => ""))).dropped;
  await live.rec.record(...startRecord(record, envReserved, ctx.opts.clock.now(), true));
}

async function readopt(ctx: PhaseContext, live: LivePhase): Promise<void> {
  const { record } = live;
  const token = await ctx.store.token(record.id);
  const channel = openChannel(ctx, live, token);
  await channel.listen();
  await openTunnels(ctx, live, token);
  // the layer's mounts outlive the daemon; what is missing is mounted again
  await live.workspace?.layer.reattach();
  await live.workspace?.watch();
  // counted again as a user of the project's package disk (still mounted, or mounted again)
  await acquirePackages(ctx, live, { readopted: true });
  const frozen = record.state !== "running" && record.containerId !== null && (await ctx.opts.runtime.isPaused(record.containerId));
  if (frozen) {
    // Escalated or paused: the container stays frozen for the person who will read
    // the report; its shim cannot reconnect until it thaws, so the resume does the rest.
    live.frozen = true;
    live.reattach = async () => {
      live.reattach = null;
      await channel.waitReady(ctx.connectTimeoutMs);
      await confineNetwork(ctx, live, { readopt: true });
    };
  } else {
    await channel.waitReady(ctx.connectTimeoutMs);
    await confineNetwork(ctx, live, { readopt: true });
    // a phase recorded escalated or paused whose container is not frozen (the daemon died between the two): frozen now
    if (record.state !== "running" && record.containerId) {
      await ctx.opts.runtime.pause(record.containerId);
      live.frozen = true;
    }
  }
  const counts = live.failFast.snapshot();
  const note = `daemon restarted; ${live.reattach ? `container kept frozen (${record.state}); the shim reconnects at resume` : "shim reconnected"}${Object.keys(counts).length ? `; fail-fast counters kept: ${Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(", ")}` : ""}`;
  await live.rec.record({ type: "phase.readopt", name: record.name, state: record.state, frozen: live.frozen, failFast: counts }, [
    actionLine(timestamp(ctx.opts.clock.now()), "PHASE", "READOPT", `${record.name} (${record.id})`, note),
  ]);
  await recordLostExecs(ctx, live);
  await watchResources(ctx, live);
}

/**
 * Commands that were allowed (their verdict is on record) but have no
 * result: the daemon died while they ran, and the shim ended them when its
 * link dropped. Each gets an `exec.lost` record with what is known, so no
 * verdict is left open. Verdicts and ends are paired by the command they
 * name, first come first served (a command run twice at once is ambiguous
 * only as to which verdict is whose, not as to how many were lost).
 */
export function lostVerdicts(records: readonly AuditRecord[]): AuditRecord[] {
  const key = (r: AuditRecord) => JSON.stringify([r.argv ?? null, r.command ?? null]);
  const open = new Map<string, AuditRecord[]>();
  for (const r of records) {
    if (r.type === "exec.verdict" && r.decision === "allow") {
      const k = key(r);
      open.set(k, [...(open.get(k) ?? []), r]);
    } else if (r.type === "exec.result" || r.type === "exec.error" || r.type === "exec.lost") {
      open.get(key(r))?.shift();
    }
  }
  return [...open.values()].flat().sort((a, b) => a.seq - b.seq);
}

async function recordLostExecs(ctx: PhaseContext, live: LivePhase): Promise<void> {
  const { record } = live;
  const lost = lostVerdicts(await readRecords(ctx.opts.stateDir, { phase: record.id }));
  if (lost.length === 0) return;
  const ts = timestamp(ctx.opts.clock.now());
  await live.rec.recordMany(
    lost.map((v) => ({
      event: {
        type: "exec.lost",
        argv: v.argv ?? null,
        command: v.command ?? null,
        verdictSeq: v.seq,
        verdictAt: v.ts,
        reason: "the daemon stopped while the command ran; the shim ends commands whose link drops, so it ended then, with no result recorded",
      },
      lines: [
        actionLine(
          ts,
          "SHELL",
          "EXEC",
          Array.isArray(v.argv) ? quoteArgv(v.argv as string[]) : String(v.command ?? ""),
          `LOST (verdict seq ${v.seq} at ${v.ts}): the daemon stopped while it ran; no result`,
        ),
      ],
    })),
  );
}

/** The container of a phase that had already ended: its log is kept beside the others, then it goes. */
async function removeEnded(ctx: PhaseContext, record: PhaseRecord, containerId: string): Promise<void> {
  await saveContainerLogs(ctx, { ...record, containerId }).catch((e: Error) =>
    ctx.opts.log.warn({ phase: record.id, err: e.message }, "could not keep container logs"),
  );
  await ctx.opts.runtime.stopAndRemove(containerId, 0);
  await ctx.store.removeRunDir(record.id);
}

/**
 * A phase's in-memory state rebuilt from its record after a restart. A phase
 * whose own policy can no longer be read is not re-adopted with a wider one:
 * `refusal` says why, and the caller ends the phase.
 */
async function revive(ctx: PhaseContext, record: PhaseRecord): Promise<{ live: LivePhase; refusal: string | null }> {
  // the .env the daemon read at phase start, kept in the state dir: the project's
  // file is never read again (the phase could have had a hand in it since)
  let refusal: string | null = null;
  const kept = await readFile(ctx.store.dotenvPath(record.id), "utf8").catch(() => null);
  if (kept === null) refusal = "the .env read at phase start was not kept in the state dir; it is not read again from the project";
  const text = kept ?? "";
  const vars = dotenv.parse(text);
  const log = await reopenAudit(ctx, record);
  const services = resolveServices(record.mode, vars, ctx.opts.serviceOverrides, ctx.opts.policy().network);
  const live: LivePhase = {
    record,
    channel: null,
    rec: ctx.recorder(record, log, text, vars),
    phasePolicy: null,
    dotenv: { ...splitDotenv(vars).kept, ...services.env },
    services,
    tunnels: null,
    stray: null,
    watch: null,
    failFast: await keptFailFast(ctx, record),
    frozen: false,
    workspace: null,
    ending: null,
  };
  if (record.policyFile) {
    try {
      live.phasePolicy = await loadPolicy(record.policyFile);
      live.services = resolveServices(record.mode, vars, ctx.opts.serviceOverrides, ctx.policyFor(live.phasePolicy).network);
    } catch (err) {
      refusal = `phase policy ${record.policyFile} unreadable after restart: ${(err as Error).message}`;
    }
  }
  try {
    live.workspace = await makeWorkspace(ctx, live);
    await live.workspace.load();
  } catch (err) {
    refusal ??= `the phase's workspace layer cannot be re-attached: ${(err as Error).message}`;
  }
  return { live, refusal };
}

/** The counters the phase had when the daemon stopped (failfast.json); fresh ones when none were kept or they cannot be read. */
async function keptFailFast(ctx: PhaseContext, record: PhaseRecord): Promise<FailFastState> {
  try {
    const raw = await ctx.store.loadFailFast(record.id);
    if (raw === null) return new FailFastState();
    return FailFastState.fromJSON(failFastSnapshotSchema.parse(raw) as FailFastSnapshot);
  } catch (err) {
    ctx.opts.log.warn({ phase: record.id, err: (err as Error).message }, "the kept fail-fast counters are unreadable; they start again at 0");
    return new FailFastState();
  }
}

/**
 * After a restart, a phase's log may have become unusable (removed and
 * replaced by something unsafe); then the record goes to the state dir,
 * so reconciling never fails for want of a log.
 */
async function reopenAudit(ctx: PhaseContext, record: PhaseRecord): Promise<BuildLog> {
  try {
    return await ctx.buildLogs.acquire(record.buildLog, record.id, 0o644);
  } catch (err) {
    const fallback = ctx.store.buildLogPath(record.id);
    ctx.opts.log.warn({ phase: record.id, path: record.buildLog, err: (err as Error).message, fallback }, "build log unusable; writing to the state dir");
    record.buildLog = fallback;
    return ctx.buildLogs.acquire(fallback, record.id);
  }
}
