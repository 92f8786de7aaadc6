/**
 * docker-compose, mediated (SKILLS.md §2 Infrastructure Management).
 *
 * The sandbox has no Docker socket and no network: `docker-compose …` asked
 * of a phase is judged by the policy like any command and then, when
 * allowed, run by the daemon on the host against the project's own compose
 * file, its output returned to the caller and recorded like a command's.
 *
 * Beyond the policy's rules, only this grammar is run (anything else is
 * refused as rule `compose.mediated`, so an approval cannot widen it):
 *
 *   up -d|--detach [SERVICE…]         always with --no-build: a build would run
 *                                     the project's Dockerfiles on the host with
 *                                     the network the sandbox does not have
 *   down                              no -v/--volumes, no --rmi
 *   ps [-q|--services|-a|--all] [SERVICE…]
 *   logs [--tail N] [-t|--timestamps] [--no-color] [SERVICE…]   never -f
 *   restart [-t N] [SERVICE…]
 *
 * No global option (-f, -p, -H, --project-directory, --env-file …): the
 * daemon names the file (the project's compose.yaml / docker-compose.yml, as
 * accepted into the project — the phase's pending edits never reach the host;
 * the file is read-only in the sandbox, policy workspace.protected.compose),
 * and compose names the project after its directory, as when the operator
 * runs it there. `rm`, `exec`, `run`, `pull`, `build`, `config`, volume and
 * network changes are never run.
 *
 * The process runs in a process group of its own, with the command's
 * timeout: SIGTERM to the whole group at the timeout, SIGKILL after the
 * grace (execa starts it; the group kill is ours: execa signals one pid).
 */
import { access } from "node:fs/promises";
import path from "node:path";
import { execa } from "execa";
import type { Verdict } from "../policy/index.js";

export const COMPOSE_RULE_ID = "compose.mediated";
export const COMPOSE_CLAUSE = "SKILLS.md §2 Infrastructure Management: docker-compose up -d, down (without -v), ps, logs [service], restart [service]";
/** what compose reads, in its own order of preference */
export const COMPOSE_FILES = ["compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml"] as const;
export const COMPOSE_PROGRAM = "docker-compose";

export type ComposeSub = "up" | "down" | "ps" | "logs" | "restart";

/** A request the grammar accepts: what runs on the host after the file options. */
export interface ComposeCall {
  sub: ComposeSub;
  /** the arguments after the subcommand, as run on the host */
  args: string[];
}

const SERVICE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

export function isComposeProgram(argv0: string): boolean {
  return path.basename(argv0) === COMPOSE_PROGRAM;
}

/** The grammar above: the call, or why it is refused. */
export function parseCompose(argv: readonly string[]): { call: ComposeCall } | { refused: string } {
  const [, sub, ...rest] = argv;
  if (sub === undefined) return { refused: "name a subcommand: up -d, down, ps, logs [service], restart [service]" };
  if (sub.startsWith("-")) return { refused: `global options (${sub}) are not accepted: sandboxd names the project's compose file and project itself` };
  const services: string[] = [];
  const args: string[] = [];
  const bad = (why: string) => ({ refused: `\`docker-compose ${sub}\`: ${why}` });
  const service = (a: string) => {
    if (!SERVICE.test(a)) return false;
    services.push(a);
    return true;
  };
  switch (sub) {
    case "up": {
      let detached = false;
      for (const a of rest) {
        if (a === "-d" || a === "--detach") detached = true;
        else if (a.startsWith("-")) return bad(`option ${a} is not accepted (only -d)`);
        else if (!service(a)) return bad(`${JSON.stringify(a)} is not a service name`);
      }
      if (!detached) return bad("only `up -d` (detached) is allowed: a foreground up never ends");
      return { call: { sub, args: ["-d", "--no-build", ...services] } };
    }
    case "down":
      if (rest.length > 0) return bad(`no options or arguments are accepted (${rest[0]}): -v removes volumes, --rmi images`);
      return { call: { sub, args: [] } };
    case "ps":
      for (const a of rest) {
        if (["-q", "--quiet", "--services", "-a", "--all"].includes(a)) args.push(a);
        else if (a.startsWith("-")) return bad(`option ${a} is not accepted (only -q, --services, -a)`);
        else if (!service(a)) return bad(`${JSON.stringify(a)} is not a service name`);
      }
      return { call: { sub, args: [...args, ...services] } };
    case "logs":
      for (let i = 0; i < rest.length; i++) {
        const a = rest[i]!;
        if (a === "--tail") {
          const n = rest[++i];
          if (n === undefined || !/^(\d{1,6}|all)$/.test(n)) return bad("--tail takes a number of lines");
          args.push("--tail", n);
        } else if (/^--tail=(\d{1,6}|all)$/.test(a)) args.push(a);
        else if (["-t", "--timestamps", "--no-color"].includes(a)) args.push(a);
        else if (a === "-f" || a === "--follow") return bad("-f is not accepted: a followed log never ends (use --tail N)");
        else if (a.startsWith("-")) return bad(`option ${a} is not accepted (only --tail N, -t, --no-color)`);
        else if (!service(a)) return bad(`${JSON.stringify(a)} is not a service name`);
      }
      return { call: { sub, args: [...args, ...services] } };
    case "restart":
      for (let i = 0; i < rest.length; i++) {
        const a = rest[i]!;
        if (a === "-t" || a === "--timeout") {
          const n = rest[++i];
          if (n === undefined || !/^\d{1,3}$/.test(n)) return bad(`${a} takes a number of seconds`);
          args.push("-t", n);
        } else if (a.startsWith("-")) return bad(`option ${a} is not accepted (only -t N)`);
        else if (!service(a)) return bad(`${JSON.stringify(a)} is not a service name`);
      }
      return { call: { sub, args: [...args, ...services] } };
    default:
      return bad("only up -d, down, ps, logs and restart are run (SKILLS.md §2); rm, exec, run, pull, build, volume and network changes never are");
  }
}

/**
 * The verdict for a command that names docker-compose: the policy's verdict
 * when it forbids, else the mediated call — or a forbid under
 * `compose.mediated` when the command is not one the daemon runs (compose in
 * a compound command or a wrapper, or outside the grammar).
 */
export function judgeCompose(verdict: Verdict): { verdict: Verdict; call: ComposeCall | null } {
  const named = verdict.parts.some((p) => p.argv.some((a, i) => i === 0 && isComposeProgram(a)));
  if (!named || verdict.decision === "forbid") return { verdict, call: null };
  const refuse = (reason: string) => ({
    verdict: { ...verdict, decision: "forbid" as const, ruleId: COMPOSE_RULE_ID, clause: COMPOSE_CLAUSE, reason },
    call: null,
  });
  if (verdict.parts.length !== 1 || !isComposeProgram(verdict.execArgv[0] ?? "")) {
    return refuse("docker-compose runs on the host through sandboxd: run it as a command of its own (`docker-compose ps`), not inside a shell, wrapper or compound command");
  }
  const parsed = parseCompose(verdict.parts[0]!.argv);
  if ("refused" in parsed) return refuse(parsed.refused);
  return { verdict, call: parsed.call };
}

/** The project's compose file, as accepted into the project (never the phase's view). */
export async function composeFile(project: string): Promise<string | null> {
  for (const name of COMPOSE_FILES) {
    const file = path.join(project, name);
    try {
      await access(file);
      return file;
    } catch {
      // next name
    }
  }
  return null;
}

export interface ComposeRun {
  project: string;
  file: string;
  call: ComposeCall;
  timeoutMs: number;
  killGraceMs: number;
  /** the daemon's Docker endpoint (DOCKER_HOST), when it has one */
  dockerHost?: string | undefined;
  onStdout(chunk: Buffer): void;
  onStderr(chunk: Buffer): void;
  signal?: AbortSignal | undefined;
}

export interface ComposeOutcome {
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  /** the program could not be started (not installed): its error */
  spawnError: { code: string; message: string } | null;
}

/** The argv run on the host (exported for the tests and the record). */
export function hostArgv(project: string, file: string, call: ComposeCall): string[] {
  return [COMPOSE_PROGRAM, "--project-directory", project, "-f", file, "--ansi", "never", call.sub, ...call.args];
}

export async function runCompose(r: ComposeRun): Promise<ComposeOutcome> {
  const [program, ...args] = hostArgv(r.project, r.file, r.call);
  // nothing of the daemon's own environment (its service passwords) reaches compose; compose reads the project's .env itself
  const env: Record<string, string> = { PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin", LANG: "C.UTF-8", HOME: "/root" };
  if (r.dockerHost) env.DOCKER_HOST = r.dockerHost;
  const child = execa(program!, args, {
    cwd: r.project,
    env,
    extendEnv: false,
    stdin: "ignore",
    buffer: false,
    reject: false,
    // its own process group, so that the whole tree is signalled
    detached: true,
    // the daemon's exit ends it too
    cleanup: true,
    stripFinalNewline: false,
  });
  child.stdout?.on("data", (c: Buffer) => r.onStdout(c));
  child.stderr?.on("data", (c: Buffer) => r.onStderr(c));
  let timedOut = false;
  let killTimer: NodeJS.Timeout | undefined;
  const group = (sig: NodeJS.Signals) => {
    if (child.pid === undefined) return;
    try {
      process.kill(-child.pid, sig);
    } catch {
      // the group is gone already
    }
  };
  const end = () => {
    group("SIGTERM");
    killTimer ??= setTimeout(() => group("SIGKILL"), r.killGraceMs);
  };
  const timer = setTimeout(() => {
    timedOut = true;
    end();
  }, r.timeoutMs);
  const onAbort = () => end();
  if (r.signal?.aborted) end();
  else r.signal?.addEventListener("abort", onAbort, { once: true });
  try {
    const res = await child;
    // whatever it left in its group goes with it
    group("SIGKILL");
    const failed = res as { code?: string; message?: string; exitCode?: number; signal?: string; failed?: boolean };
    if (failed.exitCode === undefined && failed.signal === undefined && failed.code) {
      return { exitCode: null, signal: null, timedOut: false, spawnError: { code: failed.code, message: failed.message ?? failed.code } };
    }
    return { exitCode: res.exitCode ?? null, signal: res.signal ?? null, timedOut, spawnError: null };
  } finally {
    clearTimeout(timer);
    clearTimeout(killTimer);
    r.signal?.removeEventListener("abort", onAbort);
  }
}
