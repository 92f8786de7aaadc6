/**
 * Where the daemon's socket and state dir are by default. Apart from
 * settings.ts (and its zod schema) so that clients, which only need the
 * socket's path, load nothing else.
 */
import os from "node:os";
import path from "node:path";

function isRoot(): boolean {
  return process.getuid?.() === 0;
}

export function defaultStateDir(env: NodeJS.ProcessEnv = process.env): string {
  if (isRoot()) return "/var/lib/sandboxd";
  const base = env.XDG_STATE_HOME || path.join(os.homedir(), ".local", "state");
  return path.join(base, "sandboxd");
}

/**
 * The key that signs audit anchors: outside the state dir on purpose (whoever
 * can write the state dir must not hold the key too). As root
 * /etc/sandboxd/audit-signing.key, else $XDG_CONFIG_HOME/sandboxd/ (by
 * default ~/.config/sandboxd/).
 */
export function defaultAuditKey(env: NodeJS.ProcessEnv = process.env): string {
  if (isRoot()) return "/etc/sandboxd/audit-signing.key";
  const base = env.XDG_CONFIG_HOME || path.join(os.homedir(), ".config");
  return path.join(base, "sandboxd", "audit-signing.key");
}

export function defaultSocket(env: NodeJS.ProcessEnv = process.env): string {
  if (isRoot()) return "/run/sandboxd/sandboxd.sock";
  if (env.XDG_RUNTIME_DIR) return path.join(env.XDG_RUNTIME_DIR, "sandboxd", "sandboxd.sock");
  return path.join(defaultStateDir(env), "sandboxd.sock");
}

/** The socket a client talks to: --socket, then SANDBOXD_SOCKET, then the default. */
export function clientSocket(flag: string | undefined, env: NodeJS.ProcessEnv = process.env): string {
  return path.resolve(flag ?? (env.SANDBOXD_SOCKET || defaultSocket(env)));
}

