/**
 * A process run to its end with its stdout as bytes and its stderr as text:
 * how the CLI tests compare the `sandboxd` command's two clients (native and
 * Node) byte for byte. The tests' own Node comes first on the PATH
 * (PATH_WITH_THIS_NODE), as for cli(); `env` goes on top.
 */
import { spawn } from "node:child_process";
import { PATH_WITH_THIS_NODE } from "./sandbox.js";

export interface ProcessRun {
  code: number | null;
  stdout: Buffer;
  stderr: string;
}

export function runProcess(file: string, args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string; uid?: number; timeoutMs?: number } = {}): Promise<ProcessRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, PATH: PATH_WITH_THIS_NODE, ...opts.env },
      cwd: opts.cwd,
      ...(opts.uid !== undefined ? { uid: opts.uid, gid: opts.uid } : {}),
    });
    const out: Buffer[] = [];
    let stderr = "";
    child.stdout.on("data", (c: Buffer) => out.push(c));
    child.stderr.on("data", (c: Buffer) => (stderr += c.toString("utf8")));
    const timer = setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs ?? 60_000);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout: Buffer.concat(out), stderr });
    });
  });
}
