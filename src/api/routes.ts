/**
 * The table of the API's routes: method, path, the zod schemas of what each
 * takes, and what it answers. app.ts registers a handler only for a route
 * of this table (and parses with its schemas); openapi.ts generates the
 * OpenAPI document from it; a test checks that the table, the server's
 * registered routes and docs/API.md name the same routes. A route therefore
 * cannot exist undocumented, nor be documented without existing.
 */
import type { z } from "zod";
import type { ErrorCode } from "../errors.js";
import * as S from "./schemas.js";

export type Method = "GET" | "POST" | "DELETE" | "PUT";

export interface RouteDef {
  method: Method;
  /** fastify's form: `/v1/phases/:id` */
  path: string;
  summary: string;
  tag: "daemon" | "phases" | "exec" | "jobs" | "workspace" | "fail-fast" | "approvals" | "audit";
  params?: z.AnyZodObject;
  query?: z.AnyZodObject;
  body?: z.ZodTypeAny;
  /** the answer when it works: its status, what it is, and how it is encoded */
  ok: { status: number; description: string; content: "json" | "ndjson" | "text" | "json-or-ndjson" | "bytes" | "exec" };
  /** the body is raw bytes of this type (not JSON), at most bodyLimit */
  rawBody?: "application/octet-stream";
  bodyLimit?: number;
  /** the coded errors this route is known to answer (beyond SBX_ERR_VALIDATION, SBX_ERR_BAD_JSON and SBX_ERR_INTERNAL) */
  errors?: readonly ErrorCode[];
}

const phase = { params: S.phaseIdParam } as const;
const running: readonly ErrorCode[] = ["SBX_ERR_PHASE_NOT_FOUND", "SBX_ERR_PHASE_NOT_RUNNING", "SBX_ERR_PHASE_ESCALATED", "SBX_ERR_PHASE_PAUSED"];

export const ROUTES = [
  { method: "GET", path: "/v1/health", tag: "daemon", summary: "the daemon's version, instance, pid, state dir and socket", ok: { status: 200, description: "{ok, version, instance, pid, stateDir, socket}", content: "json" } },
  {
    method: "POST", path: "/v1/daemon/stop", tag: "daemon", summary: "stop the daemon; with keepPhases, a planned restart that leaves running phases for the next daemon to re-adopt", body: S.daemonStopBody,
    ok: { status: 200, description: "{stopping: true, keepPhases, phases} once the phases are stopped or detached; the daemon then closes", content: "json" },
    errors: ["SBX_ERR_SHUTDOWN_REFUSED", "SBX_ERR_SHUTTING_DOWN"],
  },
  { method: "GET", path: "/v1/openapi.json", tag: "daemon", summary: "this document (OpenAPI 3.1), generated from the schemas the server validates with", ok: { status: 200, description: "the OpenAPI document", content: "json" } },

  { method: "GET", path: "/v1/phases", tag: "phases", summary: "every phase on record, oldest first, and the warm pool's status", ok: { status: 200, description: "{phases: [...], pool: {state, size, ready, filling, hits, misses, hitRate, fills, failures, lastError}}", content: "json" } },
  {
    method: "POST", path: "/v1/phases", tag: "phases", summary: "start a phase: container, shim, workspace layer, tunnels", body: S.startBody,
    ok: { status: 201, description: "{phase}, once the container runs and its shim has connected", content: "json" },
    errors: ["SBX_ERR_PROJECT_NOT_FOUND", "SBX_ERR_PROJECT_NOT_DIR", "SBX_ERR_PROJECT_ROOT_OWNED", "SBX_ERR_IMAGE_MISSING", "SBX_ERR_DOCKER", "SBX_ERR_SHIM_TIMEOUT"],
  },
  { method: "GET", path: "/v1/phases/:id", tag: "phases", summary: "one phase", ...phase, ok: { status: 200, description: "{phase}", content: "json" }, errors: ["SBX_ERR_PHASE_NOT_FOUND"] },
  { method: "DELETE", path: "/v1/phases/:id", tag: "phases", summary: "stop a phase: its commands and jobs end, its container is removed, its report is kept", ...phase, ok: { status: 200, description: "{phase}", content: "json" }, errors: ["SBX_ERR_PHASE_NOT_FOUND", "SBX_ERR_PHASE_NOT_RUNNING"] },
  { method: "GET", path: "/v1/phases/:id/logs", tag: "phases", summary: "the container's log (the shim's JSON lines)", ...phase, query: S.logsQuery, ok: { status: 200, description: "text; with follow=1 it stays open", content: "text" }, errors: ["SBX_ERR_PHASE_NOT_FOUND"] },

  {
    method: "POST", path: "/v1/phases/:id/exec", tag: "exec", summary: "run one command (judged by the policy, recorded before it runs)", ...phase, query: S.streamQuery, body: S.execBody,
    ok: { status: 200, description: "{result}; with stream=frames, the byte stream (5-byte frame headers: JSON events, stdout and stderr bytes); with stream=1, NDJSON events (waiting, started, stdout, stderr, exit, error); with background: 202 {job} once it runs", content: "exec" },
    errors: [
      ...running, "SBX_ERR_POLICY_DENIED", "SBX_ERR_COMMAND_PARSE", "SBX_ERR_POLICY_NEEDS_APPROVAL", "SBX_ERR_APPROVAL_DENIED", "SBX_ERR_APPROVAL_STALE", "SBX_ERR_TIMEOUT_RANGE",
      "SBX_ERR_REQUEST_TOO_LARGE", "SBX_ERR_AUDIT_BUDGET", "SBX_ERR_SHIM_LOST", "SBX_ERR_EXEC_CWD", "SBX_ERR_ENV_RESERVED", "SBX_ERR_SHIM_OUTDATED", "SBX_ERR_JOB_LIMIT",
    ],
  },
  { method: "GET", path: "/v1/phases/:id/execs", tag: "exec", summary: "the phase's commands running now (foreground and background), each with its id", ...phase, ok: { status: 200, description: "{execs: [...]}", content: "json" }, errors: ["SBX_ERR_PHASE_NOT_FOUND"] },
  { method: "POST", path: "/v1/phases/:id/execs/:exec/cancel", tag: "exec", summary: "cancel a running command by id (SIGTERM, SIGKILL after the kill grace; recorded first)", params: S.runParams, body: S.noteBody, ok: { status: 200, description: "{exec}", content: "json" }, errors: ["SBX_ERR_EXEC_NOT_FOUND"] },

  { method: "GET", path: "/v1/phases/:id/jobs", tag: "jobs", summary: "the phase's background jobs (running and ended)", ...phase, ok: { status: 200, description: "{jobs: [...]}", content: "json" }, errors: ["SBX_ERR_PHASE_NOT_FOUND"] },
  { method: "GET", path: "/v1/phases/:id/jobs/:job", tag: "jobs", summary: "one background job (its result once it ended)", params: S.jobParams, ok: { status: 200, description: "{job}", content: "json" }, errors: ["SBX_ERR_EXEC_NOT_FOUND"] },
  { method: "GET", path: "/v1/phases/:id/jobs/:job/output", tag: "jobs", summary: "a job's output so far (head and tail kept, as an exec's)", params: S.jobParams, ok: { status: 200, description: "{output}", content: "json" }, errors: ["SBX_ERR_EXEC_NOT_FOUND"] },
  { method: "GET", path: "/v1/phases/:id/jobs/:job/wait", tag: "jobs", summary: "wait (long poll) until the job ends or timeoutMs passes (default 30 s)", params: S.jobParams, query: S.jobWaitQuery, ok: { status: 200, description: "{job} (state still running when the wait ended first)", content: "json" }, errors: ["SBX_ERR_EXEC_NOT_FOUND"] },
  { method: "POST", path: "/v1/phases/:id/jobs/:job/kill", tag: "jobs", summary: "kill a job (a cancel by its id) and answer once it ended", params: S.jobParams, body: S.noteBody, ok: { status: 200, description: "{job}", content: "json" }, errors: ["SBX_ERR_EXEC_NOT_FOUND"] },

  { method: "POST", path: "/v1/phases/:id/pause", tag: "fail-fast", summary: "freeze a running phase (a person's hand)", ...phase, body: S.noteBody, ok: { status: 200, description: "{phase}", content: "json" }, errors: ["SBX_ERR_PHASE_NOT_RUNNING"] },
  { method: "POST", path: "/v1/phases/:id/resume", tag: "fail-fast", summary: "thaw an escalated or paused phase (a note is required after an escalation)", ...phase, body: S.noteBody, ok: { status: 200, description: "{phase}", content: "json" }, errors: ["SBX_ERR_PHASE_NOT_ESCALATED"] },
  { method: "POST", path: "/v1/phases/:id/abort", tag: "fail-fast", summary: "end the phase as failed (aborted by operator)", ...phase, body: S.noteBody, ok: { status: 200, description: "{phase}", content: "json" }, errors: ["SBX_ERR_PHASE_NOT_FOUND"] },
  { method: "GET", path: "/v1/phases/:id/report", tag: "fail-fast", summary: "the phase report (built now for a live phase)", ...phase, ok: { status: 200, description: "{report, text}", content: "json" }, errors: ["SBX_ERR_PHASE_NOT_FOUND"] },
  { method: "GET", path: "/v1/phases/:id/escalation", tag: "fail-fast", summary: "the phase's last escalation and its report's text", ...phase, ok: { status: 200, description: "{escalation, text}", content: "json" }, errors: ["SBX_ERR_NOT_FOUND"] },
  { method: "GET", path: "/v1/escalations", tag: "fail-fast", summary: "open escalations (every one with all=1)", query: S.escalationsQuery, ok: { status: 200, description: "{escalations: [...]}", content: "json" } },

  { method: "POST", path: "/v1/phases/:id/checkpoint", tag: "workspace", summary: "judge the changes since the last checkpoint as an iteration", ...phase, body: S.checkpointBody, ok: { status: 200, description: "{iteration} (null when nothing changed)", content: "json" }, errors: [...running, "SBX_ERR_ITERATION_PENDING"] },
  { method: "GET", path: "/v1/phases/:id/files", tag: "workspace", summary: "the pending change set", ...phase, ok: { status: 200, description: "{changes: [...]}", content: "json" } },
  { method: "GET", path: "/v1/phases/:id/diff", tag: "workspace", summary: "the pending change set as a unified diff (all=1: the whole phase)", ...phase, query: S.diffQuery, ok: { status: 200, description: "{diff}", content: "json" } },
  {
    method: "GET", path: "/v1/phases/:id/files/*", tag: "workspace", summary: "a file as the phase sees it (its view), never through a link", params: S.filePathParams,
    ok: { status: 200, description: "the file's bytes; its permission bits in X-Sandboxd-Mode", content: "bytes" },
    errors: ["SBX_ERR_PHASE_NOT_FOUND", "SBX_ERR_PHASE_NOT_RUNNING", "SBX_ERR_PATH_INVALID", "SBX_ERR_FILE_NOT_FOUND", "SBX_ERR_FILE_TOO_LARGE"],
  },
  {
    method: "PUT", path: "/v1/phases/:id/files/*", tag: "workspace", summary: "write a file into the phase's view: atomic, size-checked, Python compiled first, never through a link", params: S.filePathParams, query: S.putFileQuery,
    rawBody: "application/octet-stream", bodyLimit: S.MAX_PUT_BYTES,
    ok: { status: 200, description: "{file: {path, created, size, mode, sha256, atCheckpoint}}", content: "json" },
    errors: [...running, "SBX_ERR_ITERATION_PENDING", "SBX_ERR_PATH_INVALID", "SBX_ERR_PATH_PROTECTED", "SBX_ERR_FILE_TOO_LARGE", "SBX_ERR_PYTHON_SYNTAX", "SBX_ERR_REQUEST_TOO_LARGE", "SBX_ERR_SHIM_LOST"],
  },
  { method: "POST", path: "/v1/phases/:id/iterations/:n/accept", tag: "workspace", summary: "accept a pending iteration (applied to the project)", params: S.iterationParams, body: S.decisionBody, ok: { status: 200, description: "{iteration}", content: "json" }, errors: ["SBX_ERR_ITERATION_NOT_FOUND", "SBX_ERR_ITERATION_DECIDED"] },
  { method: "POST", path: "/v1/phases/:id/iterations/:n/reject", tag: "workspace", summary: "reject a pending iteration (discarded)", params: S.iterationParams, body: S.decisionBody, ok: { status: 200, description: "{iteration}", content: "json" }, errors: ["SBX_ERR_ITERATION_NOT_FOUND", "SBX_ERR_ITERATION_DECIDED"] },

  { method: "GET", path: "/v1/approvals", tag: "approvals", summary: "approval requests (pending only without all=1)", query: S.approvalsQuery, ok: { status: 200, description: "{approvals: [...]}", content: "json" } },
  { method: "GET", path: "/v1/approvals/:id", tag: "approvals", summary: "one approval request", params: S.approvalIdParam, ok: { status: 200, description: "{approval}", content: "json" }, errors: ["SBX_ERR_APPROVAL_NOT_FOUND"] },
  { method: "POST", path: "/v1/approvals/:id/approve", tag: "approvals", summary: "approve a request (the command may run once)", params: S.approvalIdParam, body: S.decisionBody, ok: { status: 200, description: "{approval}", content: "json" }, errors: ["SBX_ERR_APPROVAL_NOT_FOUND", "SBX_ERR_APPROVAL_DECIDED", "SBX_ERR_APPROVAL_STALE", "SBX_ERR_PHASE_NOT_RUNNING"] },
  { method: "POST", path: "/v1/approvals/:id/deny", tag: "approvals", summary: "deny a request", params: S.approvalIdParam, body: S.decisionBody, ok: { status: 200, description: "{approval}", content: "json" }, errors: ["SBX_ERR_APPROVAL_NOT_FOUND", "SBX_ERR_APPROVAL_DECIDED", "SBX_ERR_PHASE_NOT_RUNNING"] },
  { method: "GET", path: "/v1/grants", tag: "approvals", summary: "standing approvals (active only without all=1)", query: S.grantsQuery, ok: { status: 200, description: "{grants: [...]}", content: "json" } },
  { method: "POST", path: "/v1/grants", tag: "approvals", summary: "grant a standing approval (phase or project scope, exact argv or pattern, expiry)", body: S.grantBody, ok: { status: 200, description: "{grant}", content: "json" }, errors: ["SBX_ERR_PHASE_NOT_RUNNING", "SBX_ERR_PROJECT_NOT_FOUND"] },
  { method: "POST", path: "/v1/grants/:id/revoke", tag: "approvals", summary: "revoke a standing approval", params: S.grantIdParam, body: S.decisionBody, ok: { status: 200, description: "{grant}", content: "json" }, errors: ["SBX_ERR_GRANT_NOT_FOUND"] },

  { method: "GET", path: "/v1/events", tag: "audit", summary: "NDJSON events derived from the audit trail (follows unless follow=0)", query: S.eventsQuery, ok: { status: 200, description: "NDJSON, one event a line", content: "ndjson" } },
  { method: "GET", path: "/v1/audit", tag: "audit", summary: "audit.jsonl records (a list; NDJSON as they are appended with follow=1)", query: S.auditQuery, ok: { status: 200, description: "{records: [...]}, or NDJSON with follow=1", content: "json-or-ndjson" } },
  { method: "GET", path: "/v1/audit/verify", tag: "audit", summary: "verify the audit trail's hash chain, its anchor and the anchor's signature", ok: { status: 200, description: "{verify}", content: "json" } },
  { method: "GET", path: "/v1/audit/key", tag: "audit", summary: "the ed25519 public key that signs the audit anchors, its fingerprint and key file", ok: { status: 200, description: "{key: {fingerprint, publicKey, keyFile}}", content: "json" } },
  { method: "GET", path: "/v1/audit/export", tag: "audit", summary: "a verifiable bundle of the whole trail: header, records, signed anchor (docs/AUDIT.md \"Export bundle\"); nonce: the auditor's challenge, recorded in the bundle's last record", query: S.auditExportQuery, ok: { status: 200, description: "JSON lines: header, records 1…N byte for byte, {anchor}", content: "ndjson" }, errors: ["SBX_ERR_AUDIT_CORRUPT", "SBX_ERR_AUDIT_FAILED"] },
] as const satisfies readonly RouteDef[];

export type RouteKey = `${(typeof ROUTES)[number]["method"]} ${(typeof ROUTES)[number]["path"]}`;

export function routeKey(r: Pick<RouteDef, "method" | "path">): string {
  return `${r.method} ${r.path}`;
}

/** The table's entry for `key`; throws for a route the table does not have (a handler for an undocumented route is a bug). */
export function routeOf(key: string): RouteDef {
  const def = (ROUTES as readonly RouteDef[]).find((r) => routeKey(r) === key);
  if (!def) throw new Error(`route ${key} is not in src/api/routes.ts: add it there (and to docs/API.md) before registering it`);
  return def;
}
