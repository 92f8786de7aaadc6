/**
 * A phase's network: its service tunnels (and the SQL gateway behind the
 * PostgreSQL ones), and the confinement that makes every other connection
 * fail at once and be recorded.
 */
import path from "node:path";
import { actionLine, timestamp } from "../audit/format.js";
import { handleClient } from "../db/gateway.js";
import { sqlRulesFor } from "../db/policy-rules.js";
import { listenList } from "../net/services.js";
import { DEAD_PORT, StrayConnections } from "../net/stray.js";
import { TunnelServer, type GatewayHandoff } from "../net/tunnels.js";
import { confineNetwork as confineNamespace, RefusalWatch } from "../runtime/netns.js";
import type { LivePhase, PhaseContext } from "./context.js";
import { recordAttempt, recordSuccess } from "./escalation.js";
import { askSqlApproval } from "./sql-approval.js";
import type { Slot } from "./pool.js";

/** How long the conntrack watch may take to show it sees events (src/runtime/netns.ts). */
const WATCH_READY_MS = 5_000;

/**
 * The phase's service tunnels: a TunnelServer on <runDir>/tunnel.sock, and
 * the list of listeners the shim opens (sent after every welcome).
 */
export async function openTunnels(ctx: PhaseContext, live: LivePhase, token: string): Promise<void> {
  const id = live.record.id;
  live.tunnels = new TunnelServer({
    socketPath: path.join(ctx.store.runDir(id), "tunnel.sock"),
    token,
    phaseId: id,
    mode: live.record.mode,
    services: () => live.services,
    rec: live.rec,
    clock: ctx.opts.clock,
    log: ctx.opts.log,
    gateway: gatewayFor(ctx, live),
  });
  await live.tunnels.listen();
  live.stray = new StrayConnections({
    phaseId: id,
    rec: live.rec,
    clock: ctx.opts.clock,
    log: ctx.opts.log,
    services: () => live.services,
  });
  live.channel?.setServices(listenList(live.services));
}

/**
 * Makes every TCP connection in the container to an address outside
 * loopback fail at once (not at routing) and be tracked, so that the
 * shim's conntrack watch reports it (src/runtime/netns.ts). Where that
 * cannot be done (a daemon that is not root, an engine on another host)
 * the sandbox is no less closed — the kernel still refuses every such
 * connection — but those refusals go unrecorded; the audit trail says so.
 */
export async function confineNetwork(ctx: PhaseContext, live: LivePhase, opts: { readopt: boolean; pid?: Promise<number> } = { readopt: false }): Promise<void> {
  const { record } = live;
  let error: string | null = null;
  try {
    // (a start passes the pid it reads once for this and the workspace's view)
    const pid = await (opts.pid ?? ctx.opts.runtime.containerPid(record.containerId!));
    live.pid ??= pid;
    const watch = new RefusalWatch(
      pid,
      DEAD_PORT,
      (c) => live.stray?.refused(c),
      (why) => void watchEnded(ctx, live, why),
      (what) => live.stray?.lost(what),
    );
    live.watch = watch;
    // The watch subscribes while the rules go in (after a restart the namespace
    // keeps its rules; only the watch is new). Its readiness probe is answered
    // once both are in place: conntrack runs in the namespace from the NAT table on.
    const rulesIn = opts.readopt ? Promise.resolve() : confineNamespace(pid, { deadPort: DEAD_PORT });
    rulesIn.catch(() => watch.stop()); // no rules, no events: stop waiting for them at once
    const [rules, ready] = await Promise.allSettled([rulesIn, watch.ready(WATCH_READY_MS)]);
    if (rules.status === "rejected" || ready.status === "rejected") {
      watch.stop();
      live.watch = null;
      throw (rules.status === "rejected" ? rules.reason : (ready as PromiseRejectedResult).reason) as Error;
    }
    if (ctx.phases.get(record.id) !== live || record.state === "stopping" || record.state === "stopped" || record.state === "failed") {
      // the phase ended while the watch was starting: nothing is left to watch
      watch.stop();
      live.watch = null;
      return;
    }
  } catch (err) {
    error = (err as Error).message;
    ctx.opts.log.warn({ phase: record.id, err: error }, "connections to anything but services will be refused but not recorded");
  }
  const ts = timestamp(ctx.opts.clock.now());
  await live.rec.record(
    { type: "net.confine", deadPort: DEAD_PORT, recorded: error === null, ...(opts.readopt ? { readopt: true } : {}), ...(error ? { error } : {}) },
    [
      actionLine(ts, "NET", "CONFINE", `${record.name} (${record.id})`, error === null
        ? `TCP to any address but loopback → 127.0.0.1:${DEAD_PORT}; every refused connection recorded`
        : `DEGRADED: connections to anything but services are refused by the kernel but not recorded: ${error}`),
    ],
  );
}

/**
 * A phase that claimed a warm pool's container (pool.ts): the namespace was
 * confined and its watch started when the slot was filled; from now on the
 * watch reports to this phase. Recorded as a cold start's confinement is
 * (`pooled` says when it was done).
 */
export async function adoptConfinement(ctx: PhaseContext, live: LivePhase, slot: Pick<Slot, "watch" | "confineError" | "target" | "filledAt">): Promise<void> {
  const { record } = live;
  const error = slot.watch ? null : (slot.confineError ?? "the pooled container's conntrack watch ended before the claim");
  if (slot.watch) {
    live.watch = slot.watch;
    slot.target.refused = (c) => live.stray?.refused(c);
    slot.target.lost = (what) => live.stray?.lost(what);
    slot.target.end = (why) => void watchEnded(ctx, live, why);
  } else {
    live.watch = null;
    ctx.opts.log.warn({ phase: record.id, err: error }, "connections to anything but services will be refused but not recorded");
  }
  const ts = timestamp(ctx.opts.clock.now());
  await live.rec.record({ type: "net.confine", deadPort: DEAD_PORT, recorded: error === null, pooled: true, ...(error ? { error } : {}) }, [
    actionLine(ts, "NET", "CONFINE", `${record.name} (${record.id})`, error === null
      ? `TCP to any address but loopback → 127.0.0.1:${DEAD_PORT}; every refused connection recorded (confined when the warm pool made the container, ${slot.filledAt})`
      : `DEGRADED: connections to anything but services are refused by the kernel but not recorded: ${error}`),
  ]);
}

/** The conntrack watch of a running phase ended on its own: say so in its trail. */
export async function watchEnded(ctx: PhaseContext, live: LivePhase, why: string): Promise<void> {
  live.watch = null;
  // a phase still starting is recorded too: its confinement record (written before) said the
  // watch records, and its commands run as soon as it is ready
  if (live.record.state !== "running" && live.record.state !== "starting") return;
  ctx.opts.log.warn({ phase: live.record.id, why }, "conntrack watch ended; refused connections go unrecorded");
  await live.rec
    .record({ type: "net.confine", deadPort: DEAD_PORT, recorded: false, error: why }, [
      actionLine(timestamp(ctx.opts.clock.now()), "NET", "CONFINE", `${live.record.name} (${live.record.id})`, `DEGRADED: the conntrack watch ended (${why}); refused connections are no longer recorded`),
    ])
    .catch((e: Error) => ctx.log.error({ phase: live.record.id, err: e.message }, "could not record that the conntrack watch ended"));
}

/**
 * PostgreSQL-protocol tunnels end in the SQL gateway (src/db/gateway.ts):
 * it logs in upstream with the credentials of the URL chosen for the mode
 * (they stay in the daemon), judges every statement under the phase's
 * policy and records DB_QUERY / DB_RESULT / DB_ERROR.
 */
/**
 * SKILLS.md "Database Errors" (max 1 attempt): what the gateway records is
 * read here, so the gateway never imports the phases. A server error
 * (`db.error`: a query that does not run, a connection refused upstream) is
 * a `database` failure; a statement the policy refused (`db.query`, forbid)
 * is one only when the policy counts refusals (failFast.countPolicyRefusals),
 * as for commands; a result (`db.result`) resets the count.
 */
async function observeDb(ctx: PhaseContext, live: LivePhase, events: ReadonlyArray<Record<string, unknown>>): Promise<void> {
  for (const e of events) {
    if (live.record.state !== "running") return;
    if (e.type === "db.result") await recordSuccess(ctx, live, "gateway");
    const refused = e.type === "db.query" && e.decision === "forbid" && ctx.policyFor(live.phasePolicy).failFast.countPolicyRefusals;
    if (e.type !== "db.error" && !refused) continue;
    const what = e.type === "db.error" ? `${String(e.message ?? "error")}${e.sqlstate ? ` (SQLSTATE ${String(e.sqlstate)})` : ""}` : `refused by ${String(e.rule)}: ${String(e.reason ?? "")}`;
    await recordAttempt(ctx, live, {
      category: "database",
      source: "gateway",
      action: e.type === "db.query" ? `SQL: ${String(e.sql ?? "")}` : `SQL on ${String(e.engine ?? "database")} ${String(e.database ?? "")}`,
      result: e.type === "db.error" ? "DB_ERROR" : "REFUSED",
      evidence: what,
      lastError: what,
    });
  }
}

export function gatewayFor(ctx: PhaseContext, live: LivePhase): GatewayHandoff {
  return async (client, service) => {
    const url = new URL(service.url!);
    await handleClient(client, {
      engine: service.name === "questdb-pg" ? "questdb" : "postgres",
      mode: live.record.mode,
      upstream: {
        host: service.upstream!.host,
        port: service.upstream!.port,
        user: decodeURIComponent(url.username),
        password: decodeURIComponent(url.password),
        database: service.database ?? "",
      },
      // the gateway's records are also the fail-fast's view of the database (observeDb), after they are durable
      record: async (event, lines) => {
        await live.rec.record(event, lines);
        await observeDb(ctx, live, [event]);
      },
      // a chunk's statements and results are made durable together (one group commit, one build-log append)
      recordMany: async (entries) => {
        await live.rec.recordMany(entries);
        await observeDb(ctx, live, entries.map((e) => e.event));
      },
      redact: (text) => live.rec.redact(text),
      statementTimeoutMs: ctx.policyFor(live.phasePolicy).database.statementTimeoutMs.value,
      // a transaction block (and its idle time) is bounded at twice the query timeout: 60 s under SKILLS.md's 30 s
      maxTransactionMs: 2 * ctx.policyFor(live.phasePolicy).database.statementTimeoutMs.value,
      idleInTransactionTimeoutMs: 2 * ctx.policyFor(live.phasePolicy).database.statementTimeoutMs.value,
      rules: sqlRulesFor(ctx.policyFor(live.phasePolicy).database),
      askApproval: (req) => askSqlApproval(ctx, live, req),
      log: ctx.opts.log,
    });
  };
}
