/**
 * The typed TypeScript client for the sandboxd daemon, exported by the
 * package: `import { Sandboxd } from "sandboxd"`.
 *
 * It speaks the daemon's HTTP API over its unix socket (docs/API.md) and
 * throws SandboxdError, carrying the daemon's code and hint, for every
 * refusal. Branch on `err.code`, never on the message. It loads nothing of
 * the daemon (no policy engine, no zod, no fastify): the types below are
 * erased at build time.
 */
import type { IncomingMessage } from "node:http";
import { clientSocket } from "../config/paths.js";
import { SandboxdError } from "../errors.js";
import type { Approval } from "../approvals/queue.js";
import type { AuditRecord } from "../audit/journal.js";
import type { ExecResult, JobOutput, JobView, RunInfo } from "../phases/manager.js";
import type { PhaseMode, PhaseView } from "../phases/types.js";
import { StringDecoder } from "node:string_decoder";
import { FrameReader, StreamFrame } from "../frames.js";
import { streamFrames } from "./frame-stream.js";
import { ApiClient, errorFromBody } from "./http.js";

export { SandboxdError } from "../errors.js";
export type { ErrorCode } from "../errors.js";
export type { Approval, AuditRecord, ExecResult, JobOutput, JobView, PhaseMode, PhaseView, RunInfo };

export interface StartPhaseRequest {
  /** absolute path of the project directory */
  project: string;
  /** the phase's name, e.g. "2.3" */
  phase: string;
  mode: PhaseMode;
  /** absolute path of a stricter policy for this phase */
  policy?: string;
}

export interface ExecOptions {
  /** exactly one of argv (no shell) or command (a string judged part by part) */
  argv?: string[];
  command?: string;
  timeoutMs?: number;
  reason?: string;
  /** when the policy asks a person: wait up to this long for their decision (approved: runs; denied: SBX_ERR_APPROVAL_DENIED) */
  waitApprovalMs?: number;
  /** where it starts: relative to the workspace (`services/api`) or under /workspace */
  cwd?: string;
  /** variables of its own (reserved names: SBX_ERR_ENV_RESERVED) */
  env?: Record<string, string>;
  /** bytes for its stdin (text is sent as UTF-8); at most 512 KiB */
  stdin?: string | Uint8Array;
}

/** The exec body: stdin as text, or as base64 for bytes. */
function execBody(req: ExecOptions): Record<string, unknown> {
  const { stdin, ...rest } = req;
  if (stdin === undefined) return rest;
  return typeof stdin === "string" ? { ...rest, stdin } : { ...rest, stdinBase64: Buffer.from(stdin).toString("base64") };
}

export interface StreamHandlers {
  /** output as it arrives (decoded as UTF-8, secrets already scrubbed); given either, the exec streams */
  onStdout?: (text: string) => void;
  onStderr?: (text: string) => void;
  /**
   * output as the bytes the command wrote (secrets already scrubbed), in the pieces they arrive in,
   * never decoded: for a harness that stores or forwards output, and for output that is not text.
   * Each buffer is the handler's to keep. Given either, the exec streams; with onStdout too, both are called.
   */
  onStdoutBytes?: (bytes: Buffer) => void;
  onStderrBytes?: (bytes: Buffer) => void;
  /** the command waits for a person's decision on this request (with waitApprovalMs); given, the exec streams */
  onWaiting?: (wait: { approvalId: string; command: string; rule: { id: string; clause: string }; waitMs: number }) => void;
  /** the command runs, under this id (for `cancel`); given, the exec streams */
  onStarted?: (info: { id: string; pid: number; rule: { id: string; clause: string } }) => void;
  /** aborting ends the command (the daemon kills it when the stream's client goes away) */
  signal?: AbortSignal;
}

export interface VerifyResult {
  ok: boolean;
  [key: string]: unknown;
}

/** How a streamed exec's connection ends when it is cut off rather than answered. */
const CUT_OFF = new Set(["ABORT_ERR", "ECONNRESET", "EPIPE", "ECONNABORTED", "ERR_STREAM_PREMATURE_CLOSE"]);

/** What the decoders hold of a character split at the end of the output, to the handlers. */
function flushText(text: { out: StringDecoder; err: StringDecoder }, handlers: StreamHandlers): void {
  const out = text.out.end();
  const err = text.err.end();
  if (out) handlers.onStdout?.(out);
  if (err) handlers.onStderr?.(err);
}

export class Sandboxd {
  readonly api: ApiClient;

  /** `socket`: the daemon's socket; default $SANDBOXD_SOCKET, else the daemon's default for this user. */
  constructor(opts: { socket?: string } = {}) {
    this.api = new ApiClient(clientSocket(opts.socket));
  }

  /** Any JSON route (e.g. one newer than this client). */
  request<T>(method: string, path: string, body?: unknown): Promise<T> {
    return this.api.request<T>(method, path, body);
  }

  async health(): Promise<{ ok: boolean; version: string; instance: string; pid: number }> {
    return this.request("GET", "/v1/health");
  }

  /* ------------------------------- phases ------------------------------- */

  async startPhase(req: StartPhaseRequest): Promise<PhaseView> {
    return (await this.request<{ phase: PhaseView }>("POST", "/v1/phases", req)).phase;
  }

  async phases(): Promise<PhaseView[]> {
    return (await this.request<{ phases: PhaseView[] }>("GET", "/v1/phases")).phases;
  }

  async phase(id: string): Promise<PhaseView> {
    return (await this.request<{ phase: PhaseView }>("GET", `/v1/phases/${id}`)).phase;
  }

  async stopPhase(id: string): Promise<PhaseView> {
    return (await this.request<{ phase: PhaseView }>("DELETE", `/v1/phases/${id}`)).phase;
  }

  /* -------------------------------- exec -------------------------------- */

  /**
   * Runs a command in the phase; resolves with its result (a non-zero exit is
   * a result, not an error). A refusal throws SandboxdError
   * (SBX_ERR_POLICY_DENIED; SBX_ERR_POLICY_NEEDS_APPROVAL with
   * `details.approvalId`; SBX_ERR_APPROVAL_DENIED with the person's
   * `details.note`; SBX_ERR_APPROVAL_STALE when the approved files changed,
   * with the new request's `details.approvalId`). With handlers, output
   * streams as it arrives.
   */
  async exec(id: string, req: ExecOptions, handlers: StreamHandlers = {}): Promise<ExecResult> {
    const path = `/v1/phases/${id}/exec`;
    const body = execBody(req);
    if (!handlers.onStdout && !handlers.onStderr && !handlers.onStdoutBytes && !handlers.onStderrBytes && !handlers.onWaiting && !handlers.onStarted && !handlers.signal) {
      return (await this.request<{ result: ExecResult }>("POST", path, body)).result;
    }
    // output comes as bytes (docs/API.md "Streaming exec"); a character split between frames is joined before the handler sees it
    const text = { out: new StringDecoder("utf8"), err: new StringDecoder("utf8") };
    let result: ExecResult | null = null;
    let refused: SandboxdError | null = null;
    try {
      // read off the socket directly (frame-stream.ts, as the CLI reads it): no node:http between the daemon and the handlers
      await streamFrames(
        this.api.socketPath,
        `${path}?stream=frames`,
        body,
        (kind, payload) => {
          if (result || refused) return;
          // the payload is a view of a pooled read buffer, valid during this call: copied for a bytes handler, decoded for a text one
          if (kind === StreamFrame.Stdout) {
            handlers.onStdoutBytes?.(Buffer.from(payload));
            if (handlers.onStdout) {
              const t = text.out.write(payload);
              if (t) handlers.onStdout(t);
            }
            return;
          }
          if (kind === StreamFrame.Stderr) {
            handlers.onStderrBytes?.(Buffer.from(payload));
            if (handlers.onStderr) {
              const t = text.err.write(payload);
              if (t) handlers.onStderr(t);
            }
            return;
          }
          // frames of kinds newer daemons may add are skipped
          if (kind !== StreamFrame.Event) return;
          const event = JSON.parse(payload.toString("utf8")) as { type: string; result?: ExecResult; error?: { code: string; message: string; hint?: string } };
          switch (event.type) {
            case "started":
              handlers.onStarted?.(event as unknown as Parameters<NonNullable<StreamHandlers["onStarted"]>>[0]);
              break;
            case "waiting":
              handlers.onWaiting?.(event as unknown as Parameters<NonNullable<StreamHandlers["onWaiting"]>>[0]);
              break;
            case "exit":
              flushText(text, handlers);
              result = event.result!;
              break;
            case "error":
              flushText(text, handlers);
              refused = errorFromBody({ error: event.error }, 500);
              break;
            default:
              // event types of newer daemons are skipped
              break;
          }
        },
        handlers.signal,
      );
    } catch (err) {
      // a response cut off (the caller aborted, the daemon went) is said below; anything else —
      // the daemon's coded errors, an unreachable socket, a handler's own exception — as it is
      if (!CUT_OFF.has((err as NodeJS.ErrnoException).code ?? "")) throw err;
    }
    if (refused) throw refused;
    if (result) return result;
    if (handlers.signal?.aborted) throw new SandboxdError("SBX_ERR_INTERNAL", "the exec was aborted by its caller", { hint: "the daemon killed the command" });
    throw new SandboxdError("SBX_ERR_INTERNAL", "the exec stream ended without a result", {
      hint: `the daemon may have stopped; check \`sandboxd phase show ${id}\``,
    });
  }

  /** The phase's commands running now (foreground and background jobs), each with its id. */
  async execs(id: string): Promise<RunInfo[]> {
    return (await this.request<{ execs: RunInfo[] }>("GET", `/v1/phases/${id}/execs`)).execs;
  }

  /** Cancels a running command by id: SIGTERM, SIGKILL after the kill grace; its caller gets its result with `cancelled`. */
  async cancel(id: string, execId: string, note?: string): Promise<RunInfo> {
    return (await this.request<{ exec: RunInfo }>("POST", `/v1/phases/${id}/execs/${execId}/cancel`, note === undefined ? {} : { note })).exec;
  }

  /* ------------------------------ background jobs ----------------------------- */

  /** Starts a background job: resolves as soon as it runs (a refusal throws, as exec's does). */
  async startJob(id: string, req: ExecOptions): Promise<JobView> {
    return (await this.request<{ job: JobView }>("POST", `/v1/phases/${id}/exec`, { ...execBody(req), background: true })).job;
  }

  async jobs(id: string): Promise<JobView[]> {
    return (await this.request<{ jobs: JobView[] }>("GET", `/v1/phases/${id}/jobs`)).jobs;
  }

  async job(id: string, jobId: string): Promise<JobView> {
    return (await this.request<{ job: JobView }>("GET", `/v1/phases/${id}/jobs/${jobId}`)).job;
  }

  async jobOutput(id: string, jobId: string): Promise<JobOutput> {
    return (await this.request<{ output: JobOutput }>("GET", `/v1/phases/${id}/jobs/${jobId}/output`)).output;
  }

  /** Waits until the job ends or timeoutMs passes (default 30 s): the job as it is then (`state` tells which). */
  async waitJob(id: string, jobId: string, timeoutMs?: number): Promise<JobView> {
    return (await this.request<{ job: JobView }>("GET", `/v1/phases/${id}/jobs/${jobId}/wait${query({ timeoutMs: timeoutMs?.toString() })}`)).job;
  }

  async killJob(id: string, jobId: string, note?: string): Promise<JobView> {
    return (await this.request<{ job: JobView }>("POST", `/v1/phases/${id}/jobs/${jobId}/kill`, note === undefined ? {} : { note })).job;
  }

  /* ------------------------------ approvals ----------------------------- */

  async approvals(opts: { phase?: string; all?: boolean } = {}): Promise<Approval[]> {
    const q = query({ phase: opts.phase, all: opts.all ? "1" : undefined });
    return (await this.request<{ approvals: Approval[] }>("GET", `/v1/approvals${q}`)).approvals;
  }

  async approval(id: string): Promise<Approval> {
    return (await this.request<{ approval: Approval }>("GET", `/v1/approvals/${id}`)).approval;
  }

  async approve(id: string, note?: string): Promise<Approval> {
    return (await this.request<{ approval: Approval }>("POST", `/v1/approvals/${id}/approve`, note === undefined ? {} : { note })).approval;
  }

  async deny(id: string, note?: string): Promise<Approval> {
    return (await this.request<{ approval: Approval }>("POST", `/v1/approvals/${id}/deny`, note === undefined ? {} : { note })).approval;
  }

  /* -------------------------------- audit ------------------------------- */

  async audit(opts: { phase?: string; after?: number; last?: number } = {}): Promise<AuditRecord[]> {
    const q = query({ phase: opts.phase, after: opts.after?.toString(), last: opts.last?.toString() });
    return (await this.request<{ records: AuditRecord[] }>("GET", `/v1/audit${q}`)).records;
  }

  /** Audit records as they are written, until the signal aborts (or the daemon stops). */
  async *followAudit(opts: { phase?: string; after?: number; signal?: AbortSignal } = {}): AsyncGenerator<AuditRecord> {
    const q = query({ phase: opts.phase, after: opts.after?.toString(), follow: "1" });
    const res = await this.api.stream("GET", `/v1/audit${q}`);
    const stop = () => res.destroy();
    opts.signal?.addEventListener("abort", stop, { once: true });
    try {
      yield* ndjson<AuditRecord>(res);
    } finally {
      opts.signal?.removeEventListener("abort", stop);
      res.destroy();
    }
  }

  async verifyAudit(): Promise<VerifyResult> {
    return (await this.request<{ verify: VerifyResult }>("GET", "/v1/audit/verify")).verify;
  }

  /** The public key that signs the trail's anchors (give it, or its fingerprint, to auditors), and the key file. */
  async auditKey(): Promise<AuditKey> {
    return (await this.request<{ key: AuditKey }>("GET", "/v1/audit/key")).key;
  }

  /**
   * `sandboxd audit export -o FILE`: the whole trail as a verifiable bundle
   * (docs/AUDIT.md "Export bundle"), written to `FILE.part`, checked (chain,
   * signature, that it ends at its own export record, and `nonce` when given),
   * then renamed to `file`. `nonce`: an auditor's challenge, recorded in the
   * bundle's last record, so `verifyAuditBundle(file, { nonce })` knows the
   * bundle is not an older one. A bundle that does not check is left at
   * `FILE.part` and SBX_ERR_AUDIT_CORRUPT is thrown.
   */
  async exportAudit(file: string, opts: { nonce?: string } = {}): Promise<AuditExport> {
    const [{ createWriteStream }, { rename }, { pipeline }] = await Promise.all([import("node:fs"), import("node:fs/promises"), import("node:stream/promises")]);
    const res = await this.api.stream("GET", `/v1/audit/export${query({ nonce: opts.nonce })}`);
    const part = `${file}.part`;
    await pipeline(res, createWriteStream(part, { mode: 0o600 }));
    const check = await verifyAuditBundle(part, { nonce: opts.nonce });
    if (!check.ok) throw new SandboxdError("SBX_ERR_AUDIT_CORRUPT", `the exported bundle does not verify (${String(check.reason)}); left at ${part}`);
    await rename(part, file);
    return { file, records: Number(check.records), lastSeq: Number(check.lastSeq), key: String(check.key), nonce: (check.nonce as string | null) ?? null };
  }
}

export interface AuditKey {
  /** SHA-256 (hex) of the public key's DER SubjectPublicKeyInfo */
  fingerprint: string;
  /** PEM */
  publicKey: string;
  keyFile: string;
}

export interface AuditExport {
  file: string;
  records: number;
  lastSeq: number;
  /** fingerprint of the key that signed the bundle's anchor */
  key: string;
  nonce: string | null;
}

/**
 * Checks a bundle without the daemon, as `sandboxd audit verify --bundle`
 * does: `pinned` (fingerprints) must include every key the trail records;
 * `nonce` must be the one the export answered. Loaded only when called.
 */
export async function verifyAuditBundle(file: string, opts: { pinned?: string[]; nonce?: string | undefined } = {}): Promise<VerifyResult> {
  const { verifyBundleFile } = await import("../audit/bundle.js");
  return (await verifyBundleFile(file, opts)) as unknown as VerifyResult;
}

function query(params: Record<string, string | undefined>): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined) q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

/** One JSON value per line; a destroyed response ends the iteration quietly. */
async function* ndjson<T>(res: IncomingMessage): AsyncGenerator<T> {
  let buf = "";
  res.setEncoding("utf8");
  try {
    for await (const chunk of res as AsyncIterable<string>) {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim()) yield JSON.parse(line) as T;
      }
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ERR_STREAM_PREMATURE_CLOSE" && !res.destroyed) throw err;
  }
  if (buf.trim()) yield JSON.parse(buf) as T;
}
