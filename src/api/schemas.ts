/**
 * The zod schemas of every request the API takes: path parameters, queries
 * and bodies. The server parses with them (app.ts), and the OpenAPI document
 * (openapi.ts) is generated from them, so the two cannot drift.
 */
import { z } from "zod";
import { grantPatternSchema } from "../approvals/grants.js";
import { TIMEOUT_CEILING_MS } from "../policy/timeout.js";
import { PHASE_MODES } from "../phases/types.js";
import { MAX_STDIN_BYTES } from "../shim/protocol.js";

export const phaseIdParam = z.object({ id: z.string().regex(/^ph_[0-9a-f]{12}$/, "not a phase id (ph_ followed by 12 hex digits)") });

export const startBody = z
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

export const diffQuery = z.object({ all: z.enum(["0", "1", "true", "false"]).optional() }).strict();
/** a file of the phase's view: `path` is the route's `*` (fastify has decoded it; src/workspace/apply.ts checkRelPath judges it) */
export const filePathParams = phaseIdParam.extend({ path: z.string() });
export const putFileQuery = z.object({ mode: z.string().regex(/^0?[0-7]{3}$/, "permission bits in octal, e.g. 0644 or 755").optional() }).strict();
/** A write through the daemon is at most this large on the wire; the policy's file size limit (10 MB) is checked on top. */
export const MAX_PUT_BYTES = 64 * 1024 * 1024;
export const checkpointBody = z.object({ message: z.string().min(1, "say what the iteration did").max(2000) }).strict();
export const iterationParams = phaseIdParam.extend({ n: z.coerce.number().int().positive() });

/** Linux's MAX_ARG_STRLEN (131,072) counts the terminating NUL: an argument of 131,072 bytes fails with E2BIG. */
export const MAX_ARG_BYTES = 131_071;
/** An exec waits at most this long for a person's decision: a longer wait is a request left to hang, not a decision. */
export const MAX_WAIT_APPROVAL_MS = 3_600_000;
export const execBody = z
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
    /** where the command starts: relative to the workspace, or absolute under /workspace */
    cwd: z
      .string()
      .min(1)
      .max(4096)
      .refine((c) => !c.includes("\0"), "must not contain NUL bytes")
      .optional(),
    /** variables of the command's own (names a .env may not set are refused: SBX_ERR_ENV_RESERVED) */
    env: z
      .record(z.string().refine((v) => !v.includes("\0"), "must not contain NUL bytes"))
      .refine((e) => Object.keys(e).length <= 256, "at most 256 variables")
      .optional(),
    /** bytes for the command's stdin: UTF-8 text, or stdinBase64 for any bytes (at most 512 KiB either way) */
    stdin: z.string().max(MAX_STDIN_BYTES).optional(),
    stdinBase64: z.string().max(Math.ceil(MAX_STDIN_BYTES / 3) * 4 + 4).regex(/^[A-Za-z0-9+/]*={0,2}$/, "must be base64").optional(),
    /** run as a background job: answered (202 {job}) as soon as it runs */
    background: z.boolean().optional(),
  })
  .strict()
  .refine((b) => (b.argv === undefined) !== (b.command === undefined), {
    message: "give exactly one of argv (an array, preferred) or command (a string)",
  })
  .refine((b) => b.stdin === undefined || b.stdinBase64 === undefined, { message: "give at most one of stdin (text) or stdinBase64 (bytes)" });

export const approvalIdParam = z.object({ id: z.string().regex(/^ap_[0-9a-f]{12}$/, "not an approval id (ap_ followed by 12 hex digits)") });
export const approvalsQuery = z
  .object({ all: z.enum(["0", "1", "true", "false"]).optional(), phase: phaseIdParam.shape.id.optional() })
  .strict();
export const decisionBody = z.object({ note: z.string().max(2000).optional() }).strict();

export const grantIdParam = z.object({ id: z.string().regex(/^gr_[0-9a-f]{12}$/, "not a standing approval id (gr_ followed by 12 hex digits)") });
export const grantsQuery = z.object({ all: z.enum(["0", "1", "true", "false"]).optional() }).strict();
/** A standing approval lasts at most 30 days: a longer one is a policy change, which belongs in the policy file. */
export const MAX_GRANT_MS = 30 * 86_400_000;
export const grantBody = z
  .object({
    phase: phaseIdParam.shape.id.optional(),
    project: z.string().min(1).refine((p) => p.startsWith("/"), "must be an absolute path").optional(),
    argv: execBody.innerType().innerType().shape.argv,
    pattern: grantPatternSchema.optional(),
    expiresInMs: z.number().int().positive().max(MAX_GRANT_MS, "at most 30 days"),
    maxTimeoutMs: z.number().int().positive().max(TIMEOUT_CEILING_MS, `at most ${TIMEOUT_CEILING_MS} ms (SKILLS.md §2: 5 minutes)`).optional(),
    note: z.string().max(2000).optional(),
  })
  .strict()
  .refine((b) => (b.phase === undefined) !== (b.project === undefined), { message: "give exactly one scope: phase (an id) or project (a directory)" })
  .refine((b) => (b.argv === undefined) !== (b.pattern === undefined), { message: "give exactly one of argv (an exact command) or pattern (policy-style tokens)" });

export const auditQuery = z
  .object({
    phase: phaseIdParam.shape.id.optional(),
    after: z.coerce.number().int().nonnegative().optional(),
    last: z.coerce.number().int().positive().max(100_000).optional(),
    follow: z.enum(["0", "1", "true", "false"]).optional(),
  })
  .strict();

/**
 * A caller's challenge for `GET /v1/audit/export`: recorded in the bundle's
 * last record (audit.export), under the signature, so the auditor who chose
 * it knows the bundle was made for this request and is not an older one.
 */
export const AUDIT_NONCE = /^[A-Za-z0-9._:-]{1,128}$/;
export const auditExportQuery = z
  .object({
    nonce: z.string().regex(AUDIT_NONCE, "1-128 characters of A-Z a-z 0-9 . _ : -").optional(),
  })
  .strict();

export const noteBody = z.object({ note: z.string().max(2000).optional() }).strict();
export const escalationsQuery = z.object({ all: z.enum(["0", "1", "true", "false"]).optional() }).strict();
export const eventsQuery = z
  .object({
    since: z.coerce.number().int().nonnegative().optional(),
    phase: phaseIdParam.shape.id.optional(),
    follow: z.enum(["0", "1", "true", "false"]).optional(),
  })
  .strict();

/** `stream`: `frames` for the byte format (src/frames.ts), `1`/`true`/`ndjson` for NDJSON, `0`/`false` (or none) for one JSON answer */
export const streamQuery = z.object({ stream: z.enum(["0", "1", "true", "false", "ndjson", "frames"]).optional() }).strict();
export const logsQuery = z.object({ follow: z.enum(["0", "1", "true", "false"]).optional() }).strict();


/** A planned restart waits at most this long for running commands before it cancels them. */
export const MAX_DRAIN_MS = 300_000;
export const daemonStopBody = z
  .object({
    keepPhases: z.boolean().optional(),
    drainMs: z.number().int().nonnegative().max(MAX_DRAIN_MS, "at most 5 minutes (300,000 ms)").optional(),
  })
  .strict();

const runIdSchema = z.string().regex(/^(ex|jb)_[0-9a-f]{12}$/, "not a command id (ex_ or jb_ followed by 12 hex digits)");
export const runParams = phaseIdParam.extend({ exec: runIdSchema });
export const jobParams = phaseIdParam.extend({ job: z.string().regex(/^jb_[0-9a-f]{12}$/, "not a job id (jb_ followed by 12 hex digits)") });
/** A wait answers after at most this long, ended or not: wait again. */
export const MAX_JOB_WAIT_MS = 3_600_000;
export const jobWaitQuery = z
  .object({ timeoutMs: z.coerce.number().int().positive().max(MAX_JOB_WAIT_MS, "at most 1 hour (3,600,000 ms); wait again after that").optional() })
  .strict();
