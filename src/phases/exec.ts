/**
 * One command in a running phase: the policy's verdict (recorded before
 * anything runs), an approval consumed or requested, the run through the
 * shim with output scrubbed and capped as it arrives, and the result record.
 */
import { actionLine, escapeControl, quoteArgv, renderOutput, timestamp } from "../audit/format.js";
import type { Approval } from "../approvals/queue.js";
import { SandboxdError } from "../errors.js";
import { PARSE_RULE_ID, evaluateCommand, type Verdict } from "../policy/index.js";
import { SHIM_PATHS, type ExitMessage } from "../shim/protocol.js";
import { categorize, isPytest, toolOf, type FailureCategory, type TestCounts } from "./categorize.js";
import type { LivePhase, PhaseContext } from "./context.js";
import { countAttempt, escalate, recordAttempt } from "./escalation.js";
import { junitPathFor, readJunit } from "./junit.js";
import { commandEnv } from "./project.js";
import type { PhaseRecorder } from "./recorder.js";

/** Exactly one of argv (preferred: no shell) or command (parsed and judged part by part). */
export interface ExecRequest {
  argv?: string[] | undefined;
  command?: string | undefined;
  timeoutMs?: number | undefined;
  reason?: string | undefined;
}

/** Receives output as it arrives: UTF-8 text with secrets already scrubbed. */
export interface ExecSink {
  stdout(text: string): void;
  stderr(text: string): void;
}

export interface ExecResult {
  phaseId: string;
  argv: string[] | null;
  command: string | null;
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  durationMs: number;
  stdout: string;
  stderr: string;
  stdoutBytes: number;
  stderrBytes: number;
  stdoutTruncated: boolean;
  stderrTruncated: boolean;
  outputCapBytes: number;
  rule: { id: string; clause: string };
  /** SKILLS.md error category of a failed command (null: it succeeded), and how the fail-fast counters took it */
  failure: { category: FailureCategory; evidence: string; counted: boolean; count: number; limit: number | null } | null;
  /** pytest's counts, read from the JUnit report the daemon asked it for (null: not pytest, or no report) */
  tests: TestCounts | null;
  /** set when this command's failure reached a fail-fast limit: the phase is now escalated */
  escalation: { n: number; category: string; report: string; summary: string } | null;
}


/** Keeps the first `cap` UTF-8 bytes of a stream's (scrubbed) text; `total` counts the command's raw bytes. */
class CappedText {
  private parts: string[] = [];
  kept = 0;
  total = 0;
  truncated = false;
  constructor(private readonly cap: number) {}
  count(rawBytes: number): void {
    this.total += rawBytes;
  }
  push(text: string): void {
    if (text === "") return;
    const room = this.cap - this.kept;
    if (room <= 0) {
      this.truncated = true;
      return;
    }
    const bytes = Buffer.byteLength(text);
    if (bytes <= room) {
      this.parts.push(text);
      this.kept += bytes;
      return;
    }
    // cut at a character boundary within the room left
    const cut = Buffer.from(text).subarray(0, room).toString("utf8").replace(/\uFFFD$/, "");
    this.parts.push(cut);
    this.kept += Buffer.byteLength(cut);
    this.truncated = true;
  }
  text(limitBytes = this.cap): string {
    const all = this.parts.join("");
    if (limitBytes >= this.kept) return all;
    return Buffer.from(all).subarray(0, limitBytes).toString("utf8").replace(/\uFFFD$/, "");
  }
}


export async function exec(ctx: PhaseContext, id: string, req: ExecRequest, sink?: ExecSink, abort?: AbortSignal): Promise<ExecResult> {
  ctx.assertServing();
  const live = await ctx.running(id);
  const { record, rec } = live;
  const limits = ctx.limitsOf(live);
  const timeoutMs = req.timeoutMs ?? limits.defaultTimeoutMs;
  if (timeoutMs > limits.maxTimeoutMs) {
    throw new SandboxdError(
      "SBX_ERR_TIMEOUT_RANGE",
      `timeout ${timeoutMs} ms exceeds the ${limits.maxTimeoutMs} ms limit of a ${record.mode}-mode phase`,
    );
  }
  const input = req.argv ? { argv: req.argv } : { command: req.command ?? "" };
  let verdict: Verdict = evaluateCommand(ctx.policyFor(live.phasePolicy), input, { extraAllow: ctx.extraAllow });
  // What is shown in logs and errors: argv quoted, or the string as given; scrubbed, one line.
  const cmd = rec.redact(req.argv ? quoteArgv(req.argv) : (req.command ?? ""));
  const ts = () => timestamp(ctx.opts.clock.now());
  const key = { argv: req.argv, command: req.command };
  const what = { argv: req.argv ?? null, command: req.argv ? null : (req.command ?? null) };

  // An `ask` a human already approved for exactly this command runs once.
  let approval: Approval | null = null;
  if (verdict.decision === "ask") {
    approval = await ctx.opts.approvals.consume(id, key);
    if (approval) {
      verdict = { ...verdict, decision: "allow", reason: `approved by a human (${approval.id}${approval.note ? `: ${approval.note}` : ""})` };
    }
  }

  // The verdict is on disk, in both records, before anything runs.
  const reasonNote = req.reason ? ` reason=${JSON.stringify(req.reason)}` : "";
  const approvalNote = approval ? ` approval=${approval.id}` : "";
  await rec.record(
    {
      type: "exec.verdict",
      ...what,
      decision: verdict.decision,
      rule: verdict.ruleId,
      clause: verdict.clause,
      reason: verdict.reason,
      parts: verdict.parts.map((p) => ({ argv: p.argv, decision: p.decision, rule: p.ruleId })),
      approval: approval?.id ?? null,
      requestReason: req.reason ?? null,
      timeoutMs,
    },
    [
      `[${ts()}] SHELL_EXEC: ${escapeControl(cmd)}`,
      actionLine(ts(), "SHELL", "POLICY", cmd, `${verdict.decision.toUpperCase()} ${verdict.ruleId} (${verdict.clause})${approvalNote}${reasonNote}`),
    ],
  );
  if (verdict.decision === "ask") {
    const { approval: pending, created } = await ctx.opts.approvals.request(id, key, {
      ruleId: verdict.ruleId,
      clause: verdict.clause,
      policyReason: verdict.reason,
      requestReason: req.reason,
    });
    if (created) {
      await rec.record(
        { type: "approval.request", approval: pending.id, ...what, rule: verdict.ruleId, clause: verdict.clause, reason: verdict.reason },
        [actionLine(ts(), "APPROVAL", "REQUEST", cmd, `${pending.id} pending: ${verdict.reason}`)],
      );
      ctx.opts.log.info({ phase: id, approval: pending.id, command: cmd }, "approval requested");
    }
    await countRefusal(ctx, live, verdict, cmd);
    throw policyError(verdict, cmd, rec, pending.id);
  }
  if (verdict.decision !== "allow") {
    await countRefusal(ctx, live, verdict, cmd);
    throw policyError(verdict, cmd, rec);
  }

  // pytest is asked for a JUnit report in the container's /tmp, read back after it ends (junit.ts)
  const junit = isPytest(verdict.execArgv) ? junitPathFor() : null;
  const runArgv = junit ? [...verdict.execArgv, `--junitxml=${junit.inContainer}`] : verdict.execArgv;

  const channel = live.channel;
  if (!channel?.connected) {
    throw new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${id} is not connected`);
  }
  const out = new CappedText(limits.outputCapBytes);
  const err = new CappedText(limits.outputCapBytes);
  const outText = rec.outputStream();
  const errText = rec.outputStream();
  const started = ctx.opts.clock.monotonicMs();

  const outcome = await new Promise<{ exit?: ExitMessage; spawnError?: { code: string; message: string } }>(
    (resolve, reject) => {
      let execId = 0;
      // Backstop: the shim enforces the timeout; this catches a shim that stopped answering.
      const backstop = setTimeout(
        () => {
          channel.signal(execId, "SIGKILL");
          finish(() => reject(new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${id} did not report the end of the command`)));
        },
        timeoutMs + limits.killGraceMs + 10_000,
      );
      const onAbort = () => channel.signal(execId, "SIGKILL");
      let done = false;
      const finish = (fn: () => void) => {
        if (done) return;
        done = true;
        clearTimeout(backstop);
        abort?.removeEventListener("abort", onAbort);
        fn();
      };
      execId = channel.exec(
        {
          argv: runArgv,
          cwd: SHIM_PATHS.workspace,
          env: commandEnv(record, live.dotenv),
          timeoutMs,
          killGraceMs: limits.killGraceMs,
          uid: record.uid,
          gid: record.gid,
        },
        {
          onStarted: () => undefined,
          onStdout: (c) => {
            out.count(c.length);
            const text = outText.push(c);
            out.push(text);
            if (text) sink?.stdout(text);
          },
          onStderr: (c) => {
            err.count(c.length);
            const text = errText.push(c);
            err.push(text);
            if (text) sink?.stderr(text);
          },
          onExit: (exit) => finish(() => resolve({ exit })),
          onSpawnError: (code, message) => finish(() => resolve({ spawnError: { code, message } })),
          onLost: (e) => finish(() => reject(e)),
        },
      );
      // A client that goes away (Ctrl-C on a streaming exec) ends its command.
      if (abort?.aborted) onAbort();
      else abort?.addEventListener("abort", onAbort, { once: true });
    },
  ).catch(async (e: unknown) => {
    await rec
      .record({ type: "exec.error", ...what, error: (e as Error).message }, [
        actionLine(ts(), "SHELL", "EXEC", cmd, `ERROR ${(e as Error).message}`),
      ])
      .catch(() => undefined);
    throw e;
  });
  // Whatever the redactors held back (a possible secret prefix) is flushed, scrubbed.
  for (const [buf, stream, toSink] of [
    [out, outText, sink?.stdout.bind(sink)],
    [err, errText, sink?.stderr.bind(sink)],
  ] as const) {
    const rest = stream.end();
    buf.push(rest);
    if (rest) toSink?.(rest);
  }

  const durationMs = Math.round(ctx.opts.clock.monotonicMs() - started);
  let exitCode: number | null;
  let signal: string | null = null;
  let timedOut = false;
  if (outcome.spawnError) {
    // Same convention as a shell: 127 not found, 126 not executable.
    exitCode = outcome.spawnError.code === "ENOENT" ? 127 : 126;
    err.push(rec.redact(`sandboxd: cannot run ${verdict.execArgv[0]}: ${outcome.spawnError.message}\n`));
  } else {
    const exit = outcome.exit!;
    exitCode = exit.exitCode;
    signal = exit.signal;
    timedOut = exit.timedOut;
  }

  // Categorised only when it failed; pytest's report read whenever pytest ran (its counts are the phase report's).
  const tests = junit ? await readJunit(ctx, live, junit) : null;
  if (tests) live.failFast.lastTests = tests;
  const policy = ctx.policyFor(live.phasePolicy).failFast;
  const tool = toolOf(verdict.parts.length === 1 ? verdict.parts[0]!.argv : verdict.execArgv);
  const category =
    exitCode === 0 && !timedOut
      ? null
      : categorize({ argv: verdict.parts.length === 1 ? verdict.parts[0]!.argv : verdict.execArgv, exitCode, signal, timedOut, stdout: out.text(), stderr: err.text(), junit: tests, noTestsIsFailure: policy.noTestsIsFailure });
  let failure: ExecResult["failure"] = null;
  let reached: ReturnType<typeof countAttempt>["reached"] = null;
  if (category) {
    const o = countAttempt(ctx, live, {
      category: category.category,
      source: tool,
      action: cmd,
      result: timedOut ? "TIMEOUT" : exitCode === null ? `KILLED ${signal}` : `FAIL exit ${exitCode}`,
      evidence: category.evidence,
      lastError: lastError(err.text(), out.text()),
    });
    failure = { category: category.category, evidence: o.attempt.evidence, counted: o.counted, count: o.count, limit: o.limit };
    reached = o.reached;
  } else {
    live.failFast.succeed(tool);
  }
  if (VALIDATION_TOOLS.has(tool)) live.failFast.validation.set(tool, failure === null);
  const failNote = failure
    ? ` [${failure.category}${failure.counted ? ` ${failure.count}/${failure.limit}` : ""}: ${failure.evidence}]`
    : "";
  const testsNote = tests ? ` [tests: ${tests.passed} passed, ${tests.failures} failed, ${tests.errors} errors, ${tests.skipped} skipped of ${tests.tests}]` : "";

  const resultWord = timedOut
    ? `TIMEOUT after ${timeoutMs} ms`
    : exitCode === 0
      ? "PASS"
      : exitCode === null
        ? `KILLED ${signal}`
        : `FAIL exit ${exitCode}`;
  const auditCap = limits.auditOutputCapBytes;
  const auditOut = out.text(auditCap);
  const auditErr = err.text(auditCap);
  const notKept = (b: CappedText, kept: string) => Math.max(0, b.total - Buffer.byteLength(kept));
  await rec.record(
    {
      type: "exec.result",
      ...what,
      exitCode,
      signal,
      timedOut,
      durationMs,
      stdoutBytes: out.total,
      stderrBytes: err.total,
      stdout: auditOut,
      stderr: auditErr,
      category: failure?.category ?? null,
      evidence: failure?.evidence ?? null,
      failFast: failure ? { counted: failure.counted, count: failure.count, limit: failure.limit } : null,
      tests,
    },
    [
      `[${ts()}] RETURN_CODE: ${exitCode ?? `signal ${signal}`}${timedOut ? " (timeout)" : ""}`,
      ...renderOutput(ts(), "STDOUT", auditOut, notKept(out, auditOut)),
      ...renderOutput(ts(), "STDERR", auditErr, notKept(err, auditErr)),
      actionLine(ts(), "SHELL", "EXEC", cmd, resultWord + failNote + testsNote),
    ],
  );
  // after the result is on record: a limit reached escalates the phase (this result is still returned)
  const esc = reached ? await escalate(ctx, live, reached) : null;

  return {
    phaseId: id,
    // scrubbed like every other copy: the caller may have passed a secret as an argument
    argv: what.argv?.map((a) => rec.redact(a)) ?? null,
    command: what.command === null ? null : rec.redact(what.command),
    exitCode,
    signal,
    timedOut,
    durationMs,
    stdout: out.text(),
    stderr: err.text(),
    stdoutBytes: out.total,
    stderrBytes: err.total,
    stdoutTruncated: out.truncated,
    stderrTruncated: err.truncated,
    outputCapBytes: limits.outputCapBytes,
    rule: { id: verdict.ruleId, clause: verdict.clause },
    failure,
    tests,
    escalation: esc ? { n: esc.n, category: esc.category, report: esc.report, summary: esc.summary } : null,
  };
}

/** The tools of SKILLS.md build loop steps 3-4 ("Validate", "Run Tests"): their last result is the phase report's validation status. */
const VALIDATION_TOOLS: ReadonlySet<string> = new Set(["pytest", "mypy", "pylint", "black", "flake8", "isort"]);

/** A refusal is a failed attempt only when the policy says so (failFast.countPolicyRefusals; default no). */
async function countRefusal(ctx: PhaseContext, live: LivePhase, verdict: Verdict, cmd: string): Promise<void> {
  if (!ctx.policyFor(live.phasePolicy).failFast.countPolicyRefusals) return;
  await recordAttempt(ctx, live, {
    category: "policy",
    source: "policy",
    action: cmd,
    result: `${verdict.decision.toUpperCase()} ${verdict.ruleId}`,
    evidence: `${verdict.ruleId} (${verdict.clause})`,
    lastError: verdict.reason,
  });
}

/** What the escalation report shows as "Last Error": stderr, or stdout when stderr is empty; the last 16 KiB. */
function lastError(stderr: string, stdout: string): string {
  const text = stderr.trim() ? stderr : stdout;
  return text.length > 16_384 ? "…" + text.slice(-16_384) : text;
}

/** The refusal the caller gets: the rule, its SKILLS.md clause and what to do next. */
function policyError(verdict: Verdict, cmd: string, rec: PhaseRecorder, approvalId?: string): SandboxdError {
  const details = { rule: verdict.ruleId, clause: verdict.clause, decision: verdict.decision, ...(approvalId ? { approvalId } : {}) };
  const reason = rec.redact(verdict.reason);
  if (verdict.decision === "forbid") {
    const code = verdict.ruleId === PARSE_RULE_ID ? "SBX_ERR_COMMAND_PARSE" : "SBX_ERR_POLICY_DENIED";
    return new SandboxdError(code, `policy denied \`${cmd}\` (rule ${verdict.ruleId}, ${verdict.clause}): ${reason}`, {
      details,
    });
  }
  return new SandboxdError(
    "SBX_ERR_POLICY_NEEDS_APPROVAL",
    `policy requires approval for \`${cmd}\` (rule ${verdict.ruleId}, ${verdict.clause}): ${reason}`,
    {
      hint: approvalId
        ? `approval ${approvalId} is pending: a human can run \`sandboxd approvals approve ${approvalId}\`, then run the same command again (it may run once)`
        : "run a whitelisted command instead",
      details,
    },
  );
}
