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
import { access, lstat, readFile, realpath, writeFile } from "node:fs/promises";
import path from "node:path";
import { execa } from "execa";
import { parse as parseYaml, stringify as stringifyYaml } from "yaml";
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
  /** set by checkComposeInputs: the checked, fully resolved config the call runs, and the pinned project name */
  resolved?: { file: string; projectName: string } | undefined;
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

/** The argv run on the host (exported for the tests and the record): the checked config when there is one, under the pinned project name. */
export function hostArgv(project: string, file: string, call: ComposeCall): string[] {
  const pinned = call.resolved ? ["-p", call.resolved.projectName, "-f", call.resolved.file] : ["-f", file];
  return [COMPOSE_PROGRAM, "--project-directory", project, ...pinned, "--ansi", "never", call.sub, ...call.args];
}

/** compose's environment on the host: nothing of the daemon's (its service passwords) nor of the agent's; compose reads the project's .env itself */
function composeEnv(dockerHost?: string): Record<string, string> {
  const env: Record<string, string> = { PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin", LANG: "C.UTF-8", HOME: "/root" };
  if (dockerHost) env.DOCKER_HOST = dockerHost;
  return env;
}

/* ------------------------- what compose would start ------------------------ */

/**
 * The compose file is the operator's (read-only in the sandbox), but compose
 * reads more than that file, and the agent writes the project through
 * accepted iterations: a file named by `extends: file:` can make a service
 * privileged with `/:/host` bound, an `env_file` sets a container's DSN, a
 * bind's source can be a link. So before any call the daemon has compose
 * resolve the whole configuration on the host (`docker-compose config`, its
 * environment pinned), refuses it unless every input is the operator's and
 * every service stays inside this allow-list, and runs the call against that
 * resolved file, under a pinned project name: what runs is what was checked.
 *
 * - inputs: every file compose reads besides the compose file (`extends`
 *   files, `env_file`s, the project's `.env`) must be a path the policy keeps
 *   read-only or hidden in the sandbox (workspace.protectedPaths);
 * - services: no `privileged`, `cap_add`, `devices`, `device_cgroup_rules`,
 *   `security_opt`, `cgroup_parent`, `runtime`, no host or another
 *   container's namespaces (`network_mode`, `pid`, `ipc`, `uts`,
 *   `userns_mode`: `host` or `container:…`), no `volumes_from` a container;
 * - host paths (bind sources, `configs`/`secrets` files): inside the project
 *   once links are resolved (and replaced by that real path), never a socket;
 * - volumes and networks: no `external` ones and no explicit `name` outside
 *   the project's prefix (another stack's data or network), no volume
 *   `driver_opts` (a local volume with `o: bind` is a host bind), no driver
 *   but the default;
 * - the project name: the directory's name as compose derives it, refused
 *   while containers of another directory carry that name (two projects
 *   called `trading` would otherwise act on one another's stack).
 */
export const COMPOSE_CHECK_RULE_ID = "compose.config";
export const COMPOSE_CHECK_CLAUSE = "SKILLS.md Security & Safety Guardrails — Filesystem Boundaries; §2 Infrastructure Management";

/** Whether a project-relative path is the operator's: one the policy keeps read-only or hidden in the sandbox. */
export type OperatorPath = (rel: string) => boolean;

export type ComposeCheck = { resolved: { file: string; projectName: string } } | { refused: string };

class Refused extends Error {}

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === "object" && v !== null && !Array.isArray(v);

/** compose 1.29's own project name for a directory (get_project_name → normalize_name). */
export function composeProjectName(project: string): string {
  return path.basename(project).toLowerCase().replace(/[^-_a-z0-9]/g, "") || "default";
}

const NAMESPACE_KEYS = ["network_mode", "pid", "ipc", "uts", "userns_mode"] as const;
const NEVER_KEYS = ["privileged", "cap_add", "devices", "device_cgroup_rules", "security_opt", "cgroup_parent", "runtime"] as const;

function within(root: string, p: string): boolean {
  return p === root || p.startsWith(root + path.sep);
}

/** The real path of `p` (its longest existing prefix resolved, the rest appended), refused outside the project or as a socket. */
async function hostPath(realProject: string, p: string, what: string): Promise<string> {
  if (!path.isAbsolute(p)) throw new Refused(`${what} ${JSON.stringify(p)} is not a path compose resolved`);
  let head = path.normalize(p);
  const rest: string[] = [];
  for (;;) {
    try {
      const st = await lstat(head);
      if (rest.length === 0 && st.isSocket()) throw new Refused(`${what} ${p} is a socket (a Docker socket would hand the host to the container)`);
      break;
    } catch (e) {
      if (e instanceof Refused) throw e;
      if (head === path.dirname(head)) break;
      rest.unshift(path.basename(head));
      head = path.dirname(head);
    }
  }
  const real = path.join(await realpath(head), ...rest);
  if (!within(realProject, real)) throw new Refused(`${what} ${p}${real !== p ? ` (really ${real})` : ""} is outside the project: a container gets host paths of its own project only`);
  if (/docker\.sock$/.test(real)) throw new Refused(`${what} ${p} names a Docker socket`);
  return real;
}

/** The inputs compose reads besides the compose file, from the raw files (the operator's), following `extends` files. */
async function checkInputs(project: string, file: string, isOperator: OperatorPath, depth = 0): Promise<void> {
  if (depth > 8) throw new Refused("`extends` nests more than 8 files deep");
  let doc: unknown;
  try {
    doc = parseYaml(await readFile(file, "utf8"));
  } catch (e) {
    throw new Refused(`${path.relative(project, file) || file} is not readable YAML: ${(e as Error).message}`);
  }
  if (!isObj(doc) || !isObj(doc.services)) return;
  const operators = (ref: string, what: string): string => {
    const abs = path.resolve(path.dirname(file), ref);
    const rel = path.relative(project, abs);
    if (rel.startsWith("..") || path.isAbsolute(rel)) throw new Refused(`${what} ${ref} is outside the project`);
    if (!isOperator(rel.split(path.sep).join("/"))) {
      throw new Refused(`${what} ${rel} is read by compose on the host but can be changed from the sandbox; make it the operator's (a readOnly path in the policy's workspace.protectedPaths) or inline it in the compose file`);
    }
    return abs;
  };
  for (const [name, svc] of Object.entries(doc.services)) {
    if (!isObj(svc)) continue;
    const envFiles = typeof svc.env_file === "string" ? [svc.env_file] : Array.isArray(svc.env_file) ? svc.env_file : [];
    for (const f of envFiles) if (typeof f === "string") operators(f, `service ${name}: env_file`);
    if (isObj(svc.extends) && typeof svc.extends.file === "string") {
      await checkInputs(project, operators(svc.extends.file, `service ${name}: extends file`), isOperator, depth + 1);
    }
  }
}

async function checkVolume(realProject: string, v: unknown, where: string): Promise<unknown> {
  if (typeof v === "string") {
    const parts = v.split(":");
    if (parts.length >= 2 && parts[0]!.startsWith("/")) {
      const real = await hostPath(realProject, parts[0]!, `${where}: bind source`);
      return [real, ...parts.slice(1)].join(":");
    }
    return v;
  }
  if (isObj(v)) {
    if (v.type === "bind" && typeof v.source === "string") return { ...v, source: await hostPath(realProject, v.source, `${where}: bind source`) };
    if (v.type !== undefined && v.type !== "volume" && v.type !== "tmpfs" && v.type !== "bind") throw new Refused(`${where}: volume type ${String(v.type)} is not accepted`);
  }
  return v;
}

/** Refuses what the allow-list above does not accept; returns the config with host paths replaced by their real paths. */
async function checkResolved(realProject: string, projectName: string, cfg: Obj): Promise<Obj> {
  const services = isObj(cfg.services) ? cfg.services : {};
  for (const [name, svc] of Object.entries(services)) {
    if (!isObj(svc)) continue;
    const where = `service ${name}`;
    for (const k of NEVER_KEYS) {
      const v = svc[k];
      if (v === undefined || v === null || v === false || (Array.isArray(v) && v.length === 0)) continue;
      throw new Refused(`${where}: \`${k}\` is not accepted (the container would get more of the host than its own namespaces)`);
    }
    for (const k of NAMESPACE_KEYS) {
      const v = svc[k];
      if (typeof v === "string" && (v === "host" || v.startsWith("container:"))) throw new Refused(`${where}: \`${k}: ${v}\` is not accepted (the host's or another container's namespace)`);
    }
    if (Array.isArray(svc.volumes_from) && svc.volumes_from.some((x) => typeof x === "string" && x.startsWith("container:"))) {
      throw new Refused(`${where}: \`volumes_from\` a container outside the project is not accepted`);
    }
    if (Array.isArray(svc.volumes)) svc.volumes = await Promise.all(svc.volumes.map((v) => checkVolume(realProject, v, where)));
  }
  for (const section of ["volumes", "networks"] as const) {
    const all = isObj(cfg[section]) ? (cfg[section] as Obj) : {};
    for (const [name, def] of Object.entries(all)) {
      if (!isObj(def)) continue;
      const ext = def.external;
      if (ext !== undefined && ext !== false) throw new Refused(`${section} ${name}: \`external\` is not accepted (another stack's ${section === "volumes" ? "data" : "network"})`);
      // an explicit name is not prefixed with the project's: it can be another stack's
      if (typeof def.name === "string" && !def.name.startsWith(`${projectName}_`)) {
        throw new Refused(`${section} ${name}: \`name: ${def.name}\` is not accepted (a name outside this project's, ${projectName}_…, can be another stack's ${section === "volumes" ? "data" : "network"})`);
      }
      if (def.driver_opts !== undefined && section === "volumes") throw new Refused(`volumes ${name}: \`driver_opts\` are not accepted (a local volume with o: bind is a host bind)`);
      const defaultDriver = section === "volumes" ? "local" : "bridge";
      if (def.driver !== undefined && def.driver !== defaultDriver) throw new Refused(`${section} ${name}: driver ${String(def.driver)} is not accepted (only ${defaultDriver})`);
    }
  }
  for (const section of ["configs", "secrets"] as const) {
    const all = isObj(cfg[section]) ? (cfg[section] as Obj) : {};
    for (const [name, def] of Object.entries(all)) {
      if (!isObj(def)) continue;
      if (def.external !== undefined && def.external !== false) throw new Refused(`${section} ${name}: \`external\` is not accepted`);
      if (typeof def.file === "string") def.file = await hostPath(realProject, def.file, `${section} ${name}: file`);
    }
  }
  return cfg;
}

/**
 * The check above, for a call about to run: the resolved config written to
 * `outFile` (what the call then runs), or why nothing runs.
 */
export async function checkComposeInputs(o: { project: string; file: string; outFile: string; isOperator: OperatorPath; dockerHost?: string | undefined }): Promise<ComposeCheck> {
  try {
    const realProject = await realpath(o.project);
    try {
      await access(path.join(o.project, ".env"));
      if (!o.isOperator(".env")) throw new Refused(".env is read by compose on the host (variables in the compose file) but can be changed from the sandbox; keep it hidden (workspace.protected.credentials)");
    } catch (e) {
      if (e instanceof Refused) throw e;
    }
    await checkInputs(o.project, o.file, o.isOperator);
    const env = composeEnv(o.dockerHost);
    const cfg = await execa(COMPOSE_PROGRAM, ["--project-directory", o.project, "-f", o.file, "--ansi", "never", "config"], {
      cwd: o.project,
      env,
      extendEnv: false,
      stdin: "ignore",
      reject: false,
      timeout: 30_000,
    });
    if (cfg.exitCode !== 0) throw new Refused(`compose could not resolve the project's compose file: ${String(cfg.stderr || cfg.stdout).trim().slice(0, 500)}`);
    const parsed: unknown = parseYaml(String(cfg.stdout));
    if (!isObj(parsed)) throw new Refused("compose resolved the project's compose file to nothing");
    const projectName = composeProjectName(o.project);
    const checked = await checkResolved(realProject, projectName, parsed);
    const others = await execa("docker", ["ps", "-a", "--filter", `label=com.docker.compose.project=${projectName}`, "--format", '{{.Label "com.docker.compose.project.working_dir"}}'], {
      env,
      extendEnv: false,
      stdin: "ignore",
      reject: false,
      timeout: 30_000,
    });
    if (others.exitCode !== 0) throw new Refused(`the engine's containers could not be listed: ${String(others.stderr).trim().slice(0, 300)}`);
    const foreign = [...new Set(String(others.stdout).split("\n").map((l) => l.trim()).filter((d) => d && d !== o.project && d !== realProject))];
    if (foreign.length > 0) {
      throw new Refused(`compose project name ${projectName} is taken by containers of ${foreign.join(", ")}: the call would act on another directory's stack; rename one of the directories or stop that stack`);
    }
    await writeFile(o.outFile, `# resolved and checked by sandboxd from ${o.file}\n${stringifyYaml(checked)}`, { mode: 0o600 });
    return { resolved: { file: o.outFile, projectName } };
  } catch (e) {
    if (e instanceof Refused) return { refused: e.message };
    throw e;
  }
}

export async function runCompose(r: ComposeRun): Promise<ComposeOutcome> {
  const [program, ...args] = hostArgv(r.project, r.file, r.call);
  const env = composeEnv(r.dockerHost);
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
