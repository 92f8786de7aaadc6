/**
 * The HTTP API, built as a factory: `buildApp({manager, ...})` returns a
 * fastify instance that tests drive with `inject()`; the daemon binds it to
 * the unix socket. Every body and query is parsed with zod (strict: unknown
 * fields are errors); every error leaves as `{error: {code, message, hint}}`.
 */
import { createReadStream } from "node:fs";
import { access } from "node:fs/promises";
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from "fastify";
import type { Logger } from "pino";
import { z } from "zod";
import { SandboxdError } from "../errors.js";
import type { ApprovalQueue } from "../approvals/queue.js";
import { followRecords, readRecords } from "../audit/read.js";
import { verifyJournal, type VerifyResult } from "../audit/verify.js";
import type { PreparedExport } from "../audit/bundle.js";
import type { ExecRequest, PhaseManager } from "../phases/manager.js";
import { execBody } from "./schemas.js";
import { isEvent, toEvent } from "./events.js";
import { reportLines } from "../phases/report.js";
import { readFile } from "node:fs/promises";
import { StringDecoder } from "node:string_decoder";
import { FRAMES_CONTENT_TYPE, StreamFrame, frameHeader } from "../frames.js";
import { outputPool } from "../shim/read-pool.js";
import { openApiDocument } from "./openapi.js";
import { ROUTES, routeKey, routeOf, type RouteKey } from "./routes.js";
import { MAX_PUT_BYTES } from "./schemas.js";

export interface AppOptions {
  manager: PhaseManager;
  approvals: ApprovalQueue;
  /** the daemon's state dir, where audit.jsonl lives */
  stateDir: string;
  logger: Logger;
  /** the audit trail's signing key and its export (the daemon's; absent in tests that build the app alone) */
  audit?: {
    key: { fingerprint: string; publicKey: string; keyFile: string };
    exportBundle(opts?: { nonce?: string | undefined }): Promise<PreparedExport>;
    /** the trail checked with what the daemon knows: its keys pinned, its last written and signed heads (docs/AUDIT.md "Threat model") */
    verify?(): Promise<VerifyResult>;
  };
  info: { version: string; instance: string; pid: number; stateDir: string; socket: string };
  /**
   * How the daemon stops over its API: `phases` ends (or, with keepPhases,
   * detaches) the phases and answers their ids; `close` then closes the
   * servers and the journal, once the answer is sent. Absent: refused.
   */
  stop?: {
    phases(o: { keepPhases: boolean; drainMs: number | undefined }): Promise<string[]>;
    close(): Promise<void>;
  };
}

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

/** A job's wait without timeoutMs answers after this long. */
const DEFAULT_JOB_WAIT_MS = 30_000;

/** The exec body as the manager takes it: stdin as bytes. */
function execRequest(body: z.output<typeof execBody>): ExecRequest {
  const { stdin, stdinBase64, ...rest } = body;
  return {
    ...rest,
    ...(stdin !== undefined ? { stdin: Buffer.from(stdin, "utf8") } : {}),
    ...(stdinBase64 !== undefined ? { stdin: Buffer.from(stdinBase64, "base64") } : {}),
  };
}

/** The table's entry for a key, as a type: its schemas give the handler's input types. */
type RouteOf<K extends string> = K extends `${infer M} ${infer P}` ? Extract<(typeof ROUTES)[number], { method: M; path: P }> : never;
type Parsed<D, F extends "params" | "query" | "body"> = D extends { [k in F]: infer S extends z.ZodTypeAny } ? z.output<S> : undefined;
export interface RouteInput<K extends string> {
  params: Parsed<RouteOf<K>, "params">;
  query: Parsed<RouteOf<K>, "query">;
  body: Parsed<RouteOf<K>, "body">;
}

/** The routes each app registered, as `METHOD /path` (the test that the OpenAPI document lists exactly them reads this). */
const registered = new WeakMap<FastifyInstance, string[]>();
export function registeredRoutes(app: FastifyInstance): readonly string[] {
  return registered.get(app) ?? [];
}

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

  // PUT /v1/phases/:id/files/<path>: the body is the file's bytes
  app.addContentTypeParser("application/octet-stream", { parseAs: "buffer", bodyLimit: MAX_PUT_BYTES }, (_req, body, done) => done(null, body));

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

  const routes: string[] = [];
  registered.set(app, routes);
  /**
   * Registers the handler of a route of the table (routes.ts): params, query
   * and body are parsed with the table's schemas, in that order, before the
   * handler runs; a key not in the table throws at build.
   */
  const on = <K extends RouteKey>(key: K, handler: (input: RouteInput<K>, req: FastifyRequest, reply: FastifyReply) => unknown) => {
    const def = routeOf(key);
    routes.push(routeKey(def));
    app.route({
      method: def.method,
      url: def.path,
      ...(def.bodyLimit ? { bodyLimit: def.bodyLimit } : {}),
      handler: async (req, reply) => {
        // a trailing wildcard (`files/*`) is the route's `path` parameter
        const rawParams = req.params as Record<string, unknown>;
        const paramsIn = "*" in rawParams ? { ...Object.fromEntries(Object.entries(rawParams).filter(([k]) => k !== "*")), path: rawParams["*"] } : rawParams;
        const input = {
          params: def.params ? parse(def.params, paramsIn, "path") : undefined,
          query: def.query ? parse(def.query, req.query, "query") : undefined,
          body: def.body ? parse(def.body, req.body, "body") : undefined,
        } as RouteInput<K>;
        return handler(input, req, reply);
      },
    });
  };

  on("GET /v1/openapi.json", async () => openApiDocument());
  on("POST /v1/daemon/stop", async ({ body }, _req, reply) => {
    const stop = opts.stop;
    if (!stop) throw new SandboxdError("SBX_ERR_SHUTDOWN_REFUSED", "this daemon cannot be stopped over its API");
    const keepPhases = body.keepPhases === true;
    const phases = await stop.phases({ keepPhases, drainMs: body.drainMs });
    // the rest of the stop (servers, journal) once this answer is out
    reply.raw.once("finish", () => void stop.close());
    return { stopping: true, keepPhases, phases };
  });
  on("GET /v1/health", async () => ({ ok: true, ...opts.info }));

  on("GET /v1/phases", async () => ({ phases: await manager.list(), pool: manager.poolStatus() }));

  on("POST /v1/phases", async ({ body }, _req, reply) => {
    const phase = await manager.start(body);
    return reply.status(201).send({ phase });
  });

  on("GET /v1/phases/:id", async ({ params: { id } }) => {
    return { phase: await manager.get(id) };
  });

  on("DELETE /v1/phases/:id", async ({ params: { id } }) => {
    return { phase: await manager.stop(id) };
  });

  on("POST /v1/phases/:id/exec", async ({ params: { id }, query: q, body }, _req, reply) => {
    const streaming = !(q.stream === undefined || q.stream === "0" || q.stream === "false");
    if (body.background) {
      if (streaming) throw new SandboxdError("SBX_ERR_VALIDATION", "invalid request: background and stream do not go together: a job's output is read with GET …/jobs/:job/output");
      return reply.status(202).send({ job: await manager.startJob(id, execRequest(body)) });
    }
    if (!streaming) {
      // A client that goes away before its answer ends its command, as a streaming one does.
      const abort = new AbortController();
      const onClose = () => {
        if (!reply.raw.writableFinished) abort.abort();
      };
      reply.raw.on("close", onClose);
      try {
        return { result: await manager.exec(id, execRequest(body), undefined, abort.signal) };
      } finally {
        reply.raw.off("close", onClose);
      }
    }
    return streamExec(reply, manager, id, execRequest(body), q.stream === "frames" ? "frames" : "ndjson");
  });

  // the phase's running commands, each cancellable by id
  on("GET /v1/phases/:id/execs", async ({ params: { id } }) => ({ execs: await manager.runs(id) }));
  on("POST /v1/phases/:id/execs/:exec/cancel", async ({ params: { id, exec }, body }) => ({ exec: await manager.cancel(id, exec, body.note) }));

  // background jobs (src/phases/jobs.ts)
  on("GET /v1/phases/:id/jobs", async ({ params: { id } }) => ({ jobs: await manager.listJobs(id) }));
  on("GET /v1/phases/:id/jobs/:job", async ({ params: { id, job } }) => ({ job: manager.job(id, job) }));
  on("GET /v1/phases/:id/jobs/:job/output", async ({ params: { id, job } }) => ({ output: manager.jobOutput(id, job) }));
  on("GET /v1/phases/:id/jobs/:job/wait", async ({ params: { id, job }, query: q }, _req, reply) => {
    // a client that goes away ends its wait (not the job)
    const abort = new AbortController();
    const onClose = () => {
      if (!reply.raw.writableFinished) abort.abort();
    };
    reply.raw.on("close", onClose);
    try {
      return { job: await manager.waitJob(id, job, q.timeoutMs ?? DEFAULT_JOB_WAIT_MS, abort.signal) };
    } finally {
      reply.raw.off("close", onClose);
    }
  });
  on("POST /v1/phases/:id/jobs/:job/kill", async ({ params: { id, job }, body }) => ({ job: await manager.killJob(id, job, body.note) }));

  // a person's hand on a phase (fail-fast): pause, resume (after an escalation: with a note), abort
  on("POST /v1/phases/:id/pause", async ({ params: { id }, body }) => {
    return { phase: await manager.pause(id, body.note) };
  });
  on("POST /v1/phases/:id/resume", async ({ params: { id }, body }) => {
    return { phase: await manager.resume(id, body.note) };
  });
  on("POST /v1/phases/:id/abort", async ({ params: { id }, body }) => {
    return { phase: await manager.abort(id, body.note) };
  });

  on("GET /v1/phases/:id/report", async ({ params: { id } }) => {
    const report = await manager.report(id);
    // the same lines the logs got (SKILLS.md build loop step 7), without their timestamp, for clients that print it
    return { report, text: reportLines(report, "").join("\n").replace(/^\[\] /, "") };
  });

  on("GET /v1/escalations", async ({ query: q }) => {
    return { escalations: await manager.escalations(truthy(q.all)) };
  });

  // the phase's last escalation with its report's text (SKILLS.md Human Escalation Log)
  on("GET /v1/phases/:id/escalation", async ({ params: { id } }) => {
    const e = (await manager.get(id)).escalations?.at(-1);
    if (!e) throw new SandboxdError("SBX_ERR_NOT_FOUND", `phase ${id} has no escalation`, { hint: "`sandboxd escalations ls --all` lists every escalation" });
    return { escalation: e, text: await readFile(e.report, "utf8").catch(() => null) };
  });

  // NDJSON of the audit trail's events (src/api/events.ts); follows unless follow=0
  on("GET /v1/events", async ({ query: q }, _req, reply) => {
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
  on("POST /v1/phases/:id/checkpoint", async ({ params: { id }, body }) => {
    return manager.checkpoint(id, body.message);
  });

  on("GET /v1/phases/:id/files", async ({ params: { id } }) => {
    return { changes: await manager.files(id) };
  });

  on("GET /v1/phases/:id/diff", async ({ params: { id }, query: q }) => {
    return { diff: await manager.diff(id, truthy(q.all)) };
  });

  // a file of the phase's view, read or written through the daemon (src/workspace/files.ts)
  on("GET /v1/phases/:id/files/*", async ({ params: { id, path: rel } }, _req, reply) => {
    const f = await manager.readFile(id, rel);
    return reply.header("content-type", "application/octet-stream").header("x-sandboxd-mode", f.mode.toString(8).padStart(4, "0")).send(f.bytes);
  });

  on("PUT /v1/phases/:id/files/*", async ({ params: { id, path: rel }, query: q }, req) => {
    if (!Buffer.isBuffer(req.body)) {
      throw new SandboxdError("SBX_ERR_VALIDATION", "invalid request: the body is the file's bytes, sent as Content-Type: application/octet-stream");
    }
    return { file: await manager.writeFile(id, rel, req.body, q.mode === undefined ? undefined : parseInt(q.mode, 8)) };
  });

  for (const decision of ["accept", "reject"] as const) {
    on(`POST /v1/phases/:id/iterations/:n/${decision}`, async ({ params: { id, n }, body }) => {
      return { iteration: await manager.decideIteration(id, n, decision, body.note) };
    });
  }

  on("GET /v1/approvals", async ({ query: q }) => {
    const list = opts.approvals.list({ all: truthy(q.all), ...(q.phase ? { phaseId: q.phase } : {}) });
    return { approvals: list.map((a) => ({ ...a, waiting: opts.approvals.waiting(a.id) })) };
  });

  on("GET /v1/approvals/:id", async ({ params: { id } }) => {
    // waiting: how many execs are blocked on this decision right now (exec waitApprovalMs)
    return { approval: { ...opts.approvals.get(id), waiting: opts.approvals.waiting(id) } };
  });

  for (const decision of ["approve", "deny"] as const) {
    on(`POST /v1/approvals/:id/${decision}`, async ({ params: { id }, body }) => {
      return { approval: await manager.decideApproval(id, decision, body.note) };
    });
  }

  on("GET /v1/grants", async ({ query: q }) => {
    return { grants: manager.listGrants(truthy(q.all)) };
  });

  on("POST /v1/grants", async ({ body: b }) => {
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

  on("POST /v1/grants/:id/revoke", async ({ params: { id }, body }) => {
    return { grant: await manager.revokeGrant(id, body.note) };
  });

  // audit.jsonl, as JSON (a list) or, with follow, NDJSON as records are appended.
  on("GET /v1/audit", async ({ query: q }, _req, reply) => {
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

  on("GET /v1/audit/verify", async () => ({ verify: opts.audit?.verify ? await opts.audit.verify() : await verifyJournal(opts.stateDir) }));

  const auditSigning = () => {
    if (!opts.audit) throw new SandboxdError("SBX_ERR_NOT_FOUND", "this API has no audit signing key");
    return opts.audit;
  };
  on("GET /v1/audit/key", async () => ({ key: auditSigning().key }));

  // A verifiable bundle (src/audit/bundle.ts): checked and signed before the first byte is sent, then streamed.
  on("GET /v1/audit/export", async ({ query }, _req, reply) => {
    const prepared = await auditSigning().exportBundle({ nonce: query.nonce });
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, {
      "content-type": "application/x-ndjson",
      "cache-control": "no-store",
      "x-sandboxd-bundle-records": String(prepared.header.records),
      "x-sandboxd-bundle-key": prepared.anchor.key,
    });
    try {
      for await (const chunk of prepared.body()) {
        if (res.destroyed) break;
        if (!res.write(chunk)) {
          await new Promise<void>((resolve) => {
            const done = () => {
              res.off("drain", done);
              res.off("close", done);
              resolve();
            };
            res.once("drain", done);
            res.once("close", done);
          });
        }
      }
    } catch (e) {
      // the records changed under the export: the client sees a cut bundle, which does not verify
      opts.logger.error({ err: (e as Error).message }, "audit export cut short");
      res.destroy();
      return;
    }
    res.end();
  });

  on("GET /v1/phases/:id/logs", async ({ params: { id }, query: q }, _req, reply) => {
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
 * A streaming exec, in one of two formats (docs/API.md "Streaming exec"):
 * `frames`, the byte format the CLI and the clients use — each event a JSON
 * frame, each piece of output a 5-byte header and the scrubbed bytes as they
 * came from the shim, never decoded — or NDJSON, one JSON object per line,
 * output decoded to text (a character split between chunks is joined first).
 * The events: `{"type":"waiting","phaseId","approvalId","command","rule","waitMs"}`
 * when it waits for a person's decision (waitApprovalMs),
 * `{"type":"started","phaseId","pid","rule"}` as soon as the command runs,
 * output (`{"type":"stdout"|"stderr","data":"…"}` lines in NDJSON), then
 * `{"type":"exit","result":{…}}` or `{"type":"error","error":{…}}`.
 * A policy refusal or bad request is answered before the stream starts, as an
 * ordinary error response. A slow reader slows the command (backpressure);
 * a reader that disconnects ends it.
 *
 * The request owns one FlowConsumer (src/phases/flow.ts): it holds its
 * exec's output paused in the shim while the client drains (the whole
 * channel, with a shim older than "execflow"), and whatever way the
 * request ends (exit, error, client gone) the consumer is closed, so its
 * pause ends with it. Once the answer is sent (`answered`), nothing more is
 * written: output arriving late is dropped, never sent after the end.
 */
/** a streaming exec's output waiting for its client beyond this pauses the command (the daemon's memory per slow client) */
const STREAM_BACKLOG_BYTES = 1024 * 1024;

async function streamExec(
  reply: FastifyReply,
  manager: PhaseManager,
  id: string,
  body: ExecRequest,
  format: "frames" | "ndjson",
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
    res.writeHead(200, { "content-type": format === "frames" ? FRAMES_CONTENT_TYPE : "application/x-ndjson", "cache-control": "no-store" });
  };
  const writable = () => !(answered || res.destroyed || res.writableEnded);
  // Paused only once a real backlog waits for the client: one piece of output (up to 256 KiB)
  // is already more than the socket's 16 KiB mark, and pausing at each would stop the command
  // at every piece (a flow message to the shim and back each time).
  const backpressure = (ok: boolean) => {
    if (!ok && res.writableLength >= STREAM_BACKLOG_BYTES && !flow.isHolding && !flow.isClosed) {
      flow.pause();
      res.once("drain", () => flow.resume());
    }
  };
  const write = (obj: unknown) => {
    if (!writable()) return;
    ensureHeaders();
    if (format === "ndjson") return backpressure(res.write(JSON.stringify(obj) + "\n"));
    const json = Buffer.from(JSON.stringify(obj), "utf8");
    res.write(frameHeader(StreamFrame.Event, json.length));
    backpressure(res.write(json));
  };
  /** NDJSON: what a decoder holds (a character cut off at the end) is said before the end */
  const flushers: Array<() => void> = [];
  const emit = (type: "stdout" | "stderr") => {
    if (format === "frames") {
      const kind = type === "stdout" ? StreamFrame.Stdout : StreamFrame.Stderr;
      return (chunk: Buffer) => {
        if (!writable()) return;
        ensureHeaders();
        // header and payload as two writes, sent together (corked): the payload is never copied;
        // it may be a view of a pooled read buffer, held until written (src/shim/read-pool.ts)
        res.cork();
        res.write(frameHeader(kind, chunk.length));
        outputPool.retain(chunk);
        const ok = res.write(chunk, () => outputPool.release(chunk));
        res.uncork();
        backpressure(ok);
      };
    }
    // NDJSON: text, a character split between chunks joined first
    const decoder = new StringDecoder("utf8");
    flushers.push(() => {
      const data = decoder.end();
      if (data) write({ type, data });
    });
    return (chunk: Buffer) => {
      const data = decoder.write(chunk);
      if (data) write({ type, data });
    };
  };
  const sink = { stdout: emit("stdout"), stderr: emit("stderr") };
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
        ...sink,
        // from the command's start, this client's pause is its exec's alone (a slow reader holds up no other command)
        sent: (execId) => flow.bind(execId) },
      abort.signal,
    );
    for (const f of flushers) f();
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
    for (const f of flushers) f();
    write({ type: "error", ...e.toBody() });
    answered = true;
    res.end();
  } finally {
    answered = true;
    flow.close();
  }
}
