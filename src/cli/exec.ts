/**
 * `sandboxd exec`: the request, its byte stream printed as it arrives, and
 * the exit status. Agent harnesses run this as a process per command, so it
 * is the CLI's hot path: this module and what it imports load nothing but
 * node built-ins and small dependency-free modules (no commander, no zod, no
 * daemon code). main.ts runs it straight from argv (./exec-args.ts) and the
 * full command tree (./program.ts) calls it for the forms only commander
 * understands.
 */
import { escapeControl } from "../audit/format.js";
import { SandboxdError } from "../errors.js";
import { StreamFrame } from "../frames.js";
import { clientPool, streamFrames } from "../client/frame-stream.js";
import type { ExecResult } from "../phases/manager.js";
import { EXIT, exitCodeFor, exitCodeForRefusal } from "./exit-codes.js";

/** `--wait-approval` without a value: 10 minutes. */
export const DEFAULT_WAIT_APPROVAL_MS = 600_000;

export interface ExecCommand {
  socket: string;
  id: string;
  /** exactly one of argv and command */
  argv?: string[];
  command?: string;
  timeoutMs?: number;
  reason?: string;
  waitApprovalMs?: number;
  /** the directory it starts in (inside the workspace) */
  cwd?: string;
  /** variables of the command's own (names the daemon sets or reserves are refused) */
  env?: Record<string, string>;
  /** bytes for the command's stdin */
  stdinBase64?: string;
  /** run as a background job: print its id once it runs */
  background?: boolean;
  /** do not stream: print the result record as JSON at the end */
  json?: boolean;
}

/** Text for a terminal: invisible characters escaped line by line (a message may hold a command from the sandbox). */
export function visible(text: string): string {
  return text.split("\n").map(escapeControl).join("\n");
}

export function printError(err: unknown): void {
  if (err instanceof SandboxdError) {
    process.stderr.write(visible(`sandboxd: ${err.message} [${err.code}]\n  hint: ${err.hint}`) + "\n");
  } else {
    process.stderr.write(visible(`sandboxd: ${(err as Error).message ?? String(err)}`) + "\n");
  }
}

/** Runs the command in the phase; resolves with the CLI's exit status (README "Exit codes"). */
export async function runExec(c: ExecCommand): Promise<number> {
  const body = {
    ...(c.command !== undefined ? { command: c.command } : { argv: c.argv ?? [] }),
    ...(c.timeoutMs ? { timeoutMs: c.timeoutMs } : {}),
    ...(c.reason ? { reason: c.reason } : {}),
    ...(c.waitApprovalMs ? { waitApprovalMs: c.waitApprovalMs } : {}),
    ...(c.cwd !== undefined ? { cwd: c.cwd } : {}),
    ...(c.env && Object.keys(c.env).length ? { env: c.env } : {}),
    ...(c.stdinBase64 !== undefined ? { stdinBase64: c.stdinBase64 } : {}),
    ...(c.background ? { background: true } : {}),
  };
  // the JSON answer comes only at the end: say up front that it may wait
  if (c.json && c.waitApprovalMs) process.stderr.write(`sandboxd: if a person must approve, waiting up to ${c.waitApprovalMs / 1000} s for their decision\n`);
  const url = `/v1/phases/${encodeURIComponent(c.id)}/exec`;
  try {
    // node:http only for the forms that wait for one JSON answer; the stream reads the socket itself
    const api = c.background || c.json ? new (await import("../client/http.js")).ApiClient(c.socket) : null;
    if (c.background && api) {
      const { job } = await api.request<{ job: { id: string } }>("POST", url, body);
      process.stdout.write(c.json ? JSON.stringify(job, null, 2) + "\n" : `${job.id}\n`);
      return EXIT.ok;
    }
    if (c.json && api) {
      const { result } = await api.request<{ result: ExecResult }>("POST", url, body);
      process.stdout.write(JSON.stringify(result, null, 2) + "\n");
      return exitCodeFor(result);
    }
    return await followExecStream(c.socket, `${url}?stream=frames`, body);
  } catch (err) {
    printError(err);
    return exitCodeForRefusal(err instanceof SandboxdError ? err.code : undefined);
  }
}

type ExecEvent =
  | { type: "started"; pid: number }
  | { type: "waiting"; approvalId: string; command: string; rule: { id: string; clause: string }; waitMs: number }
  | { type: "exit"; result: ExecResult }
  | { type: "error"; error: { code: string; message: string; hint: string } };

/**
 * Output frames go to stdout and stderr as the bytes they are; events are
 * said on stderr. Writes wait for the terminal or pipe to drain, so a slow
 * reader slows the command (the daemon holds its output), as a pipe would.
 * The frames are read off the socket directly (../client/frame-stream.ts):
 * each piece of output is a view of a pooled read buffer, held until written.
 */
async function followExecStream(socket: string, path: string, body: unknown): Promise<number> {
  let code: number = EXIT.sandboxdFailed;
  const event = (ev: ExecEvent) => {
    if (ev.type === "exit") {
      code = exitCodeFor(ev.result);
      const esc = ev.result.escalation;
      if (esc) process.stderr.write(visible(`sandboxd: fail-fast: phase escalated (${esc.summary}); report ${esc.report}`) + "\n");
      if (ev.result.timedOut) process.stderr.write(`sandboxd: command killed after its timeout (${ev.result.durationMs} ms)\n`);
    } else if (ev.type === "error") {
      process.stderr.write(visible(`sandboxd: ${ev.error.message} [${ev.error.code}]\n  hint: ${ev.error.hint}`) + "\n");
      // a refusal after a wait (denied, no decision in time) exits as one before it would
      code = exitCodeForRefusal(ev.error.code);
    } else if (ev.type === "waiting") {
      process.stderr.write(
        visible(
          `sandboxd: waiting for approval ${ev.approvalId} of \`${ev.command}\` (rule ${ev.rule.id}, ${ev.rule.clause}), up to ${Math.round(ev.waitMs / 1000)} s; a person can run: sandboxd approvals approve ${ev.approvalId}`,
        ) + "\n",
      );
    }
    // "started" and event types of newer daemons print nothing
  };
  const out = (stream: NodeJS.WriteStream, payload: Buffer): Promise<void> | undefined => {
    clientPool.retain(payload);
    return stream.write(payload, () => clientPool.release(payload)) ? undefined : drained();
  };
  const { cut } = await streamFrames(socket, path, body, (kind, payload) => {
    if (kind === StreamFrame.Stdout) return out(process.stdout, payload);
    if (kind === StreamFrame.Stderr) return out(process.stderr, payload);
    if (kind === StreamFrame.Event) event(JSON.parse(payload.toString("utf8")) as ExecEvent);
    // other kinds: a newer daemon's, skipped
  });
  if (cut > 0) process.stderr.write(`sandboxd: the exec stream was cut off (${cut} bytes of an unfinished frame)\n`);
  return code;
}

/** Both output streams drained (a file or terminal drains at once). */
function drained(): Promise<void> {
  const wait = (s: NodeJS.WriteStream) => (s.writableNeedDrain ? new Promise<void>((r) => s.once("drain", () => r())) : Promise.resolve());
  return Promise.all([wait(process.stdout), wait(process.stderr)]).then(() => undefined);
}
