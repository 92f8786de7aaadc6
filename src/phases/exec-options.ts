/**
 * What a command may ask for beyond its argv: a working directory inside the
 * workspace, variables of its own, bytes on its stdin. Each is checked here,
 * before the verdict is recorded, and refused with a coded error that names
 * what to change.
 */
import { createHash } from "node:crypto";
import { realpath, stat } from "node:fs/promises";
import path from "node:path";
import { SandboxdError } from "../errors.js";
import { isReservedEnv } from "../policy/env.js";
import { MAX_STDIN_BYTES, SHIM_PATHS } from "../shim/protocol.js";
import type { LivePhase } from "./context.js";

/** Where the command starts: the path the shim uses, and the same path relative to the workspace ("" for its root). */
export interface ResolvedCwd {
  inContainer: string;
  relative: string;
}

/**
 * `cwd` as given (relative to the workspace, or absolute under /workspace)
 * → the directory in the container. Refused: a path that leaves the
 * workspace (`..`, another absolute path), one that does not exist or is not
 * a directory in the phase's view, and one whose links lead out of the view
 * (resolved on the host, where the view is the phase's overlay). The shim
 * checks the real path again when it starts the command (a directory
 * swapped for a link in between does not take it out either).
 */
export async function resolveCwd(live: LivePhase, cwd: string | undefined): Promise<ResolvedCwd> {
  const ws = SHIM_PATHS.workspace;
  if (cwd === undefined) return { inContainer: ws, relative: "" };
  const abs = path.posix.resolve(ws, cwd);
  const refuse = (why: string) =>
    new SandboxdError("SBX_ERR_EXEC_CWD", `cwd ${JSON.stringify(cwd)} ${why}`, { details: { cwd } });
  if (abs !== ws && !abs.startsWith(`${ws}/`)) throw refuse(`is outside the workspace (${ws})`);
  const relative = abs === ws ? "" : abs.slice(ws.length + 1);
  if (relative === "") return { inContainer: ws, relative };
  const root = live.workspace ? await live.workspace.layer.viewRoot() : await realpath(live.record.project);
  let real: string;
  try {
    real = await realpath(path.join(root, relative));
  } catch {
    throw refuse("does not exist in the workspace");
  }
  if (real !== root && !real.startsWith(root + path.sep)) throw refuse("leads out of the workspace through a symbolic link");
  if (!(await stat(real)).isDirectory()) throw refuse("is not a directory");
  return { inContainer: abs, relative };
}

const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/**
 * The command's own variables: names a shell can export, none reserved
 * (src/policy/env.ts: the names a project's .env may not set either, for the
 * same reasons) and none the daemon sets for the phase (its service URLs).
 */
export function checkEnv(live: LivePhase, env: Readonly<Record<string, string>> | undefined): Record<string, string> {
  if (!env) return {};
  const bad = Object.keys(env).filter((k) => !ENV_NAME.test(k));
  if (bad.length) {
    throw new SandboxdError("SBX_ERR_VALIDATION", `invalid request: body.env: ${bad.slice(0, 10).map((k) => JSON.stringify(k)).join(", ")} ${bad.length === 1 ? "is not a variable name" : "are not variable names"} (letters, digits, _; not starting with a digit)`);
  }
  const reserved = Object.keys(env).filter((k) => isReservedEnv(k) || Object.hasOwn(live.services.env, k)).sort();
  if (reserved.length) {
    throw new SandboxdError("SBX_ERR_ENV_RESERVED", `env sets ${reserved.join(", ")}, which a command may not set: the daemon sets ${reserved.length === 1 ? "it" : "them"}, or ${reserved.length === 1 ? "it changes" : "they change"} what runs or where packages come from`, {
      details: { names: reserved },
    });
  }
  return { ...env };
}

/** What the trail keeps of a command's stdin: its size and hash, never its bytes (they may be anything, secrets included). */
export interface StdinSummary {
  bytes: number;
  sha256: string;
}

export function checkStdin(live: LivePhase, stdin: Buffer | undefined): StdinSummary | null {
  if (stdin === undefined) return null;
  if (stdin.length > MAX_STDIN_BYTES) {
    throw new SandboxdError("SBX_ERR_REQUEST_TOO_LARGE", `stdin is ${stdin.length} bytes; at most ${MAX_STDIN_BYTES} go to a command`, {
      hint: "write larger input to a file in the project and name the file in the command",
      details: { bytes: stdin.length, limit: MAX_STDIN_BYTES },
    });
  }
  if (!live.channel?.supports("stdin")) {
    throw new SandboxdError("SBX_ERR_SHIM_OUTDATED", `phase ${live.record.id}'s shim cannot pass stdin to a command (its image predates it)`, { details: { feature: "stdin" } });
  }
  return { bytes: stdin.length, sha256: createHash("sha256").update(stdin).digest("hex") };
}
