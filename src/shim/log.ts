/**
 * The shim's logger: one JSON object per line on stderr, which Docker keeps
 * as the container's log. Deliberately not pino: the shim is a single bundled
 * file for an old Node, and it logs a handful of events, not a stream.
 *
 * Per-command events (each exec's start and exit) are `debug`, written only
 * when the daemon runs at SANDBOXD_LOG_LEVEL debug or trace (it then sets
 * SANDBOXD_SHIM_LOG_LEVEL=debug in the container): every line goes through
 * Docker's log driver, whose work per line cost each `exec true` about
 * 0.45 ms here (BENCHMARKS.md), and the audit trail records every command
 * anyway.
 *
 * Never pass environment values here (the token, or an exec's `env`).
 */
export type LogLevel = "debug" | "info" | "warn" | "error";

/** SHIM_ENV.logLevel (protocol.ts; not imported: this file has no imports) */
const debugOn = process.env.SANDBOXD_SHIM_LOG_LEVEL === "debug";

export function log(level: LogLevel, msg: string, fields: Record<string, unknown> = {}): void {
  if (level === "debug" && !debugOn) return;
  // stderr is a pipe under Docker, and pipe writes are synchronous on Linux, so
  // a line logged just before process.exit() is not lost.
  process.stderr.write(`${JSON.stringify({ ts: new Date().toISOString(), level, msg, ...fields })}\n`);
}

/** `err` as loggable fields (code and message only; stacks only for crashes). */
export function errorFields(err: unknown): { code?: string; error: string } {
  if (err instanceof Error) {
    const code = (err as NodeJS.ErrnoException).code;
    return code === undefined ? { error: err.message } : { code, error: err.message };
  }
  return { error: String(err) };
}
