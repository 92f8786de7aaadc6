/**
 * The daemon's errors as the clients raise them: its coded error body as a
 * SandboxdError, and a socket that cannot be reached. No node:http, so the
 * CLI's streaming path (./frame-stream.ts) can use them without loading it.
 */
import { SandboxdError, isErrorCode, type ErrorBody } from "../errors.js";

/** The daemon's `{error: {code, message, hint}}` body as a SandboxdError. */
export function errorFromBody(json: unknown, status: number): SandboxdError {
  const e = (json as Partial<ErrorBody>)?.error;
  if (e && isErrorCode(e.code)) return new SandboxdError(e.code, e.message, { hint: e.hint, details: e.details });
  return new SandboxdError("SBX_ERR_INTERNAL", `daemon answered HTTP ${status} without a coded error`);
}

/** A connection error to the daemon's socket: missing, refused or not ours to open is "unreachable"; anything else as it is. */
export function unreachable(err: NodeJS.ErrnoException, socketPath: string): Error {
  if (err.code === "ENOENT" || err.code === "ECONNREFUSED" || err.code === "EACCES") {
    return new SandboxdError(
      "SBX_ERR_DAEMON_UNREACHABLE",
      `cannot reach the sandboxd daemon at ${socketPath} (${err.code})`,
      err.code === "EACCES" ? { hint: "the socket is 0600: run the CLI as the daemon's user" } : {},
    );
  }
  return err;
}
