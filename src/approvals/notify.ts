/**
 * Telling a person that a request waits (SANDBOXD_NOTIFY_COMMAND,
 * SANDBOXD_NOTIFY_URL): on every new approval request, the operator's
 * command runs with the request as JSON on stdin, and/or the request is
 * POSTed as JSON to the operator's URL. A notification is best effort: it
 * runs after the request is recorded, never delays or fails the exec, is cut
 * at its timeout, and its failure is logged.
 */
import { spawn } from "node:child_process";
import type { Logger } from "pino";
import { SandboxdError } from "../errors.js";
import type { Approval } from "./queue.js";

/** A notifier gets this long (the command is killed, the POST aborted). */
export const NOTIFY_TIMEOUT_MS = 10_000;

export type Notify = (approval: Approval) => void;

/** A URL the daemon may POST a request to: https, or http to a loopback address only (the request names commands). */
export function checkNotifyUrl(raw: string): string {
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw new SandboxdError("SBX_ERR_CONFIG", `SANDBOXD_NOTIFY_URL ${JSON.stringify(raw)} is not a URL`);
  }
  const loopback = ["127.0.0.1", "localhost", "[::1]"].includes(u.hostname) || /^127\.\d+\.\d+\.\d+$/.test(u.hostname);
  if (u.protocol !== "https:" && !(u.protocol === "http:" && loopback)) {
    throw new SandboxdError("SBX_ERR_CONFIG", `SANDBOXD_NOTIFY_URL ${u.origin} is neither https nor a loopback http address`, {
      hint: "an approval request names the command and its files: send it over https, or to a relay on 127.0.0.1",
    });
  }
  return u.toString();
}

export function makeNotifier(opts: { command?: string | null; url?: string | null; log: Logger; timeoutMs?: number }): Notify | undefined {
  const { command, url, log } = opts;
  const timeoutMs = opts.timeoutMs ?? NOTIFY_TIMEOUT_MS;
  if (!command && !url) return undefined;
  return (approval) => {
    const body = JSON.stringify({ event: "approval.request", approval }) + "\n";
    if (command) runCommand(command, body, timeoutMs, log, approval.id);
    if (url) {
      fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body, signal: AbortSignal.timeout(timeoutMs) }).then(
        (res) => {
          if (!res.ok) log.warn({ approval: approval.id, status: res.status }, "approval notification URL answered an error");
        },
        (err: Error) => log.warn({ approval: approval.id, err: err.message }, "approval notification URL failed"),
      );
    }
  };
}

function runCommand(command: string, body: string, timeoutMs: number, log: Logger, id: string): void {
  const child = spawn("/bin/sh", ["-c", command], { stdio: ["pipe", "ignore", "pipe"], detached: true, env: { ...process.env, SANDBOXD_APPROVAL_ID: id } });
  let stderr = "";
  child.stderr.on("data", (c: Buffer) => {
    if (stderr.length < 2000) stderr += c.toString();
  });
  // the whole process group: a notifier that forked must not outlive its timeout
  const timer = setTimeout(() => {
    if (child.pid) process.kill(-child.pid, "SIGKILL");
  }, timeoutMs);
  child.on("error", (err) => log.warn({ approval: id, err: err.message }, "approval notification command could not start"));
  child.on("close", (code, signal) => {
    clearTimeout(timer);
    if (code !== 0) log.warn({ approval: id, code, signal, stderr: stderr.slice(0, 2000) }, "approval notification command failed");
  });
  child.stdin.on("error", (err) => log.warn({ approval: id, err: err.message }, "approval notification command did not read its input"));
  child.stdin.end(body);
}
