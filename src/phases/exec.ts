/**
 * One command in a running phase: the policy's verdict (recorded before
 * anything runs), an approval consumed or requested, the run through the
 * shim with output scrubbed and capped as it arrives, and the result record.
 */
import { setTimeout as delay } from "node:timers/promises";
import path from "node:path";
import { mkdir } from "node:fs/promises";
import { actionLine, escapeControl, quoteArgv, renderOutput, timestamp } from "../audit/format.js";
import { bindFiles, filesRun } from "../approvals/binding.js";
import type { Grant } from "../approvals/grants.js";
import type { Approval, FileBinding } from "../approvals/queue.js";
import { SandboxdError } from "../errors.js";
import type { PhaseMode } from "../domain.js";
import { PARSE_RULE_ID, TIMEOUT_CEILING_MS, evaluateCommand, judgeTimeout, type Verdict } from "../policy/index.js";
import { seconds } from "../policy/timeout.js";
import { compileWorkspace, protects } from "../policy/workspace.js";
import { pipArgs, pipRunArgv } from "../workspace/packages.js";
import { MAX_FRAME_PAYLOAD, SHIM_PATHS, type ExecMessage, type ExitMessage } from "../shim/protocol.js";
import { categorize, isPytest, stderrDiscarded, toolOf, type FailureCategory, type TestCounts } from "./categorize.js";
import type { LivePhase, PhaseContext } from "./context.js";
import { countAttempt, escalate, persistFailFast, recordAttempt } from "./escalation.js";
import { junitPathFor, pytestAddopts, readJunit } from "./junit.js";
import { commandEnv, readProjectFile } from "./project.js";
import { COMPOSE_CHECK_CLAUSE, COMPOSE_CHECK_RULE_ID, checkComposeInputs, composeFile, hostArgv, judgeCompose, runCompose, type ComposeCall, type ComposeCheck } from "./compose.js";
import { checkpointBeforeValidation } from "./workspace.js";
import type { PhaseRecorder } from "./recorder.js";
import { checkEnv, checkStdin, resolveCwd } from "./exec-options.js";
import { RunHandle, newRunId } from "./runs.js";

/** Exactly one of argv (preferred: no shell) or command (parsed and judged part by part). */
export interface ExecRequest {
  argv?: string[] | undefined;
  command?: string | undefined;
  timeoutMs?: number | undefined;
  reason?: string | undefined;
  /**
   * When the policy asks a person: keep the request open this long for their
   * decision (approved: the command runs in this call; denied: the denial).
   */
  waitApprovalMs?: number | undefined;
  /** where it starts: relative to the workspace, or absolute under /workspace (default: the workspace) */
  cwd?: string | undefined;
  /** variables of its own, over the project's .env (reserved names refused: exec-options.ts) */
  env?: Record<string, string> | undefined;
  /** bytes for its stdin (default: none, /dev/null) */
  stdin?: Buffer | undefined;
  /** a background job (jobs.ts): recorded as such */
  background?: boolean | undefined;
  /** the id the command runs under (a job's id); default a new `ex_…` */
  runId?: string | undefined;
}

/** What a waiting exec waits for: said to the caller before the wait starts. */
export interface ApprovalWait {
  approvalId: string;
  /** the command as the person sees it (scrubbed) */
  command: string;
  rule: { id: string; clause: string };
  waitMs: number;
}

/**
 * Receives output as it arrives: the command's bytes with secrets already
 * scrubbed, never decoded (a chunk may end inside a UTF-8 character; the next
 * one goes on with it).
 */
export interface ExecSink {
  /** the command is running (its verdict is durable): a streaming client learns it at once, before any output */
  started?(info: { id: string; pid: number; rule: { id: string; clause: string } }): void;
  /** the command waits for a person's decision on this request (exec `waitApprovalMs`) */
  waiting?(info: ApprovalWait): void;
  /** scrubbed output, lent for the call (see ExecHandlers.onStdout in shim-channel.ts): retain it in outputPool or copy it to keep it */
  stdout(chunk: Buffer): void;
  stderr(chunk: Buffer): void;
  /** the channel's id of the command, once sent: a streaming client's flow control pauses that exec only */
  sent?(execId: number): void;
}

export interface ExecResult {
  /** the command's id (`ex_…`; a background job's `jb_…`), as listed while it ran */
  id: string;
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
  /** output kept: each stream's first and last outputCapBytes/2; the text marks where bytes were left out */
  stdoutTruncated: boolean;
  stderrTruncated: boolean;
  /** scrubbed bytes left out between the kept head and tail (0 when all is kept) */
  stdoutOmitted: number;
  stderrOmitted: number;
  outputCapBytes: number;
  rule: { id: string; clause: string };
  /** SKILLS.md error category of a failed command (null: it succeeded), and how the fail-fast counters took it */
  failure: { category: FailureCategory; evidence: string; counted: boolean; count: number; limit: number | null } | null;
  /** pytest's counts, read from the JUnit report the daemon asked it for (null: not pytest, or no report) */
  tests: TestCounts | null;
  /** set when this command's failure reached a fail-fast limit: the phase is now escalated */
  escalation: { n: number; category: string; report: string; summary: string } | null;
  /** a person or client cancelled it by id (it got SIGTERM, then SIGKILL after the grace) */
  cancelled: { at: string; note: string | null } | null;
}


/** The first `n` bytes of `buf`, not cutting a UTF-8 character in two. */
function headBytes(buf: Buffer, n: number): Buffer {
  if (buf.length <= n) return buf;
  let end = n;
  // inside a character: back to its first byte (at most 3 back: past that it is not UTF-8)
  while (end > 0 && end > n - 4 && (buf[end]! & 0xc0) === 0x80) end -= 1;
  return buf.subarray(0, end);
}

/** The last `n` bytes of `buf`, not cutting a UTF-8 character in two. */
function tailBytes(buf: Buffer, n: number): Buffer {
  if (buf.length <= n) return buf;
  let start = buf.length - n;
  const limit = start + 3;
  while (start < buf.length && start < limit && (buf[start]! & 0xc0) === 0x80) start += 1; // not inside a character
  return buf.subarray(start);
}

/**
 * One stream's (scrubbed) output, kept as its first `cap/2` and last `cap/2`
 * bytes: a long test run keeps its summary line and its list of failures,
 * which come last. Bytes are kept as they came and decoded only when the
 * text is asked for (the result, the audit record), cut at character
 * boundaries. `total` counts the command's raw bytes, `seen` the scrubbed
 * output's.
 */
export class HeadTailText {
  private head: Buffer | null = null;
  private headLen = 0;
  /** the rolling tail: a ring of tailCap bytes, made at the first byte past the head (nothing is allocated per chunk) */
  private ring: Buffer | null = null;
  /** where the oldest kept tail byte is in the ring */
  private ringStart = 0;
  private tailLen = 0;
  seen = 0;
  total = 0;
  private readonly headCap: number;
  private readonly tailCap: number;

  constructor(cap: number) {
    this.headCap = Math.floor(cap / 2);
    this.tailCap = cap - this.headCap;
  }

  count(rawBytes: number): void {
    this.total += rawBytes;
  }

  push(chunk: Buffer | string): void {
    let rest = typeof chunk === "string" ? Buffer.from(chunk, "utf8") : chunk;
    if (rest.length === 0) return;
    this.seen += rest.length;
    if (this.headLen < this.headCap) {
      this.head ??= Buffer.allocUnsafe(this.headCap);
      const take = Math.min(rest.length, this.headCap - this.headLen);
      rest.copy(this.head, this.headLen, 0, take);
      this.headLen += take;
      rest = rest.subarray(take);
      if (rest.length === 0) return;
    }
    const cap = this.tailCap;
    if (cap === 0) return;
    this.ring ??= Buffer.allocUnsafe(cap);
    if (rest.length >= cap) {
      rest.copy(this.ring, 0, rest.length - cap);
      this.ringStart = 0;
      this.tailLen = cap;
      return;
    }
    // write after the newest byte, wrapping; what does not fit pushes the oldest out
    const at = (this.ringStart + this.tailLen) % cap;
    const first = Math.min(rest.length, cap - at);
    rest.copy(this.ring, at, 0, first);
    if (first < rest.length) rest.copy(this.ring, 0, first);
    const over = this.tailLen + rest.length - cap;
    if (over > 0) {
      this.ringStart = (this.ringStart + over) % cap;
      this.tailLen = cap;
    } else this.tailLen += rest.length;
  }

  /** the kept tail, oldest byte first */
  private tailBuffer(): Buffer {
    if (!this.ring || this.tailLen === 0) return Buffer.alloc(0);
    const end = this.ringStart + this.tailLen;
    if (end <= this.tailCap) return this.ring.subarray(this.ringStart, end);
    return Buffer.concat([this.ring.subarray(this.ringStart), this.ring.subarray(0, end - this.tailCap)]);
  }

  get truncated(): boolean {
    return this.seen > this.headLen + this.tailLen;
  }

  /**
   * What is kept within `limit` bytes: all of it when it fits, else its first
   * and last `limit/2` bytes and how many bytes lie between.
   */
  view(limit = this.headCap + this.tailCap): { head: string; omitted: number; tail: string } {
    const head = this.head ? this.head.subarray(0, this.headLen) : Buffer.alloc(0);
    const tail = this.tailBuffer();
    // all kept (head and tail are contiguous): cut the view from the whole; else from each end
    const whole = this.truncated ? null : Buffer.concat([head, tail]);
    if (whole && whole.length <= limit) return { head: whole.toString("utf8"), omitted: 0, tail: "" };
    const hl = Math.floor(limit / 2);
    const h = headBytes(whole ?? head, hl);
    const t = tailBytes(whole ?? tail, limit - hl);
    return { head: h.toString("utf8"), omitted: this.seen - h.length - t.length, tail: t.toString("utf8") };
  }

  /** The kept text as one string, the bytes not kept marked where they were. */
  text(limit?: number): string {
    const v = this.view(limit);
    return v.omitted === 0 ? v.head : `${v.head}\n[… ${v.omitted} bytes not kept …]\n${v.tail}`;
  }
}

export function exec(ctx: PhaseContext, id: string, req: ExecRequest, sink?: ExecSink, abort?: AbortSignal): Promise<ExecResult> {
  return ctx.track(execOnce(ctx, id, req, sink, abort));
}

async function execOnce(ctx: PhaseContext, id: string, req: ExecRequest, sink?: ExecSink, abort?: AbortSignal): Promise<ExecResult> {
  ctx.assertServing();
  const live = await ctx.running(id);
  const { record, rec } = live;
  // Said before any verdict is recorded: an allowed verdict is always followed by its result or its error.
  if (!live.channel?.connected) {
    throw new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${id} is not connected`);
  }
  const limits = ctx.limitsOf(live);
  const timeoutMs = req.timeoutMs ?? limits.defaultTimeoutMs;
  if (timeoutMs > Math.max(limits.maxTimeoutMs, TIMEOUT_CEILING_MS)) {
    throw new SandboxdError(
      "SBX_ERR_TIMEOUT_RANGE",
      `timeout ${timeoutMs} ms exceeds the ${TIMEOUT_CEILING_MS} ms ceiling (SKILLS.md §2: 5 minutes); the limit of a ${record.mode}-mode phase is ${limits.maxTimeoutMs} ms`,
      {
        hint: timeoutHint(record.mode, limits.maxTimeoutMs),
        details: { timeoutMs, maxTimeoutMs: limits.maxTimeoutMs, ceilingMs: TIMEOUT_CEILING_MS, mode: record.mode, setting: `limits.modes.${record.mode}.maxTimeoutMs` },
      },
    );
  }
  // Over the mode's limit, within the ceiling: a person's call (src/policy/timeout.ts), bound to this timeout.
  const longTimeout = timeoutMs > limits.maxTimeoutMs;
  // what the command asks for beyond its argv, each refused with its own code before anything is recorded
  let cwd: Awaited<ReturnType<typeof resolveCwd>>;
  let ownEnv: Record<string, string>;
  let stdin: ReturnType<typeof checkStdin>;
  try {
    cwd = await resolveCwd(live, req.cwd);
    ownEnv = checkEnv(live, req.env);
    stdin = checkStdin(live, req.stdin);
  } catch (e) {
    // a directory out of the workspace or a reserved variable is an attempt worth a record (never the values)
    if (e instanceof SandboxdError && (e.code === "SBX_ERR_EXEC_CWD" || e.code === "SBX_ERR_ENV_RESERVED")) {
      const shown = rec.redact(req.argv ? quoteArgv(req.argv) : (req.command ?? ""));
      await rec.record(
        { type: "exec.refused", argv: req.argv ?? null, command: req.argv ? null : (req.command ?? null), code: e.code, cwd: req.cwd ?? null, env: Object.keys(req.env ?? {}).sort(), message: e.message },
        [actionLine(timestamp(ctx.opts.clock.now()), "SHELL", "EXEC", shown, `REFUSED ${e.code}: ${rec.redact(e.message)}`)],
      );
    }
    throw e;
  }
  const runId = req.runId ?? newRunId(false);
  const env = commandEnv(record, { ...live.dotenv, ...ownEnv });
  const execBase = {
    cwd: cwd.inContainer,
    env,
    timeoutMs,
    killGraceMs: limits.killGraceMs,
    uid: record.uid,
    gid: record.gid,
    ...(req.stdin !== undefined ? { stdin: req.stdin.toString("base64") } : {}),
  };
  checkExecSize({ argv: req.argv ?? ["/bin/sh", "-c", req.command ?? ""], ...execBase });
  const input = req.argv ? { argv: req.argv } : { command: req.command ?? "" };
  let verdict: Verdict = evaluateCommand(ctx.policyFor(live.phasePolicy), input, { extraAllow: ctx.extraAllow });
  if (longTimeout) verdict = judgeTimeout(verdict, timeoutMs, limits.maxTimeoutMs, record.mode);
  // docker-compose runs on the host, and only in the grammar the daemon mediates (./compose.ts)
  const composed = judgeCompose(verdict);
  verdict = composed.verdict;
  let composeCall = composed.call;
  if (composeCall) {
    // what compose would start, resolved and checked on the host before the verdict is recorded (./compose.ts)
    const checked = await checkCompose(ctx, live);
    if (checked && "refused" in checked) {
      verdict = { ...verdict, decision: "forbid", ruleId: COMPOSE_CHECK_RULE_ID, clause: COMPOSE_CHECK_CLAUSE, reason: checked.refused };
      composeCall = null;
    } else if (checked) {
      composeCall = { ...composeCall, resolved: checked.resolved };
    }
  }
  // What is shown in logs and errors: argv quoted, or the string as given; scrubbed, one line.
  const cmd = rec.redact(req.argv ? quoteArgv(req.argv) : (req.command ?? ""));
  const ts = () => timestamp(ctx.opts.clock.now());
  const key = { argv: req.argv, command: req.command, timeoutMs: longTimeout ? timeoutMs : undefined };
  const what = { argv: req.argv ?? null, command: req.argv ? null : (req.command ?? null) };

  // An `ask` a human already approved for exactly this command, with the same
  // content in the files it runs, runs once. A denied one stays denied.
  let approval: Approval | null = null;
  let grant: Grant | null = null;
  let denial: Approval | null = null;
  let stale: { approval: Approval; changed: string[] } | null = null;
  let files: FileBinding[] = [];
  if (verdict.decision === "ask") {
    // what will run is the phase's view of the project (src/workspace): an edit in the layer changes the hash
    const viewRoot = live.workspace ? await live.workspace.layer.viewRoot() : record.project;
    // a path the command names is read from where it starts (an approval of `sh x.sh` is not one of `sh sub/x.sh`)
    const named = cwd.relative ? filesRun(input).map((p) => path.posix.resolve(cwd.inContainer, p)) : filesRun(input);
    files = await bindFiles(named, (rel) => readProjectFile({ project: viewRoot }, rel));
    // the directory is part of what a person approves: `ls` approved in the workspace is not `ls` in another directory
    if (cwd.relative) files.push({ path: `${cwd.inContainer}/`, sha256: null, note: "working directory" });
    const approved = ctx.opts.approvals.approvedFor(id, key);
    if (approved) {
      const used = await ctx.opts.approvals.use(approved.id, files);
      if (used.changed.length === 0) {
        approval = used.approval;
        verdict = { ...verdict, decision: "allow", reason: `approved by a human (${approval.id}${approval.note ? `: ${approval.note}` : ""})` };
      } else {
        stale = used;
      }
    } else {
      // a standing approval of this phase or project, for this command with these files
      const covering = ctx.opts.grants?.covering({ phaseId: id, project: record.project }, verdict, files, longTimeout ? timeoutMs : undefined) ?? null;
      if (covering) {
        grant = await ctx.opts.grants!.use(covering.id, files);
        verdict = { ...verdict, decision: "allow", reason: `standing approval ${grant.id}${grant.note ? ` (${grant.note})` : ""}, until ${grant.expiresAt}` };
      } else {
        denial = await ctx.opts.approvals.deniedFor(id, key);
      }
    }
  }

  // The verdict is on disk, in both records, before anything runs.
  const reasonNote = req.reason ? ` reason=${JSON.stringify(req.reason)}` : "";
  const ownEnvNames = Object.keys(ownEnv).sort();
  // where it runs and what it was given, without the values (a variable or stdin may carry a secret)
  const startNote = [
    cwd.relative ? ` cwd=${JSON.stringify(cwd.relative)}` : "",
    ownEnvNames.length ? ` env=${ownEnvNames.join(",")}` : "",
    stdin ? ` stdin=${stdin.bytes}B sha256:${stdin.sha256.slice(0, 12)}` : "",
    req.background ? ` background=${runId}` : "",
  ].join("");
  const approvalNote = approval
    ? ` approval=${approval.id}`
    : grant
      ? ` grant=${grant.id}`
      : denial
      ? ` denied=${denial.id}`
      : stale
        ? ` stale=${stale.approval.id} changed=${stale.changed.join(",")}`
        : "";
  // the shim readies the command's cgroup while the verdict is made durable (nothing runs before it is)
  if (verdict.decision === "allow") live.channel?.prepare();
  const verdictRecord = await rec.record(
    {
      type: "exec.verdict",
      ...what,
      decision: verdict.decision,
      rule: verdict.ruleId,
      clause: verdict.clause,
      reason: verdict.reason,
      parts: verdict.parts.map((p) => ({ argv: p.argv, decision: p.decision, rule: p.ruleId })),
      approval: approval?.id ?? null,
      grant: grant?.id ?? null,
      deniedBy: denial?.id ?? null,
      staleApproval: stale ? { approval: stale.approval.id, changed: stale.changed } : null,
      files,
      requestReason: req.reason ?? null,
      timeoutMs,
      waitApprovalMs: req.waitApprovalMs ?? null,
      id: runId,
      cwd: cwd.relative || ".",
      env: ownEnvNames,
      stdin,
      background: req.background === true,
    },
    [
      `[${ts()}] SHELL_EXEC: ${escapeControl(cmd)}`,
      actionLine(ts(), "SHELL", "POLICY", cmd, `${verdict.decision.toUpperCase()} ${verdict.ruleId} (${verdict.clause})${approvalNote}${reasonNote}${escapeControl(startNote)}`),
    ],
  );
  if (denial) throw deniedError(denial, cmd, rec);
  if (stale) {
    await rec.record(
      { type: "approval.stale", approval: stale.approval.id, ...what, changed: stale.changed, files },
      [actionLine(ts(), "APPROVAL", "STALE", cmd, `${stale.approval.id} not used: ${stale.changed.join(", ")} changed since it was approved`)],
    );
  }
  if (verdict.decision === "ask") {
    const { approval: pending, created, reasonAdded } = await ctx.opts.approvals.request(
      id,
      key,
      { ruleId: verdict.ruleId, clause: verdict.clause, policyReason: verdict.reason, requestReason: req.reason },
      files,
    );
    if (created) {
      await rec.record(
        { type: "approval.request", approval: pending.id, ...what, rule: verdict.ruleId, clause: verdict.clause, reason: verdict.reason, requestReason: req.reason ?? null, files },
        [actionLine(ts(), "APPROVAL", "REQUEST", cmd, `${pending.id} pending: ${verdict.reason}${filesNote(files)}`)],
      );
      ctx.opts.log.info({ phase: id, approval: pending.id, command: cmd }, "approval requested");
      ctx.opts.notify?.(pending);
    } else if (reasonAdded) {
      await rec.record({ type: "approval.reason", approval: pending.id, ...what, reason: req.reason ?? null }, [
        actionLine(ts(), "APPROVAL", "REASON", cmd, `${pending.id}: ${req.reason ?? ""}`),
      ]);
    }
    if (req.waitApprovalMs) {
      const waitMs = req.waitApprovalMs;
      sink?.waiting?.({ approvalId: pending.id, command: cmd, rule: { id: verdict.ruleId, clause: verdict.clause }, waitMs });
      ctx.opts.log.info({ phase: id, approval: pending.id, waitMs }, "exec waits for a decision");
      const out = await ctx.opts.approvals.waitFor(pending.id, waitMs, abort);
      if (out.kind === "decided" && out.approval.state === "approved") {
        // Judged and bound again, as any retry: the approval is used only if the files it binds are unchanged.
        return exec(ctx, id, { ...req, runId, waitApprovalMs: undefined }, sink, abort);
      }
      if (out.kind === "decided" && out.approval.state === "denied") {
        await countRefusal(ctx, live, verdict, cmd);
        throw deniedError(out.approval, cmd, rec);
      }
      // no decision in time, the phase ended, or the caller left: the usual answer, with the id
    }
    // counted only once the command did not run after all (an approval mid-wait runs it above)
    await countRefusal(ctx, live, verdict, cmd);
    if (stale) throw staleError(stale, pending, cmd);
    throw policyError(verdict, cmd, rec, pending.id, longTimeout ? { mode: record.mode, maxTimeoutMs: limits.maxTimeoutMs, timeoutMs } : undefined);
  }
  if (verdict.decision !== "allow") {
    await countRefusal(ctx, live, verdict, cmd);
    throw policyError(verdict, cmd, rec);
  }

  // Every command asks whatever pytest it runs for a JUnit report in the container's /tmp
  // (PYTEST_ADDOPTS, a reserved name; and on a pytest argv, where the last --junitxml wins),
  // read back after it ends (junit.ts): a pytest inside a script or a command string is read too.
  const failFastOn = ctx.opts.failFast !== false;
  const junit = failFastOn ? junitPathFor() : null;
  // a pip command runs as the image's pip, and runs alone: what it writes on the package disk is kept for the project's next phases (src/workspace/packages.ts)
  const pip = req.argv && verdict.parts.length === 1 && !composeCall ? pipArgs(verdict.execArgv) : null;
  const runArgv = junit && isPytest(verdict.execArgv) ? [...verdict.execArgv, `--junitxml=${junit.inContainer}`] : pip ? pipRunArgv(pip) : verdict.execArgv;
  const runBase = junit ? { ...execBase, env: { ...execBase.env, PYTEST_ADDOPTS: pytestAddopts(junit) } } : execBase;

  const recordError = async (e: unknown, output: Record<string, unknown> = {}) => {
    const coded = e instanceof SandboxdError ? { code: e.code, ...(e.code === "SBX_ERR_PHASE_ESCALATED" ? { escalation: (e.details as { escalation?: number } | undefined)?.escalation ?? null } : {}) } : {};
    await rec
      .record({ type: "exec.error", ...what, id: runId, ...coded, error: (e as Error).message, ...output }, [
        actionLine(ts(), "SHELL", "EXEC", cmd, `ERROR ${(e as Error).message}`),
      ])
      .catch((re: Error) => ctx.log.error({ phase: id, err: re.message }, "could not record the error of a command"));
  };
  const channel = live.channel;
  if (!channel?.connected) {
    // the link broke while the verdict was being recorded
    const e = new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${id} is not connected`);
    await recordError(e);
    throw e;
  }
  const leave = await enterWorkspace(live, verdict, cmd, ts, pip !== null);
  const pipSinceNs = pip ? await pipMark() : null;
  // The phase may have escalated (or been paused) while this command was judged, recorded or
  // checkpointed: nothing is sent to a shim that is frozen or about to be. No await from here
  // to the send below, so no escalation can come in between.
  if (live.record.state !== "running") {
    leave();
    const e = await ctx.running(id).then(
      () => new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} is ${live.record.state}`),
      (x: unknown) => x as Error,
    );
    await recordError(e);
    throw e;
  }
  // listed (and cancellable by id) from here until its result is recorded
  let channelExecId = 0;
  const run = new RunHandle(
    {
      id: runId,
      phaseId: id,
      argv: what.argv?.map((a) => rec.redact(a)) ?? null,
      command: what.command === null ? null : rec.redact(what.command),
      cwd: cwd.inContainer,
      startedAt: ts(),
      pid: null,
      background: req.background === true,
      cancelled: null,
    },
    (sig) => channel.signal(channelExecId, sig),
    limits.killGraceMs,
  );
  ctx.runs.add(run);
  const out = new HeadTailText(limits.outputCapBytes);
  const err = new HeadTailText(limits.outputCapBytes);
  const outText = rec.outputStream();
  const errText = rec.outputStream();
  const started = ctx.opts.clock.monotonicMs();
  // the kernel's OOM count before and after: a kill meanwhile is charged to this command if it failed (resources.ts)
  const oomBefore = failFastOn ? (live.resources?.oomKills() ?? null) : null;

  // output stays bytes: scrubbed on bytes, kept head+tail as bytes, streamed as bytes
  const onStdout = (c: Buffer) => {
    out.count(c.length);
    const scrubbed = outText.push(c);
    if (scrubbed.length === 0) return;
    out.push(scrubbed);
    sink?.stdout(scrubbed);
  };
  const onStderr = (c: Buffer) => {
    err.count(c.length);
    const scrubbed = errText.push(c);
    if (scrubbed.length === 0) return;
    err.push(scrubbed);
    sink?.stderr(scrubbed);
  };
  const outcomeP = composeCall
    ? hostCompose(ctx, live, composeCall, { timeoutMs, killGraceMs: limits.killGraceMs, onStdout, onStderr, abort, started: () => sink?.started?.({ id: runId, pid: 0, rule: { id: verdict.ruleId, clause: verdict.clause } }) })
    : new Promise<{ exit?: ExitMessage; spawnError?: { code: string; message: string } }>(
    (resolve, reject) => {
      let execId = 0;
      // Backstop: the shim enforces the timeout; this catches a shim that stopped
      // answering. The shim's clock starts when the command starts, and under load
      // a command can wait to be started; so the backstop is re-armed at the
      // start the shim reports, and until then allows at least START_BACKSTOP_MS.
      const runFor = timeoutMs + limits.killGraceMs + 10_000;
      const giveUp = () => {
        channel.signal(execId, "SIGKILL");
        finish(() => reject(new SandboxdError("SBX_ERR_SHIM_LOST", `the shim of phase ${id} did not report the end of the command`)));
      };
      let backstop = setTimeout(giveUp, Math.max(runFor, START_BACKSTOP_MS));
      const onAbort = () => channel.signal(execId, "SIGKILL");
      // Once the exec has its outcome, nothing of it reaches the caller again:
      // the channel forgets it, so late output of a command given up on is dropped.
      let done = false;
      const finish = (fn: () => void) => {
        if (done) return;
        done = true;
        clearTimeout(backstop);
        abort?.removeEventListener("abort", onAbort);
        channel.forget(execId);
        fn();
      };
      let sent: number;
      try {
        run.onAbandon = (e) => finish(() => reject(e));
        sent = channel.exec(
          { argv: runArgv, ...runBase },
          {
            onStarted: (pid) => {
              if (done) return;
              clearTimeout(backstop);
              backstop = setTimeout(giveUp, runFor);
              run.info.pid = pid;
              sink?.started?.({ id: runId, pid, rule: { id: verdict.ruleId, clause: verdict.clause } });
            },
            onStdout: (c) => {
              if (!done) onStdout(c);
            },
            onStderr: (c) => {
              if (!done) onStderr(c);
            },
            onExit: (exit) => finish(() => resolve({ exit })),
            onSpawnError: (code, message) => finish(() => resolve({ spawnError: { code, message } })),
            onLost: (e) => finish(() => reject(e)),
          },
        );
      } catch (e) {
        finish(() => reject(e as Error));
        return;
      }
      execId = sent;
      channelExecId = sent;
      sink?.sent?.(sent);
      // A client that goes away (Ctrl-C, a closed pipe, a dropped connection) ends its command.
      if (abort?.aborted) onAbort();
      else abort?.addEventListener("abort", onAbort, { once: true });
    },
  );
  // Whatever the redactors held back (a possible secret in the making) is
  // flushed, scrubbed — also when the command was cut off (the phase stopped,
  // the shim was lost): the streaming client and the record get every byte.
  const flushHeld = () => {
    for (const [buf, stream, toSink] of [
      [out, outText, sink?.stdout.bind(sink)],
      [err, errText, sink?.stderr.bind(sink)],
    ] as const) {
      const rest = stream.end();
      buf.push(rest);
      if (rest.length > 0) toSink?.(rest);
    }
  };
  const outcome = await outcomeP.catch(async (e: unknown) => {
    flushHeld();
    await recordError(e, {
      stdoutBytes: out.total,
      stderrBytes: err.total,
      stdout: out.text(limits.auditOutputCapBytes),
      stderr: err.text(limits.auditOutputCapBytes),
    });
    throw e;
  }).finally(async () => {
    ctx.runs.remove(runId);
    // before the gate opens again: what the pip command wrote is noted while nothing else of the phase runs
    if (pipSinceNs !== null) {
      await ctx.packages.notePip(record.project, pipSinceNs).catch((e: Error) => ctx.log.warn({ phase: id, err: e.message }, "could not note what pip installed"));
    }
    leave();
  });
  flushHeld();
  const oomAfter = oomBefore === null ? null : (live.resources?.oomKills() ?? null);
  const oomKills = oomBefore !== null && oomAfter !== null && oomAfter > oomBefore ? oomAfter - oomBefore : 0;

  const durationMs = Math.round(ctx.opts.clock.monotonicMs() - started);
  let exitCode: number | null;
  let signal: string | null = null;
  let timedOut = false;
  if (outcome.spawnError) {
    // Same convention as a shell: 127 not found, 126 not executable.
    exitCode = outcome.spawnError.code === "ENOENT" ? 127 : 126;
    // said where the output goes too: a streaming caller sees why nothing ran
    const why = rec.redact(`sandboxd: cannot run ${verdict.execArgv[0]}: ${outcome.spawnError.message}\n`);
    err.push(why);
    sink?.stderr(Buffer.from(why, "utf8"));
  } else {
    const exit = outcome.exit!;
    exitCode = exit.exitCode;
    signal = exit.signal;
    timedOut = exit.timedOut;
  }

  // pytest's report, whenever a pytest ran in the command
  const report = junit ? await readJunit(ctx, live, junit) : null;
  const tests = report?.counts ?? null;
  const policy = ctx.policyFor(live.phasePolicy).failFast;
  const partArgv = verdict.parts.length === 1 ? verdict.parts[0]!.argv : verdict.execArgv;
  const argvTool = toolOf(partArgv);
  // A report is evidence against the command wherever it was found (a pytest inside a script,
  // pytest.main(), a command string): a report found means pytest ran. It is evidence FOR the
  // agent (a pass that resets counters, the phase report's counts, validation) only from a
  // pytest the daemon started itself: any command can write a green report at the path it
  // was given (it is in its environment).
  const tool = report ? "pytest" : argvTool;
  const ownReport = argvTool === "pytest" ? report : null;
  if (ownReport) live.failFast.lastTests = ownReport.counts;
  // a command cancelled by id, or ended because its client went away (a closed pipe, Ctrl-C)
  // before it exited, was ended by its caller: neither a failed attempt nor a success (fail-fast)
  const cancelled = run.info.cancelled !== null || (abort?.aborted === true && exitCode === null);
  // read also when it exited 0: the exit code is the agent's to choose, pytest's report is not (categorize.ts hiddenFailure)
  const category =
    !failFastOn || cancelled
      ? null
      : categorize({ argv: partArgv, tool, stderrDiscarded: what.command !== null && stderrDiscarded(what.command), exitCode, signal, timedOut, stdout: out.text(), stderr: err.text(), junit: tests, junitAsked: junit !== null && verdict.parts.length === 1, noTestsIsFailure: policy.noTestsIsFailure, oomKills, memoryLimitBytes: limits.memoryBytes });
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
      ...(category.category === "test" && tests?.failed.length ? { tests: tests.failed } : {}),
    });
    failure = { category: category.category, evidence: o.attempt.evidence, counted: o.counted, count: o.count, limit: o.limit };
    reached = o.reached;
  }
  let reset: FailureCategory[] = [];
  if (failFastOn && !cancelled) {
    reset = category ? [] : live.failFast.succeedExec({ source: argvTool, action: cmd, tests: ownReport });
    // pytest passes validation only with its own report saying so (not `pytest --version`, not a script's)
    if (VALIDATION_TOOLS.has(tool) && (tool !== "pytest" || failure || ownReport)) live.failFast.validation.set(tool, failure === null);
    // kept on disk when anything a restart must keep changed (a plain `ls` writes nothing)
    if (failure?.counted || reset.length > 0 || tests || VALIDATION_TOOLS.has(tool)) await persistFailFast(ctx, live);
  }
  // Lines of their own, so that the SKILLS.md action line keeps its one-bracket [RESULT]
  const failLine = failure
    ? [`[${ts()}] ERROR_CATEGORY: ${failure.category}${failure.counted ? ` (attempt ${failure.count}/${failure.limit})` : ""}: ${escapeControl(failure.evidence)}`]
    : [];
  const testsLine = tests ? [`[${ts()}] TESTS: ${tests.passed} passed, ${tests.failures} failed, ${tests.errors} errors, ${tests.skipped} skipped of ${tests.tests}`] : [];

  const resultWord = run.info.cancelled
    ? `CANCELLED (${exitCode ?? `signal ${signal}`})`
    : timedOut
    ? `TIMEOUT after ${timeoutMs} ms`
    : exitCode === 0
      ? "PASS"
      : exitCode === null
        ? `KILLED ${signal}`
        : `FAIL exit ${exitCode}`;
  // The logs keep each stream's first and last auditOutputCapBytes/2, with the count of bytes between.
  const auditCap = limits.auditOutputCapBytes;
  const outView = out.view(auditCap);
  const errView = err.view(auditCap);
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
      stdout: out.text(auditCap),
      stderr: err.text(auditCap),
      stdoutOmitted: outView.omitted,
      stderrOmitted: errView.omitted,
      category: failure?.category ?? null,
      evidence: failure?.evidence ?? null,
      // a success says which counters it reset (none: it answered no failed attempt; failfast.ts)
      failFast: failure ? { counted: failure.counted, count: failure.count, limit: failure.limit } : failFastOn && !cancelled ? { reset } : null,
      tests,
      ...(oomKills > 0 ? { oomKills } : {}),
      id: runId,
      cancelled: run.info.cancelled,
    },
    [
      `[${ts()}] RETURN_CODE: ${exitCode ?? `signal ${signal}`}${timedOut ? " (timeout)" : ""}`,
      ...renderOutput(ts(), "STDOUT", outView.head, outView.omitted, outView.tail),
      ...renderOutput(ts(), "STDERR", errView.head, errView.omitted, errView.tail),
      ...failLine,
      ...testsLine,
      actionLine(ts(), "SHELL", "EXEC", cmd, resultWord),
    ],
  ).catch((e: unknown) => {
    throw mayHaveRun(e, cmd, verdictRecord.seq);
  });
  // after the result is on record: a limit reached escalates the phase (this result is still returned)
  // (or one reached while this command ran: a database error from inside it)
  reached ??= live.pendingEscalation ?? null;
  const esc = reached ? await escalate(ctx, live, reached) : null;

  return {
    id: runId,
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
    stdoutOmitted: out.view().omitted,
    stderrOmitted: err.view().omitted,
    outputCapBytes: limits.outputCapBytes,
    rule: { id: verdict.ruleId, clause: verdict.clause },
    failure,
    tests,
    escalation: esc ? { n: esc.n, category: esc.category, report: esc.report, summary: esc.summary } : null,
    cancelled: run.info.cancelled,
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

function filesNote(files: readonly FileBinding[]): string {
  if (files.length === 0) return "";
  return `; runs ${files.map((f) => `${f.path}${f.sha256 ? ` sha256:${f.sha256.slice(0, 12)}` : ` (${f.note})`}`).join(", ")}`;
}

/** A retry of a command a person denied: the denial, with the person's note, until a person or the policy says otherwise. */
function deniedError(denial: Approval, cmd: string, rec: PhaseRecorder): SandboxdError {
  const note = denial.note ? rec.redact(denial.note) : null;
  return new SandboxdError(
    "SBX_ERR_APPROVAL_DENIED",
    `a human denied \`${cmd}\` (approval ${denial.id}${denial.decidedAt ? `, ${denial.decidedAt}` : ""})${note ? `: ${note}` : " without a note"}`,
    {
      details: { approvalId: denial.id, note, decidedAt: denial.decidedAt, rule: denial.ruleId, clause: denial.clause, decision: "deny" },
    },
  );
}

/** An approval whose files changed: not used; a new request with the files' current content is pending. */
function staleError(stale: { approval: Approval; changed: string[] }, pending: Approval, cmd: string): SandboxdError {
  return new SandboxdError(
    "SBX_ERR_APPROVAL_STALE",
    `approval ${stale.approval.id} of \`${cmd}\` was not used: ${stale.changed.join(", ")} changed since a human approved it; new request ${pending.id} is pending`,
    {
      hint: `a human can review the changed files and run \`sandboxd approvals approve ${pending.id}\`, then run the same command again`,
      details: { approvalId: pending.id, staleApprovalId: stale.approval.id, changed: stale.changed, decision: "ask" },
    },
  );
}

/** How long a command may wait to be started by the shim before the daemon gives up on it. */
const START_BACKSTOP_MS = 60_000;

/**
 * Linux refuses a single argument or environment string of MAX_ARG_STRLEN
 * (32 pages: 131,072 bytes, the terminating NUL included) with E2BIG.
 */
export const MAX_ARG_STRLEN = 131_072;

/**
 * Refuses, before anything is recorded or sent, a command the kernel would
 * refuse (a string over MAX_ARG_STRLEN) or whose exec message would not fit
 * one control-channel frame: the shim treats an oversized frame as a broken
 * link, which would end every running command of the phase.
 */
export function checkExecSize(msg: Omit<ExecMessage, "type" | "execId">): void {
  const strings = [...msg.argv.map((a, i) => ({ what: `argument ${i}`, s: a })), ...Object.entries(msg.env).map(([k, v]) => ({ what: `environment variable ${k}`, s: `${k}=${v}` }))];
  for (const { what, s } of strings) {
    const bytes = Buffer.byteLength(s);
    if (bytes >= MAX_ARG_STRLEN) {
      throw new SandboxdError("SBX_ERR_REQUEST_TOO_LARGE", `${what} is ${bytes} bytes; the kernel refuses a single one of ${MAX_ARG_STRLEN} bytes or more (E2BIG)`, {
        details: { what, bytes, limit: MAX_ARG_STRLEN - 1 },
      });
    }
  }
  // exactly what the channel will encode, with the widest exec id
  const bytes = Buffer.byteLength(JSON.stringify({ type: "exec", execId: 0xffffffff, ...msg }));
  if (bytes > MAX_FRAME_PAYLOAD) {
    throw new SandboxdError("SBX_ERR_REQUEST_TOO_LARGE", `the command's arguments and environment take ${bytes} bytes encoded; at most ${MAX_FRAME_PAYLOAD} fit one message to the sandbox`, {
      details: { bytes, limit: MAX_FRAME_PAYLOAD },
    });
  }
}

/**
 * The result of a command that ran could not be recorded (the audit disk
 * failed after its verdict was durable): the caller must not read the 503
 * as "nothing ran". The answer says the command may have run, and names
 * its verdict record.
 */
function mayHaveRun(e: unknown, cmd: string, verdictSeq: number): unknown {
  if (!(e instanceof SandboxdError) || e.code !== "SBX_ERR_AUDIT_FAILED") return e;
  return new SandboxdError(
    "SBX_ERR_AUDIT_FAILED",
    `${e.message}. The command \`${cmd}\` was allowed (verdict recorded as audit seq ${verdictSeq}) and may have run; its result is not recorded`,
    { hint: e.hint, details: { ...((e.details as object | undefined) ?? {}), verdictSeq, mayHaveRun: true } },
  );
}

/**
 * The workspace's part in a command (src/workspace): before a validation
 * command the changes so far are judged as an iteration (refused → the
 * command does not run); then the command holds the phase's gate, so no
 * checkpoint remounts the view under it. Returns the gate's release.
 */
/**
 * The time from which what changes on the package disk is pip's (packages.ts
 * notePip), taken once every other command of the phase has ended (the gate
 * is held alone). File ctimes come from the kernel's coarse clock, which may
 * lag the real time by up to a tick (10 ms at HZ=100): a tick before the
 * mark, so the last write of an earlier command reads as older than the
 * mark, and a tick after it, so pip's first write reads as no older. (A mark
 * taken early instead, to allow for the lag, counted a file the agent
 * edited just before `pip` as installed by pip.)
 */
async function pipMark(): Promise<bigint> {
  await delay(CLOCK_TICK_MS);
  const mark = BigInt(Date.now()) * 1_000_000n;
  await delay(CLOCK_TICK_MS);
  return mark;
}

const CLOCK_TICK_MS = 12;

async function enterWorkspace(live: LivePhase, verdict: Verdict, cmd: string, ts: () => string, alone = false): Promise<() => void> {
  const ws = live.workspace;
  if (!ws) return () => undefined;
  try {
    await checkpointBeforeValidation(live, verdict.parts.map((p) => p.argv), cmd);
    const leave = alone ? await ws.gate.alone() : await ws.gate.enter();
    try {
      ws.assertNotPending();
    } catch (e) {
      leave();
      throw e;
    }
    return leave;
  } catch (e) {
    await live.rec
      .record({ type: "exec.error", argv: verdict.execArgv, error: (e as Error).message }, [
        actionLine(ts(), "SHELL", "EXEC", cmd, `NOT RUN ${(e as SandboxdError).code ?? ""} ${(e as Error).message}`),
      ])
      // eslint-disable-next-line no-restricted-syntax -- the command did not run and the caller gets its error; a record that fails is the journal failing, which fails closed on its own
      .catch(() => undefined);
    throw e;
  }
}

/** The refusal the caller gets: the rule, its SKILLS.md clause and what to do next. */
function policyError(
  verdict: Verdict,
  cmd: string,
  rec: PhaseRecorder,
  approvalId?: string,
  timeout?: { mode: PhaseMode; maxTimeoutMs: number; timeoutMs: number },
): SandboxdError {
  const details = {
    rule: verdict.ruleId,
    clause: verdict.clause,
    decision: verdict.decision,
    ...(approvalId ? { approvalId } : {}),
    ...(timeout ? { timeoutMs: timeout.timeoutMs, maxTimeoutMs: timeout.maxTimeoutMs, setting: `limits.modes.${timeout.mode}.maxTimeoutMs` } : {}),
  };
  const reason = rec.redact(verdict.reason);
  if (verdict.decision === "forbid") {
    const code = verdict.ruleId === PARSE_RULE_ID ? "SBX_ERR_COMMAND_PARSE" : "SBX_ERR_POLICY_DENIED";
    return new SandboxdError(code, `policy denied \`${cmd}\` (rule ${verdict.ruleId}, ${verdict.clause}): ${reason}`, {
      details,
    });
  }
  const pending = approvalId
    ? `approval ${approvalId} is pending: a human can run \`sandboxd approvals approve ${approvalId}\`, then run the same command again (it may run once)`
    : "run a whitelisted command instead";
  return new SandboxdError(
    "SBX_ERR_POLICY_NEEDS_APPROVAL",
    `policy requires approval for \`${cmd}\` (rule ${verdict.ruleId}, ${verdict.clause}): ${reason}`,
    {
      hint: timeout
        ? `${pending} with --timeout ${seconds(timeout.timeoutMs)}; or use a timeout within ${seconds(timeout.maxTimeoutMs)} s. ${timeoutWays(timeout.mode)}`
        : pending,
      details,
    },
  );
}

/** The ways to a longer timeout, said wherever one is refused or asked for. */
function timeoutWays(mode: PhaseMode): string {
  return (
    `For many runs a person can grant a standing approval (\`sandboxd grant --phase ID --pattern … --max-timeout SECONDS\`, at most ${TIMEOUT_CEILING_MS / 1000}), ` +
    `or the operator can raise the mode's limit in the daemon's policy: limits.modes.${mode}.maxTimeoutMs (README "Timeouts")`
  );
}

function timeoutHint(mode: PhaseMode, maxTimeoutMs: number): string {
  return `use a timeout within ${TIMEOUT_CEILING_MS / 1000} s; up to ${seconds(maxTimeoutMs)} s runs at once, longer asks a person (SKILLS.md §2: 60 s by default, up to 5 min). ${timeoutWays(mode)}`;
}

/**
 * The project's compose configuration, resolved and checked (./compose.ts
 * checkComposeInputs) into the phase's folder in the state dir; null when the
 * project has no compose file (hostCompose says so).
 */
async function checkCompose(ctx: PhaseContext, live: LivePhase): Promise<ComposeCheck | null> {
  const { record } = live;
  const file = await composeFile(record.project);
  if (!file) return null;
  const { protections } = compileWorkspace(ctx.policyFor(live.phasePolicy).workspace);
  // the operator's: a path the sandbox never changes (read-only or hidden there, whatever the phase's permissions)
  const isOperator = (rel: string) =>
    protections.some((p) => (p.spec.treatment === "readOnly" || p.spec.treatment === "hidden") && !p.spec.unlessPermission && protects(p, rel));
  const dir = path.join(ctx.opts.stateDir, "phases", record.id);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  return checkComposeInputs({ project: record.project, file, outFile: path.join(dir, "compose.resolved.yml"), isOperator, dockerHost: process.env.DOCKER_HOST });
}

/**
 * An allowed docker-compose command, run by the daemon on the host against
 * the project's compose file (./compose.ts), in the shape of the shim's
 * outcome so that it is recorded, categorised and answered like any command.
 */
async function hostCompose(
  ctx: PhaseContext,
  live: LivePhase,
  call: ComposeCall,
  o: { timeoutMs: number; killGraceMs: number; onStdout(c: Buffer): void; onStderr(c: Buffer): void; abort?: AbortSignal | undefined; started(): void },
): Promise<{ exit?: ExitMessage; spawnError?: { code: string; message: string } }> {
  const { record } = live;
  const file = await composeFile(record.project);
  const started = ctx.opts.clock.monotonicMs();
  const exit = (exitCode: number | null, signal: string | null, timedOut: boolean): { exit: ExitMessage } => ({
    exit: { type: "exit", execId: 0, exitCode, signal, timedOut, durationMs: Math.round(ctx.opts.clock.monotonicMs() - started) },
  });
  if (!file) {
    o.onStderr(Buffer.from(`sandboxd: the project has no compose file (compose.yaml, compose.yml, docker-compose.yaml or docker-compose.yml in ${record.project})\n`));
    return exit(1, null, false);
  }
  await live.rec.record({ type: "compose.run", argv: hostArgv(record.project, file, call), file }, []);
  o.started();
  const r = await runCompose({
    project: record.project,
    file,
    call,
    timeoutMs: o.timeoutMs,
    killGraceMs: o.killGraceMs,
    dockerHost: process.env.DOCKER_HOST,
    onStdout: o.onStdout,
    onStderr: o.onStderr,
    signal: o.abort,
  });
  if (r.spawnError) return { spawnError: r.spawnError };
  return exit(r.exitCode, r.signal, r.timedOut);
}
