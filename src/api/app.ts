/**
 * The HTTP API, built as a factory: `buildApp({manager, ...})` returns a
 * fastify instance that tests drive with `inject()`; the daemon binds it to
 * the unix socket. Every body and query is parsed with zod (strict: unknown
 * fields are errors); every error leaves as `{error: {code, message, hint}}`.
 */
import { createReadStream } from "node:fs";
import { access } from "node:fs/promises";
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply } from "fastify";
import type { Logger } from "pino";
import { z } from "zod";
import { SandboxdError } from "../errors.js";
import { grantPatternSchema } from "../approvals/grants.js";
import { TIMEOUT_CEILING_MS } from "../policy/index.js";
import type { ApprovalQueue } from "../approvals/queue.js";
import { followRecords, readRecords } from "../audit/read.js";
import { verifyJournal } from "../audit/verify.js";
import type { PhaseManager } from "../phases/manager.js";
import { PHASE_MODES } from "../phases/types.js";
import { isEvent, toEvent } from "./events.js";
import { reportLines } from "../phases/report.js";
import { readFile } from "node:fs/promises";

export interface AppOptions {
  manager: PhaseManager;
  approvals: ApprovalQueue;
  /** the daemon's state dir, where audit.jsonl lives */
  stateDir: string;
  logger: Logger;
  info: { version: string; instance: string; pid: number; stateDir: string; socket: string };
}

const phaseIdParam = z.object({ id: z.string().regex(/^ph_[0-9a-f]{12}$/, "not a phase id (ph_ followed by 12 hex digits)") });

const startBody = z
  .object({
    project: z.string().min(1).refine((p) => p.startsWith("/"), "must be an absolute path"),
    phase: z
      .string()
      .min(1)
      .max(128)
      .regex(/^[\w.\- ]+$/, "letters, digits, space, '.', '_' and '-' only"),
    mode: z.enum(PHASE_MODES),
    policy: z.string().min(1).refine((p) => p.startsWith("/"), "must be an absolute path to a policy file").optional(),
    // SKILLS.md "Phase specification": the one protected path a phase may be given
    allow: z.array(z.enum(["main.py"])).max(1).optional(),
  })
  .strict();

const checkpointBody = z.object({ message: z.string().min(1, "say what the iteration did").max(2000) }).strict();
const iterationParams = phaseIdParam.extend({ n: z.coerce.number().int().positive() });

/** Linux's MAX_ARG_STRLEN (131,072) counts the terminating NUL: an argument of 131,072 bytes fails with E2BIG. */
const MAX_ARG_BYTES = 131_071;
/** An exec waits at most this long for a person's decision: a longer wait is a request left to hang, not a decision. */
export const MAX_WAIT_APPROVAL_MS = 3_600_000;
const execBody = z
  .object({
    argv: z
      .array(
        z
          .string()
          .refine((a) => Buffer.byteLength(a) <= MAX_ARG_BYTES, `an argument may be at most ${MAX_ARG_BYTES} bytes (the kernel's limit); pass larger input in a file`)
          .refine((a) => !a.includes("\0"), "must not contain NUL bytes"),
      )
      .min(1, "must name a program to run")
      .max(4096)
      .refine((a) => a[0] !== "", "argv[0] must not be empty")
      .optional(),
    command: z
      .string()
      .min(1, "must not be empty")
      .max(32 * 1024)
      .refine((c) => !c.includes("\0"), "must not contain NUL bytes")
      .optional(),
    timeoutMs: z.number().int().positive().max(86_400_000).optional(),
    reason: z.string().max(2000).optional(),
    /** when the policy asks a person: wait this long for the decision (long poll) */
    waitApprovalMs: z.number().int().positive().max(MAX_WAIT_APPROVAL_MS, "at most 1 hour (3,600,000 ms); wait again with the approval's id after that").optional(),
  })
  .strict()
  .refine((b) => (b.argv === undefined) !== (b.command === undefined), {
    message: "give exactly one of argv (an array, preferred) or command (a string)",
  });

const approvalIdParam = z.object({ id: z.string().regex(/^ap_[0-9a-f]{12}$/, "not an approval id (ap_ followed by 12 hex digits)") });
const approvalsQuery = z
  .object({ all: z.enum(["0", "1", "true", "false"]).optional(), phase: phaseIdParam.shape.id.optional() })
  .strict();
const decisionBody = z.object({ note: z.string().max(2000).optional() }).strict();

const grantIdParam = z.object({ id: z.string().regex(/^gr_[0-9a-f]{12}$/, "not a standing approval id (gr_ followed by 12 hex digits)") });
const grantsQuery = z.object({ all: z.enum(["0", "1", "true", "false"]).optional() }).strict();
/** A standing approval lasts at most 30 days: a longer one is a policy change, which belongs in the policy file. */
const MAX_GRANT_MS = 30 * 86_400_000;
const grantBody = z
  .object({
    phase: phaseIdParam.shape.id.optional(),
    project: z.string().min(1).refine((p) => p.startsWith("/"), "must be an absolute path").optional(),
    argv: execBody.innerType().shape.argv,
    pattern: grantPatternSchema.optional(),
    expiresInMs: z.number().int().positive().max(MAX_GRANT_MS, "at most 30 days"),
    maxTimeoutMs: z.number().int().positive().max(TIMEOUT_CEILING_MS, `at most ${TIMEOUT_CEILING_MS} ms (SKILLS.md §2: 5 minutes)`).optional(),
    note: z.string().max(2000).optional(),
  })
  .strict()
  .refine((b) => (b.phase === undefined) !== (b.project === undefined), { message: "give exactly one scope: phase (an id) or project (a directory)" })
  .refine((b) => (b.argv === undefined) !== (b.pattern === undefined), { message: "give exactly one of argv (an exact command) or pattern (policy-style tokens)" });

const auditQuery = z
  .object({
    phase: phaseIdParam.shape.id.optional(),
    after: z.coerce.number().int().nonnegative().optional(),
    last: z.coerce.number().int().positive().max(100_000).optional(),
    follow: z.enum(["0", "1", "true", "false"]).optional(),
  })
  .strict();

const noteBody = z.object({ note: z.string().max(2000).optional() }).strict();
const escalationsQuery = z.object({ all: z.enum(["0", "1", "true", "false"]).optional() }).strict();
const eventsQuery = z
  .object({
    since: z.coerce.number().int().nonnegative().optional(),
    phase: phaseIdParam.shape.id.optional(),
    follow: z.enum(["0", "1", "true", "false"]).optional(),
  })
  .strict();

const streamQuery = z.object({ stream: z.enum(["0", "1", "true", "false"]).optional() }).strict();
const logsQuery = z.object({ follow: z.enum(["0", "1", "true", "false"]).optional() }).strict();

/** At most this many problems, unknown keys per problem, and characters per name are echoed: a hostile body must not make a huge answer. */
const MAX_PROBLEMS = 20;
const MAX_KEYS = 10;
const MAX_NAME = 100;

function shortName(s: string | number): string {
  const t = String(s);
  return t.length > MAX_NAME ? `${t.slice(0, MAX_NAME)}…` : t;
}

function someOf(items: readonly string[], max: number): string {
  const shown = items.slice(0, max).map(shortName).join(", ");
  return items.length > max ? `${shown} and ${items.length - max} more` : shown;
}

function parse<T>(schema: z.ZodType<T>, value: unknown, where: string): T {
  const r = schema.safeParse(value ?? {});
  if (r.success) return r.data;
  const issues = r.error.issues;
  const problems = issues.slice(0, MAX_PROBLEMS).map((i) => {
    const at = i.path.length ? i.path.map(shortName).join(".") : where;
    return i.code === "unrecognized_keys" ? `${where}: unknown field(s) ${someOf(i.keys, MAX_KEYS)}` : `${where}.${at}: ${shortName(i.message)}`;
  });
  if (issues.length > MAX_PROBLEMS) problems.push(`and ${issues.length - MAX_PROBLEMS} more problems`);
  const details = issues.slice(0, MAX_PROBLEMS).map((i) => ({
    code: i.code,
    path: i.path.slice(0, 10).map((p) => (typeof p === "string" ? shortName(p) : p)),
    message: shortName(i.message),
    ...(i.code === "unrecognized_keys" ? { keys: i.keys.slice(0, MAX_KEYS).map(shortName), keyCount: i.keys.length } : {}),
  }));
  throw new SandboxdError("SBX_ERR_VALIDATION", `invalid request: ${problems.join("; ")}`, { details: { issues: details, issueCount: issues.length } });
}

const truthy = (v: string | undefined) => v === "1" || v === "true";

export function buildApp(opts: AppOptions): FastifyInstance {
  const app = Fastify({
    // Per-request lines are noise here (the audit trail records what matters); keep warnings and errors.
    loggerInstance: opts.logger.child({ mod: "api" }, { level: "warn" }) as FastifyBaseLogger,
    bodyLimit: 8 * 1024 * 1024,
    return503OnClosing: true,
    // The daemon closes the app after its phases have stopped: a kept-alive or still-streaming connection then holds nothing worth waiting for.
    forceCloseConnections: true,
  });
  const { manager } = opts;

  app.setErrorHandler((err, req, reply) => {
    if (err instanceof SandboxdError) return reply.status(err.status).send(err.toBody());
    const fe = err as { code?: string; statusCode?: number; message: string };
    if (fe.statusCode === 413) {
      const e = new SandboxdError("SBX_ERR_REQUEST_TOO_LARGE", `request body too large: ${fe.message}`, {
        hint: "put large inputs in a file in the project and name the file in the command",
      });
      return reply.status(e.status).send(e.toBody());
    }
    if (fe.code?.startsWith("FST_ERR_CTP") || err instanceof SyntaxError) {
      const e = new SandboxdError("SBX_ERR_BAD_JSON", `request body is not valid JSON: ${fe.message}`);
      return reply.status(fe.statusCode === 413 ? 413 : e.status).send(e.toBody());
    }
    req.log.error({ err }, "unhandled error");
    const e = new SandboxdError("SBX_ERR_INTERNAL", `internal error: ${fe.message}`);
    return reply.status(e.status).send(e.toBody());
  });
  app.setNotFoundHandler((req, reply) => {
    const e = new SandboxdError("SBX_ERR_NOT_FOUND", `no route ${req.method} ${req.url}`);
    return reply.status(e.status).send(e.toBody());
  });

  // Audit followers never end by themselves: a closing server ends them, or its close would wait for them forever.
  const followers = new Set<AbortController>();
  app.addHook("preClose", async () => {
    for (const f of followers) f.abort();
  });

  app.get("/v1/health", async () => ({ ok: true, ...opts.info }));

  app.get("/v1/phases", async () => ({ phases: await manager.list() }));

  app.post("/v1/phases", async (req, reply) => {
    const body = parse(startBody, req.body, "body");
    const phase = await manager.start(body);
    return reply.status(201).send({ phase });
  });

  app.get("/v1/phases/:id", async (req) => {
    const { id } = parse(phaseIdParam, req.params, "path");
    return { phase: await manager.get(id) };
  });

  app.delete("/v1/phases/:id", async (req) => {
    const { id } = parse(phaseIdParam, req.params, "path");
    return { phase: await manager.stop(id) };
  });

  app.post("/v1/phases/:id/exec", async (req, reply) => {
    const { id } = parse(phaseIdParam, req.params, "path");
    const q = parse(streamQuery, req.query, "query");
    const body = parse(execBody, req.body, "body");
    if (!truthy(q.stream)) {
      // A client that goes away before its answer ends its command, as a streaming one does.
      const abort = new AbortController();
      const onClose = () => {
        if (!reply.raw.writableFinished) abort.abort();
      };
      reply.raw.on("close", onClose);
      try {
        return { result: await manager.exec(id, body, undefined, abort.signal) };
      } finally {
        reply.raw.off("close", onClose);
      }
    }
    return streamExec(reply, manager, id, body);
  });

  // a person's hand on a phase (fail-fast): pause, resume (after an escalation: with a note), abort
  app.post("/v1/phases/:id/pause", async (req) => {
    const { id } = parse(phaseIdParam, req.params, "path");
    const body = parse(noteBody, req.body ?? {}, "body");
    return { phase: await manager.pause(id, body.note) };
  });
  app.post("/v1/phases/:id/resume", async (req) => {
    const { id } = parse(phaseIdParam, req.params, "path");
    const body = parse(noteBody, req.body ?? {}, "body");
    return { phase: await manager.resume(id, body.note) };
  });
  app.post("/v1/phases/:id/abort", async (req) => {
    const { id } = parse(phaseIdParam, req.params, "path");
    const body = parse(noteBody, req.body ?? {}, "body");
    return { phase: await manager.abort(id, body.note) };
  });

  app.get("/v1/phases/:id/report", async (req) => {
    const { id } = parse(phaseIdParam, req.params, "path");
    const report = await manager.report(id);
    // the same lines the logs got (SKILLS.md build loop step 7), without their timestamp, for clients that print it
    return { report, text: reportLines(report, "").join("\n").replace(/^\[\] /, "") };
  });

  app.get("/v1/escalations", async (req) => {
    const q = parse(escalationsQuery, req.query, "query");
    return { escalations: await manager.escalations(truthy(q.all)) };
  });

  // the phase's last escalation with its report's text (SKILLS.md Human Escalation Log)
  app.get("/v1/phases/:id/escalation", async (req) => {
    const { id } = parse(phaseIdParam, req.params, "path");
    const e = (await manager.get(id)).escalations?.at(-1);
    if (!e) throw new SandboxdError("SBX_ERR_NOT_FOUND", `phase ${id} has no escalation`, { hint: "`sandboxd escalations ls --all` lists every escalation" });
    return { escalation: e, text: await readFile(e.report, "utf8").catch(() => null) };
  });

  // NDJSON of the audit trail's events (src/api/events.ts); follows unless follow=0
  app.get("/v1/events", async (req, reply) => {
    const q = parse(eventsQuery, req.query, "query");
    const filter = { phase: q.phase, after: q.since };
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, { "content-type": "application/x-ndjson", "cache-control": "no-store" });
    const write = (r: Parameters<typeof toEvent>[0]) => {
      if (isEvent(r as never)) res.write(JSON.stringify(toEvent(r)) + "\n");
    };
    if (q.follow === "0" || q.follow === "false") {
      for (const r of await readRecords(opts.stateDir, filter)) write(r);
      res.end();
      return;
    }
    const stop = new AbortController();
    res.on("close", () => stop.abort());
    await followRecords(opts.stateDir, filter, write, stop.signal, 100, true);
    res.end();
  });
  // the phase's workspace (docs/WORKSPACE.md)
  app.post("/v1/phases/:id/checkpoint", async (req) => {
    const { id } = parse(phaseIdParam, req.params, "path");
    const body = parse(checkpointBody, req.body, "body");
    return manager.checkpoint(id, body.message);
  });

  app.get("/v1/phases/:id/files", async (req) => {
    const { id } = parse(phaseIdParam, req.params, "path");
    return { changes: await manager.files(id) };
  });

  app.get("/v1/phases/:id/diff", async (req) => {
    const { id } = parse(phaseIdParam, req.params, "path");
    return { diff: await manager.diff(id) };
  });

  for (const decision of ["accept", "reject"] as const) {
    app.post(`/v1/phases/:id/iterations/:n/${decision}`, async (req) => {
      const { id, n } = parse(iterationParams, req.params, "path");
      const body = parse(decisionBody, req.body ?? {}, "body");
      return { iteration: await manager.decideIteration(id, n, decision, body.note) };
    });
  }

  app.get("/v1/approvals", async (req) => {
    const q = parse(approvalsQuery, req.query, "query");
    const list = opts.approvals.list({ all: truthy(q.all), ...(q.phase ? { phaseId: q.phase } : {}) });
    return { approvals: list.map((a) => ({ ...a, waiting: opts.approvals.waiting(a.id) })) };
  });

  app.get("/v1/approvals/:id", async (req) => {
    const { id } = parse(approvalIdParam, req.params, "path");
    // waiting: how many execs are blocked on this decision right now (exec waitApprovalMs)
    return { approval: { ...opts.approvals.get(id), waiting: opts.approvals.waiting(id) } };
  });

  for (const decision of ["approve", "deny"] as const) {
    app.post(`/v1/approvals/:id/${decision}`, async (req) => {
      const { id } = parse(approvalIdParam, req.params, "path");
      const body = parse(decisionBody, req.body ?? {}, "body");
      return { approval: await manager.decideApproval(id, decision, body.note) };
    });
  }

  app.get("/v1/grants", async (req) => {
    const q = parse(grantsQuery, req.query, "query");
    return { grants: manager.listGrants(truthy(q.all)) };
  });

  app.post("/v1/grants", async (req) => {
    const b = parse(grantBody, req.body, "body");
    return {
      grant: await manager.grant({
        phaseId: b.phase,
        project: b.project,
        argv: b.argv,
        pattern: b.pattern,
        expiresInMs: b.expiresInMs,
        maxTimeoutMs: b.maxTimeoutMs,
        note: b.note,
      }),
    };
  });

  app.post("/v1/grants/:id/revoke", async (req) => {
    const { id } = parse(grantIdParam, req.params, "path");
    const body = parse(decisionBody, req.body ?? {}, "body");
    return { grant: await manager.revokeGrant(id, body.note) };
  });

  // audit.jsonl, as JSON (a list) or, with follow, NDJSON as records are appended.
  app.get("/v1/audit", async (req, reply) => {
    const q = parse(auditQuery, req.query, "query");
    const filter = { phase: q.phase, after: q.after };
    const records = await readRecords(opts.stateDir, filter, q.last);
    if (!truthy(q.follow)) return { records };
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, { "content-type": "application/x-ndjson", "cache-control": "no-store" });
    // sent now, not with the first record: a follow of a quiet trail is answered at once
    res.flushHeaders();
    for (const r of records) res.write(JSON.stringify(r) + "\n");
    const stop = new AbortController();
    res.on("close", () => stop.abort());
    followers.add(stop);
    const after = records.at(-1)?.seq ?? q.after;
    try {
      await followRecords(opts.stateDir, { phase: q.phase, after }, (r) => res.write(JSON.stringify(r) + "\n"), stop.signal);
    } finally {
      followers.delete(stop);
    }
    res.end();
  });

  app.get("/v1/audit/verify", async () => ({ verify: await verifyJournal(opts.stateDir) }));

  app.get("/v1/phases/:id/logs", async (req, reply) => {
    const { id } = parse(phaseIdParam, req.params, "path");
    const q = parse(logsQuery, req.query, "query");
    const src = await manager.logs(id, truthy(q.follow));
    reply.header("content-type", "text/plain; charset=utf-8");
    if ("file" in src) {
      const exists = await access(src.file).then(
        () => true,
        () => false,
      );
      return reply.send(exists ? createReadStream(src.file) : "");
    }
    const stream = src.stream;
    reply.raw.on("close", () => (stream as unknown as { destroy?: () => void }).destroy?.());
    return reply.send(stream);
  });

  return app;
}

/**
 * NDJSON exec: `{"type":"waiting","phaseId","approvalId","command","rule","waitMs"}`
 * when it waits for a person's decision (waitApprovalMs),
 * `{"type":"started","phaseId","pid","rule"}` as soon as the
 * command runs, `{"type":"stdout"|"stderr","data":"…"}` lines as output
 * arrives, then `{"type":"exit","result":{…}}` or `{"type":"error","error":{…}}`.
 * A policy refusal or bad request is answered before the stream starts, as an
 * ordinary error response. A slow reader slows the command (backpressure);
 * a reader that disconnects ends it.
 *
 * The request owns one FlowConsumer (src/phases/flow.ts): it holds the
 * phase's channel paused while the client drains, and whatever way the
 * request ends (exit, error, client gone) the consumer is closed, so its
 * pause ends with it. Once the answer is sent (`answered`), nothing more is
 * written: output arriving late is dropped, never sent after the end.
 */
async function streamExec(
  reply: FastifyReply,
  manager: PhaseManager,
  id: string,
  body: { argv?: string[] | undefined; command?: string | undefined; timeoutMs?: number | undefined; reason?: string | undefined; waitApprovalMs?: number | undefined },
): Promise<void> {
  const res = reply.raw;
  const abort = new AbortController();
  const flow = manager.flow(id);
  let headersSent = false;
  let answered = false;

  const ensureHeaders = () => {
    if (headersSent) return;
    headersSent = true;
    reply.hijack();
    res.writeHead(200, { "content-type": "application/x-ndjson", "cache-control": "no-store" });
  };
  const write = (obj: unknown) => {
    if (answered || res.destroyed || res.writableEnded) return;
    ensureHeaders();
    if (!res.write(JSON.stringify(obj) + "\n") && !flow.isHolding && !flow.isClosed) {
      flow.pause();
      res.once("drain", () => flow.resume());
    }
  };
  const emit = (type: "stdout" | "stderr") => (data: string) => write({ type, data });
  res.on("close", () => {
    if (!res.writableFinished) abort.abort();
    flow.close();
  });

  try {
    // The command's start commits the 200 with a `started` event, so the
    // client knows at once that it runs (not at its first output); anything
    // thrown before that — policy, validation, a stopped phase — is a normal
    // error reply.
    const result = await manager.exec(
      id,
      body,
      {
        started: (info) => write({ type: "started", phaseId: id, ...info }),
        // commits the 200: the decision (run, denial, no decision in time) follows in the stream
        waiting: (info) => write({ type: "waiting", phaseId: id, ...info }),
        stdout: emit("stdout"), stderr: emit("stderr") },
      abort.signal,
    );
    write({ type: "exit", result });
    answered = true;
    // (no headers only when the client left before anything was written: nothing to answer)
    if (headersSent) res.end();
    else reply.hijack();
  } catch (err) {
    if (!headersSent) {
      answered = true;
      throw err;
    }
    const e = err instanceof SandboxdError ? err : new SandboxdError("SBX_ERR_INTERNAL", (err as Error).message);
    write({ type: "error", ...e.toBody() });
    answered = true;
    res.end();
  } finally {
    answered = true;
    flow.close();
  }
}
