/**
 * The one registry of sandboxd's coded errors.
 *
 * Every error that crosses the API carries a stable `SBX_ERR_*` code, an HTTP
 * status, a message saying what went wrong and a hint saying what to do next.
 * Clients branch on the code; codes are never reused for another meaning.
 */

export interface ErrorSpec {
  status: number;
  /** default hint; a throw site may give a more specific one */
  hint: string;
}

export const ERRORS = {
  SBX_ERR_BAD_JSON: { status: 400, hint: "send a JSON object body with Content-Type: application/json" },
  SBX_ERR_VALIDATION: { status: 400, hint: "fix the fields named above; docs/API.md lists each route's body" },
  SBX_ERR_PROJECT_NOT_FOUND: { status: 400, hint: "pass the path of an existing project directory" },
  SBX_ERR_PROJECT_NOT_DIR: { status: 400, hint: "pass the project's directory, not a file inside it" },
  SBX_ERR_PROJECT_ROOT_OWNED: {
    status: 400,
    hint: "give the project to the operator's user (chown -R USER: DIR); commands run as the project's owner and never as root",
  },
  SBX_ERR_BUILD_LOG_UNSAFE: {
    status: 400,
    hint: "remove or rename that file in the project; sandboxd creates build_audit.log itself (or set SANDBOXD_BUILD_LOG=state)",
  },
  SBX_ERR_REQUEST_TOO_LARGE: {
    status: 413,
    hint: "put large inputs in a file in the project and name the file in the command; one argument or variable may be at most 131,071 bytes, a command's arguments and environment together about 1 MiB",
  },
  SBX_ERR_TIMEOUT_RANGE: { status: 400, hint: "use a timeout within 5 minutes (SKILLS.md §2); over the mode's limit a person approves it (one command, or a standing approval with --max-timeout), or the operator raises limits.modes.<mode>.maxTimeoutMs" },
  SBX_ERR_NOT_FOUND: { status: 404, hint: "check the URL; docs/API.md lists the routes" },
  SBX_ERR_PHASE_NOT_FOUND: { status: 404, hint: "list phases with `sandboxd ps`" },
  SBX_ERR_PHASE_NOT_RUNNING: { status: 409, hint: "start a new phase with `sandboxd phase start`" },
  SBX_ERR_PHASE_ESCALATED: {
    status: 423,
    hint: "a person reads the escalation report (`sandboxd escalations ls`), then `sandboxd phase resume <id> --note …` or `sandboxd phase abort <id>`",
  },
  SBX_ERR_PHASE_PAUSED: { status: 423, hint: "a person paused this phase; `sandboxd phase resume <id>` lets it go on" },
  SBX_ERR_PHASE_NOT_ESCALATED: { status: 409, hint: "only an escalated or paused phase can be resumed; `sandboxd ps` shows its state" },
  SBX_ERR_POLICY_DENIED: { status: 403, hint: "run a narrower command that the policy allows" },
  SBX_ERR_POLICY_NEEDS_APPROVAL: { status: 403, hint: "this command is not on the whitelist and needs human approval" },
  SBX_ERR_COMMAND_PARSE: {
    status: 403,
    hint: "pass the command as argv (an array, no shell), or a simpler command string the policy can judge part by part",
  },
  SBX_ERR_APPROVAL_NOT_FOUND: { status: 404, hint: "list pending approvals with `sandboxd approvals ls`" },
  SBX_ERR_APPROVAL_DENIED: {
    status: 403,
    hint: "a person denied this exact command in this phase; do something else, or ask the operator to reconsider (`sandboxd approvals approve ID`)",
  },
  SBX_ERR_APPROVAL_STALE: {
    status: 409,
    hint: "the files this command runs changed after a person approved it; a new request with their current content is pending",
  },
  SBX_ERR_GRANT_NOT_FOUND: { status: 404, hint: "list standing approvals with `sandboxd approvals grants --all`" },
  SBX_ERR_APPROVAL_DECIDED: { status: 409, hint: "this approval was already decided; `sandboxd approvals ls --all` shows its decision" },
  SBX_ERR_POLICY_INVALID: { status: 400, hint: "fix the policy file at the paths named above; every problem is listed" },
  SBX_ERR_AUDIT_FAILED: {
    status: 503,
    hint: "the audit trail cannot be written (disk full or I/O error); free space or fix the disk: the daemon re-probes every second and takes work again by itself, recording the gap; nothing runs without a record",
  },
  SBX_ERR_AUDIT_BUDGET: {
    status: 429,
    hint: "this phase made more audit records or bytes than its policy allows (audit.phaseBudget), so it takes no new work; stop it (`sandboxd phase stop`) and look at what flooded its trail",
  },
  SBX_ERR_AUDIT_KEY: {
    status: 500,
    hint: "the daemon signs every audit anchor with its ed25519 key and never writes one unsigned; fix the key file named above (docs/AUDIT.md \"Signed anchors\")",
  },
  SBX_ERR_AUDIT_CORRUPT: { status: 500, hint: "the audit chain does not verify; run `sandboxd audit verify` to find the first bad record" },
  SBX_ERR_SQL_REFUSED: { status: 403, hint: "run a read-only query, or one the phase's mode allows" },
  SBX_ERR_IMAGE_MISSING: { status: 503, hint: "build the sandbox image with `sandboxd image build`" },
  SBX_ERR_DOCKER: { status: 502, hint: "check that the Docker engine is running (`docker info`)" },
  SBX_ERR_SHIM_TIMEOUT: { status: 504, hint: "the sandbox's shim did not connect; see `sandboxd logs <id>` and the daemon log" },
  SBX_ERR_SHIM_LOST: { status: 502, hint: "the sandbox's shim disconnected; the command's result is unknown, see `sandboxd logs <id>`" },
  SBX_ERR_SHUTTING_DOWN: { status: 503, hint: "the daemon is stopping; start it again with `sandboxd start`" },
  SBX_ERR_DAEMON_RUNNING: { status: 409, hint: "another daemon holds this socket; stop it or pass --socket" },
  SBX_ERR_DAEMON_UNREACHABLE: { status: 503, hint: "start the daemon with `sandboxd start` (or `npm start`), or pass --socket" },
  SBX_ERR_CONSOLE_ADDRESS: {
    status: 500,
    hint: "give the console a loopback address and a port, e.g. --console 127.0.0.1:8470 (or [::1]:8470); to reach it from elsewhere, forward the port over SSH (ssh -L 8470:127.0.0.1:8470 HOST)",
  },
  SBX_ERR_CONSOLE_AUTH: {
    status: 401,
    hint: "open the login URL the daemon printed at start (…/login#TOKEN), or send Authorization: Bearer TOKEN",
  },
  SBX_ERR_CONSOLE_FORBIDDEN: {
    status: 403,
    hint: "the console answers only its own pages: requests must name it by its own address (Host), and changes need its Origin and the X-Sandboxd-CSRF header the page sends",
  },
  SBX_ERR_CONFIG: { status: 500, hint: "fix the settings named above and start again" },
  SBX_ERR_WORKSPACE: { status: 500, hint: "the phase's change layer could not be mounted or changed; the daemon log has the details (docs/WORKSPACE.md)" },
  SBX_ERR_WORKSPACE_UNSUPPORTED: {
    status: 400,
    hint: "the project must be on a local file system overlayfs can use as a lower layer, and the daemon needs root, a loop device and mkfs.ext4 (docs/WORKSPACE.md)",
  },
  SBX_ERR_ITERATION_REJECTED: { status: 409, hint: "the iteration was discarded; the workspace is back to the last accepted state: fix what the failures name and try again" },
  SBX_ERR_ITERATION_PENDING: { status: 409, hint: "a human must accept or reject the pending iteration first (`sandboxd iteration accept|reject`)" },
  SBX_ERR_ITERATION_NOT_FOUND: { status: 404, hint: "`sandboxd phase show <id>` lists the phase's iterations" },
  SBX_ERR_ITERATION_DECIDED: { status: 409, hint: "this iteration was already decided; `sandboxd phase show <id>` shows how" },
  SBX_ERR_PATH_INVALID: { status: 400, hint: "name a file by its project-relative path (no `..`, no leading /, no NUL, no symbolic link on the way)" },
  SBX_ERR_FILE_TOO_LARGE: { status: 413, hint: "write a smaller file; the policy's file size limit applies to project files" },
  SBX_ERR_EXEC_CWD: {
    status: 400,
    hint: "name an existing directory inside the workspace, relative to it (`services/api`) or under /workspace; links that lead out of it are refused",
  },
  SBX_ERR_ENV_RESERVED: {
    status: 400,
    hint: "leave out the names listed: the daemon sets them, or they change what runs or where packages come from (src/policy/env.ts lists each with its reason)",
  },
  SBX_ERR_SHIM_OUTDATED: {
    status: 409,
    hint: "this phase's container runs an older shim without that feature; start a new phase (after `sandboxd image build`) to use it",
  },
  SBX_ERR_EXEC_NOT_FOUND: { status: 404, hint: "`sandboxd execs <phase>` lists the phase's running commands and `sandboxd jobs ls <phase>` its background jobs" },
  SBX_ERR_JOB_LIMIT: { status: 429, hint: "wait for or kill one of the phase's background jobs (`sandboxd jobs ls <phase>`) before starting another" },
  SBX_ERR_SHUTDOWN_REFUSED: {
    status: 409,
    hint: "a planned restart keeps only running phases: resume, abort or stop the ones named, or stop the daemon without --keep-phases (which stops every phase)",
  },
  SBX_ERR_FILE_NOT_FOUND: { status: 404, hint: "`sandboxd files <phase>` lists what the phase changed; the path is project-relative" },
  SBX_ERR_PATH_PROTECTED: {
    status: 403,
    hint: "this path is protected in the sandbox (SKILLS.md §1: credentials hidden; .git, build_audit.log, policy files and main.py read-only); write another path",
  },
  SBX_ERR_PYTHON_SYNTAX: { status: 422, hint: "fix the syntax error the compiler names and write the file again; nothing was written" },
  SBX_ERR_INTERNAL: { status: 500, hint: "this is a bug in sandboxd; the daemon log has the details" },
} as const satisfies Record<string, ErrorSpec>;

export type ErrorCode = keyof typeof ERRORS;

export interface ErrorBody {
  error: { code: ErrorCode; message: string; hint: string; details?: unknown };
}

export class SandboxdError extends Error {
  override name = "SandboxdError";
  readonly code: ErrorCode;
  readonly status: number;
  readonly hint: string;
  readonly details: unknown;

  constructor(code: ErrorCode, message: string, opts: { hint?: string; details?: unknown; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.code = code;
    this.status = ERRORS[code].status;
    this.hint = opts.hint ?? ERRORS[code].hint;
    this.details = opts.details;
  }

  toBody(): ErrorBody {
    const error: ErrorBody["error"] = { code: this.code, message: this.message, hint: this.hint };
    if (this.details !== undefined) error.details = this.details;
    return { error };
  }
}

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === "string" && Object.prototype.hasOwnProperty.call(ERRORS, value);
}
