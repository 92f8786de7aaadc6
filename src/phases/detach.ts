/**
 * A planned restart that keeps phases running (`sandboxd stop
 * --keep-phases`): the daemon leaves, its phases' containers, shims and
 * workspace layers stay, and the next daemon re-adopts them (reconcile.ts,
 * as after a crash, but with nothing left open).
 *
 * What happens to work in flight, in order:
 *  1. new work is refused (SBX_ERR_SHUTTING_DOWN);
 *  2. commands running now get `drainMs` to end by themselves;
 *  3. those still running are cancelled (recorded `exec.cancel`, note
 *     "planned daemon restart"; SIGTERM, SIGKILL after the kill grace) —
 *     the shim would end them anyway when its link drops, but this way each
 *     gets its result recorded and answered to its client (a streamed exec
 *     gets its `exit` event, `cancelled` set) before connections close;
 *     background jobs are commands too, and end the same way;
 *  4. execs waiting for a person's approval are answered as a wait that
 *     ended without a decision (SBX_ERR_POLICY_NEEDS_APPROVAL with the
 *     approval id; the request stays pending in the persisted queue, and the
 *     next daemon can decide it);
 *  5. each phase's trail gets `phase.detach`; its control socket, tunnels
 *     and watches close (the shim keeps redialling), its layer stays mounted.
 *
 * Only running phases can be kept: an escalated or paused one (a frozen
 * container) or one starting or stopping is refused up front, with the
 * list, so a person decides (resume, abort or stop it, or stop the daemon
 * without --keep-phases). A start still in its first steps (not yet listed)
 * is refused by the shutdown and waited for before anything is detached.
 */
import { actionLine, quoteArgv, timestamp } from "../audit/format.js";
import { SandboxdError } from "../errors.js";
import type { PhaseContext } from "./context.js";

export const DEFAULT_DRAIN_MS = 10_000;

export async function detachAll(ctx: PhaseContext, drainMs: number): Promise<string[]> {
  const notRunning = [...ctx.phases.values()].filter((l) => l.record.state !== "running" || l.ending !== null);
  if (notRunning.length) {
    throw new SandboxdError(
      "SBX_ERR_SHUTDOWN_REFUSED",
      `a planned restart keeps only running phases; ${notRunning.map((l) => `${l.record.id} is ${l.record.state}`).join(", ")}`,
      {
        hint: "resume, abort or stop those phases first, or stop the daemon without --keep-phases (which stops every phase)",
        details: { phases: notRunning.map((l) => ({ id: l.record.id, state: l.record.state })) },
      },
    );
  }
  ctx.shuttingDown = true;
  // Starts past their gate when the refusal began, not yet listed as phases (so the check above
  // could not see them): each fails at its next check and cleans up after itself. Waited for, so
  // that happens while the daemon still serves, records and answers, and nothing of it is left.
  // (One listed as starting was refused above; none can become running after the flag is set.)
  await Promise.allSettled([...ctx.starts]);
  // the warm pool's unclaimed containers are not left for the next daemon (its reconcile would remove them)
  await ctx.pool.close();
  // and the spare layer disk: a phase of the next daemon never gets one this daemon made
  await ctx.spare.close();
  const ids = [...ctx.phases.keys()];

  // 2-3: commands end by themselves, or are cancelled after the drain
  const deadline = ctx.opts.clock.monotonicMs() + drainMs;
  while (ids.some((id) => ctx.runs.of(id).length > 0) && ctx.opts.clock.monotonicMs() < deadline) {
    await new Promise((r) => setTimeout(r, 100));
  }
  for (const id of ids) {
    const live = ctx.phases.get(id);
    if (!live) continue;
    for (const run of ctx.runs.of(id)) {
      const h = ctx.runs.get(id, run.id);
      const at = timestamp(ctx.opts.clock.now());
      const note = "planned daemon restart (--keep-phases)";
      await live.rec.record({ type: "exec.cancel", id: run.id, background: run.background, argv: run.argv, command: run.command, note }, [
        actionLine(at, "SHELL", "CANCEL", run.argv ? quoteArgv(run.argv) : (run.command ?? ""), `${run.id} by the daemon: ${note}`),
      ]);
      h.cancel(at, note);
    }
  }
  // 4: waits for a person end now, as a wait without a decision
  for (const id of ids) {
    for (const a of ctx.opts.approvals.list({ phaseId: id })) if (ctx.opts.approvals.waiting(a.id) > 0) ctx.opts.approvals.announce(a.id);
  }
  // every exec call answered and its result recorded (a cancelled one ends within its kill grace)
  await Promise.allSettled([...ctx.inflight]);

  // 5: leave each phase as it runs
  for (const id of ids) {
    const live = ctx.phases.get(id);
    if (!live) continue;
    const warn = (what: string) => (e: Error) => ctx.log.warn({ phase: id, err: e.message }, what);
    await live.rec
      .record({ type: "phase.detach", name: live.record.name, reason: "planned daemon restart (--keep-phases)" }, [
        actionLine(timestamp(ctx.opts.clock.now()), "PHASE", "DETACH", `${live.record.name} (${id})`, "planned daemon restart: the phase keeps running; the next daemon re-adopts it"),
      ])
      .catch(warn("could not record the detach"));
    // the shim is not told to shut down: it sees its link drop and redials until the next daemon listens
    await live.channel?.close({ shutdownShim: false });
    await live.tunnels?.close().catch(warn("closing the tunnels failed"));
    live.watch?.stop();
    live.watch = null;
    live.stray?.close();
    await ctx.buildLogs.release(live.record.buildLog, id).catch(warn("releasing the build log failed"));
    ctx.phases.delete(id);
    ctx.opts.logSecrets?.remove(id);
    ctx.log.info({ phase: id }, "phase detached for a planned restart");
  }
  return ids;
}
