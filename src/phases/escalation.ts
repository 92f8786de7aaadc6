/**
 * SKILLS.md Fail-Fast Protocol, the acting half: a failed attempt counted
 * (recordAttempt, the hook every source of failures calls: exec, the SQL
 * gateway, the checkpoint), a limit reached (escalate: the phase becomes
 * `escalated`, its container frozen, the Human Escalation Log written to
 * both logs and a file), and what a person does next (pause, resume,
 * abort). "1. STOP all execution 2. Generate a detailed error log 3. Report
 * to human supervisor 4. Await manual intervention" — done by the
 * supervisor, not left to the agent.
 */
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { actionLine, escapeControl, timestamp } from "../audit/format.js";
import { SandboxdError } from "../errors.js";
import type { FailureCategory, TestCounts } from "./categorize.js";
import type { LivePhase, PhaseContext } from "./context.js";
import { categoryTitle, escalationReport, memorySummary, recommend, type Attempt, type LimitReached, type Source } from "./failfast.js";
import { filesModified, unjudgedFiles } from "./workspace.js";
import { endPhase } from "./lifecycle.js";
import { transition } from "./state.js";
import type { Escalation, PhaseView } from "./types.js";

export interface AttemptInput {
  category: FailureCategory;
  source: Source;
  /** what was tried: a command, a statement, an iteration */
  action: string;
  /** what came of it */
  result: string;
  evidence: string;
  /** the full error (scrubbed by the caller or here), for the report's "Last Error" */
  lastError?: string;
  /** the tests that failed (pytest's report), which a later report can show passing */
  tests?: string[];
}

export interface AttemptOutcome {
  counted: boolean;
  /** consecutive failures of this category, this one included */
  count: number;
  limit: number | null;
  attempt: Attempt;
  /** set when this attempt escalated the phase */
  escalation: Escalation | null;
  /** the limit this attempt reached (escalate() takes it after the caller's record) */
  reached: LimitReached | null;
}

/** Count a failure without recording it: exec puts the outcome in its own exec.result record, then calls escalate. */
export function countAttempt(ctx: PhaseContext, live: LivePhase, a: AttemptInput): AttemptOutcome {
  const policy = ctx.policyFor(live.phasePolicy).failFast;
  if (a.lastError !== undefined) live.failFast.lastError = live.rec.redact(a.lastError);
  const r = live.failFast.fail(policy, {
    at: timestamp(ctx.opts.clock.now()),
    category: a.category,
    source: a.source,
    action: live.rec.redact(a.action),
    result: live.rec.redact(a.result),
    evidence: live.rec.redact(a.evidence),
    ...(a.tests?.length ? { tests: a.tests } : {}),
  });
  return { counted: r.counted, count: r.count, limit: r.limit, attempt: r.attempt, escalation: null, reached: r.reached };
}

/**
 * The counters on disk (failfast.json), so a daemon restarted after a crash
 * re-adopts the phase with the counts it had. Awaited before the answer that
 * reports them; a failed write is logged (the counts in memory still hold).
 */
export async function persistFailFast(ctx: PhaseContext, live: LivePhase): Promise<void> {
  await ctx.store
    .saveFailFast(live.record.id, live.failFast.toJSON())
    .catch((e: Error) => ctx.opts.log.error({ phase: live.record.id, err: e.message }, "could not keep the fail-fast counters"));
}

/**
 * The hook for failures that are not a command's result: an iteration
 * refused at a checkpoint (`{category: "iteration", source: "checkpoint"}`),
 * a database refusal or server error (`{category: "database", source:
 * "gateway"}`). Records a `failfast.attempt` and escalates at the limit.
 */
export async function recordAttempt(ctx: PhaseContext, live: LivePhase, a: AttemptInput): Promise<AttemptOutcome> {
  const out = countAttempt(ctx, live, a);
  if (out.counted) await persistFailFast(ctx, live);
  const ts = timestamp(ctx.opts.clock.now());
  await live.rec.record(
    {
      type: "failfast.attempt",
      category: a.category,
      evidence: out.attempt.evidence,
      source: a.source,
      action: out.attempt.action,
      result: out.attempt.result,
      counted: out.counted,
      count: out.count,
      limit: out.limit,
    },
    [actionLine(ts, "FAILFAST", "ATTEMPT", out.attempt.action, `${categoryTitle(a.category)}${out.counted ? ` ${out.count}/${out.limit}` : " (not counted)"}: ${out.attempt.evidence}`)],
  );
  if (out.reached) {
    // A failure seen while commands run (a database error from inside a script) stops the phase
    // when they end — freezing them mid-flight would leave their callers waiting for nothing.
    if ((live.channel?.runningExecs ?? 0) > 0) live.pendingEscalation = out.reached;
    else out.escalation = await escalate(ctx, live, out.reached);
  }
  return out;
}

/** A success of `source`: the counters its failures fed start again (recorded only when one did). */
export async function recordSuccess(ctx: PhaseContext, live: LivePhase, source: Source): Promise<FailureCategory[]> {
  const reset = live.failFast.succeed(source);
  if (reset.length > 0) await persistFailFast(ctx, live);
  return reset;
}

/**
 * A limit reached: the phase becomes `escalated` at once, with its
 * escalation (so the next call gets 423 and a view names it), the report is
 * written and recorded, then the container is frozen. Returns null when the phase is already escalated or ending.
 */
export async function escalate(ctx: PhaseContext, live: LivePhase, reached: LimitReached): Promise<Escalation | null> {
  const { record } = live;
  if (record.state !== "running" && record.state !== "paused") return null;
  live.pendingEscalation = null;
  const at = timestamp(ctx.opts.clock.now());
  const n = (record.escalations?.length ?? 0) + 1;
  const report = path.join(ctx.store.dir(record.id), `escalation-${n}.log`);
  const summary =
    reached.scope === "memory" && reached.memory
      ? memorySummary(reached.memory)
      : reached.scope === "category"
        ? `${reached.count} ${reached.category} failures in a row (limit ${reached.limit})`
        : `${reached.count} consecutive failed attempts (limit ${reached.limit}), the last ${reached.category}`;
  const esc: Escalation = { n, at, category: reached.scope === "memory" ? "memory" : reached.category, report, summary, resolved: null };
  // the state and its escalation change together: a view never shows `escalated` without it
  transition(record, "escalated");
  record.escalations = [...(record.escalations ?? []), esc];
  const tests: TestCounts | null = live.failFast.lastTests;
  const lines = escalationReport({
    phase: { id: record.id, name: record.name, mode: record.mode, project: record.project },
    reached,
    filesModified: filesModified(live),
    filesPending: await unjudgedFiles(ctx, live),
    lastError: reached.memory ? memorySummary(reached.memory) : live.failFast.lastError,
    tests,
    at,
  }).map((l) => escapeControl(live.rec.redact(l)));
  await writeFile(report, lines.join("\n") + "\n", { mode: 0o640 });
  await ctx.store.save(record);
  // on disk, in both records, before the container is touched
  await live.rec.record(
    {
      type: "phase.escalated",
      n,
      category: reached.category,
      scope: reached.scope,
      count: reached.count,
      limit: reached.limit,
      attempts: reached.attempts.map((a) => ({ ...a })),
      report,
      tests,
      memory: reached.memory ?? null,
      recommendation: recommend(reached, tests),
    },
    [actionLine(at, "PHASE", "ESCALATE", `${record.name} (${record.id})`, `${summary}; report ${report}`), ...lines],
  );
  await freeze(ctx, live);
  abandonRunning(ctx, live, esc);
  ctx.opts.log.warn({ phase: record.id, category: reached.category, report }, "phase escalated (fail-fast)");
  return esc;
}

/**
 * "STOP all execution": the commands still running when the phase escalated
 * are frozen with the container (a person can inspect them: docker top,
 * /proc), their SIGKILL is queued on the link (the frozen shim reads it the
 * moment the container thaws: at resume they die before anything else runs;
 * at abort the container is removed), and their callers get their answer
 * now — SBX_ERR_PHASE_ESCALATED naming the escalation and what became of
 * the command — instead of waiting for a result that will not come.
 */
function abandonRunning(ctx: PhaseContext, live: LivePhase, esc: Escalation): void {
  for (const run of ctx.runs.handles(live.record.id)) {
    const what = run.info.argv ? run.info.argv.join(" ") : (run.info.command ?? "");
    // the kill goes out now; a frozen shim reads it when the container thaws
    const fate = live.frozen ? "the command was frozen with the container and is killed when the phase resumes (removed with it on abort)" : "the container could not be frozen, so the command was killed now";
    run.abandon(
      new SandboxdError(
        "SBX_ERR_PHASE_ESCALATED",
        `phase ${live.record.id} escalated while \`${what}\` ran (escalation ${esc.n}: ${esc.summary}); ${fate}; it has no result. Report: ${esc.report}`,
        {
          hint: `read the report (\`sandboxd escalations show ${live.record.id}\`), then \`sandboxd phase resume ${live.record.id} --note …\` or \`sandboxd phase abort ${live.record.id}\``,
          details: { state: "escalated", escalation: esc.n, report: esc.report, category: esc.category, command: run.info.id, killed: live.frozen ? "when the phase resumes" : "now" },
        },
      ),
    );
  }
}

async function freeze(ctx: PhaseContext, live: LivePhase): Promise<void> {
  if (!live.record.containerId) return;
  try {
    await ctx.opts.runtime.pause(live.record.containerId);
    live.frozen = true;
  } catch (e) {
    // The 423 gate still holds every call; the container just is not frozen. Said in the trail.
    ctx.opts.log.error({ phase: live.record.id, err: (e as Error).message }, "could not freeze the container");
    await live.rec
      .record({ type: "phase.freeze-failed", error: (e as Error).message }, [
        actionLine(timestamp(ctx.opts.clock.now()), "PHASE", "FREEZE", `${live.record.name} (${live.record.id})`, `FAILED: ${(e as Error).message}`),
      ])
      .catch((re: Error) => ctx.opts.log.error({ phase: live.record.id, err: re.message }, "could not record the failed freeze"));
  }
}

function liveOf(ctx: PhaseContext, id: string): LivePhase {
  const live = ctx.phases.get(id);
  if (!live) throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} is not live (ended, or unknown to this daemon)`);
  return live;
}

/** A person freezes a running phase. */
export async function pausePhase(ctx: PhaseContext, id: string, note: string | null): Promise<PhaseView> {
  ctx.assertServing();
  const live = liveOf(ctx, id);
  transition(live.record, "paused");
  const at = timestamp(ctx.opts.clock.now());
  live.record.pausedBy = { at, note };
  await ctx.store.save(live.record);
  await live.rec.record({ type: "phase.paused", note }, [
    actionLine(at, "PHASE", "PAUSE", `${live.record.name} (${live.record.id})`, `by operator${note ? `: ${note}` : ""}`),
  ]);
  await freeze(ctx, live);
  return ctx.view(live.record);
}

/**
 * A person lets an escalated or paused phase go on: the container thaws; after
 * an escalation every fail-fast counter starts again. The note is audited.
 */
export async function resumePhase(ctx: PhaseContext, id: string, note: string | null): Promise<PhaseView> {
  ctx.assertServing();
  const live = liveOf(ctx, id);
  const { record } = live;
  const from = record.state;
  if (from !== "escalated" && from !== "paused") {
    throw new SandboxdError("SBX_ERR_PHASE_NOT_ESCALATED", `phase ${id} is ${from}; only an escalated or paused phase can be resumed`);
  }
  if (from === "escalated" && !note?.trim()) {
    throw new SandboxdError("SBX_ERR_VALIDATION", `resuming escalated phase ${id} needs a note: what the person decided after reading the report`, {
      hint: `sandboxd phase resume ${id} --note "fixed the fixture; go on"`,
    });
  }
  if (record.containerId) await ctx.opts.runtime.unpause(record.containerId);
  live.frozen = false;
  if (live.reattach) {
    // re-adopted frozen after a daemon restart: the thawed shim reconnects now
    try {
      await live.reattach();
    } catch (err) {
      await endPhase(ctx, live, "failed", `resumed after a daemon restart, but its shim did not reconnect: ${(err as Error).message}`);
      throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} could not be resumed: its shim did not reconnect after the daemon's restart (${(err as Error).message}); the phase ended failed, its reports kept`);
    }
  }
  const at = timestamp(ctx.opts.clock.now());
  const esc = from === "escalated" ? record.escalations?.at(-1) : undefined;
  if (esc) {
    esc.resolved = { at, how: "resumed", note };
    live.failFast.reset();
    await persistFailFast(ctx, live);
  }
  record.pausedBy = null;
  transition(record, "running");
  await ctx.store.save(record);
  await live.rec.record({ type: "phase.resumed", from, note, escalation: esc?.n ?? null, countersReset: esc !== undefined }, [
    actionLine(
      at,
      "PHASE",
      "RESUME",
      `${record.name} (${record.id})`,
      `by operator from ${from}${esc ? ` (escalation ${esc.n}; fail-fast counters reset)` : ""}${note ? `: ${note}` : ""}`,
    ),
  ]);
  return ctx.view(record);
}

/** A person ends the phase as failed; its reports stay. */
export async function abortPhase(ctx: PhaseContext, id: string, note: string | null): Promise<PhaseView> {
  const live = liveOf(ctx, id);
  const { record } = live;
  if (record.state === "stopping" || live.ending) throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} is already stopping`);
  const at = timestamp(ctx.opts.clock.now());
  const esc = record.state === "escalated" ? record.escalations?.at(-1) : undefined;
  if (esc) esc.resolved = { at, how: "aborted", note };
  await endPhase(ctx, live, "failed", `aborted by operator${note ? `: ${note}` : ""}`);
  return ctx.view(record);
}
