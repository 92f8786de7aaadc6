/**
 * The first, hand-written shell policy: the SKILLS.md §2 command whitelist,
 * judged on argv. The daemon no longer uses it — policies/default.yaml and
 * ./evaluate.ts replaced it. It stays as a reference: the engine's tests check
 * that the default policy reproduces every decision below, and
 * bench/policy-eval.mjs measures the engine against it.
 *
 * argv is never joined into a string and matched with a regex: the program is
 * argv[0] exactly (a bare name resolved on the sandbox's PATH), and the rules
 * that look at arguments look at whole arguments. Forbidden rules are checked
 * first; when several rules match, the strictest decision wins.
 */

export type Decision = "allow" | "ask" | "forbid";

export interface Verdict {
  decision: Decision;
  ruleId: string;
  /** the SKILLS.md clause the rule enforces */
  clause: string;
  reason: string;
}

/** SKILLS.md §2 "Command Whitelist Pattern": ^(python|pytest|pylint|mypy|black|isort|docker-compose|pip) */
const WHITELIST = new Set([
  "python",
  "python3",
  "pytest",
  "pylint",
  "mypy",
  "black",
  "isort",
  "docker-compose",
  "pip",
  "pip3",
]);

/** SKILLS.md §2 "Non-Destructive Command Filtering": programs that are never run. */
const FORBIDDEN_PROGRAMS: Record<string, { ruleId: string; what: string }> = {
  sudo: { ruleId: "shell.forbidden.privilege", what: "privilege escalation" },
  su: { ruleId: "shell.forbidden.privilege", what: "privilege escalation" },
  doas: { ruleId: "shell.forbidden.privilege", what: "privilege escalation" },
  mkfs: { ruleId: "shell.forbidden.mkfs", what: "filesystem creation" },
  dd: { ruleId: "shell.forbidden.dd", what: "disk operations" },
  iptables: { ruleId: "shell.forbidden.netconfig", what: "network configuration changes" },
  ip6tables: { ruleId: "shell.forbidden.netconfig", what: "network configuration changes" },
  ifconfig: { ruleId: "shell.forbidden.netconfig", what: "network configuration changes" },
  apt: { ruleId: "shell.forbidden.os-packages", what: "package manager operations outside Python" },
  "apt-get": { ruleId: "shell.forbidden.os-packages", what: "package manager operations outside Python" },
  yum: { ruleId: "shell.forbidden.os-packages", what: "package manager operations outside Python" },
  dnf: { ruleId: "shell.forbidden.os-packages", what: "package manager operations outside Python" },
};

const CLAUSE_WHITELIST = "SKILLS.md §2 Command Whitelist Pattern";
const CLAUSE_FORBIDDEN = "SKILLS.md §2 Non-Destructive Command Filtering";
const CLAUSE_COMPOSE = "SKILLS.md §2 Infrastructure Management";

/** docker-compose subcommands SKILLS.md allows; `down -v` and `rm` are forbidden outright. */
const COMPOSE_ALLOWED = new Set(["up", "down", "ps", "logs", "restart"]);

function isRecursiveFlag(arg: string): boolean {
  return arg === "--recursive" || /^-[a-zA-Z]*[rR][a-zA-Z]*$/.test(arg);
}

export interface ShellPolicyOptions {
  /**
   * Programs the operator allows on top of the whitelist (daemon setting
   * SANDBOXD_EXTRA_ALLOW). Set outside the sandbox only; forbidden rules still win.
   */
  extraAllow?: ReadonlySet<string>;
}

export function evaluateArgv(argv: readonly string[], opts: ShellPolicyOptions = {}): Verdict {
  const program = argv[0] ?? "";
  const args = argv.slice(1);

  if (program.includes("/")) {
    return {
      decision: "ask",
      ruleId: "shell.program-path",
      clause: CLAUSE_WHITELIST,
      reason: `\`${program}\` is a path; only whitelisted programs named bare (resolved on the sandbox's PATH) run without approval`,
    };
  }
  const forbidden = FORBIDDEN_PROGRAMS[program] ?? (program.startsWith("mkfs.") ? FORBIDDEN_PROGRAMS.mkfs : undefined);
  if (forbidden) {
    return {
      decision: "forbid",
      ruleId: forbidden.ruleId,
      clause: CLAUSE_FORBIDDEN,
      reason: `\`${program}\` is forbidden (${forbidden.what})`,
    };
  }
  if (program === "rm" && args.some(isRecursiveFlag)) {
    return {
      decision: "forbid",
      ruleId: "shell.forbidden.rm-recursive",
      clause: CLAUSE_FORBIDDEN,
      reason: "recursive deletion is forbidden; delete single files by name",
    };
  }
  if (program === "kill" && args.some((a) => a === "-9" || a === "-KILL" || a === "-SIGKILL" || a === "-s")) {
    return {
      decision: "forbid",
      ruleId: "shell.forbidden.kill-9",
      clause: CLAUSE_FORBIDDEN,
      reason: "`kill -9` is forbidden",
    };
  }
  if (program === "chmod" || program === "chown") {
    return {
      decision: "forbid",
      ruleId: "shell.forbidden.chmod-chown",
      clause: CLAUSE_FORBIDDEN,
      reason: `\`${program}\` is forbidden`,
    };
  }
  if (program === "docker-compose") {
    return evaluateCompose(args);
  }
  if (opts.extraAllow?.has(program)) {
    return {
      decision: "allow",
      ruleId: "shell.operator-allow",
      clause: CLAUSE_WHITELIST,
      reason: `\`${program}\` is allowed by the operator's SANDBOXD_EXTRA_ALLOW`,
    };
  }
  if (WHITELIST.has(program)) {
    return {
      decision: "allow",
      ruleId: "shell.whitelist",
      clause: CLAUSE_WHITELIST,
      reason: `\`${program}\` is on the whitelist`,
    };
  }
  return {
    decision: "ask",
    ruleId: "shell.not-whitelisted",
    clause: CLAUSE_WHITELIST,
    reason: `\`${program}\` is not on the whitelist (python, pytest, pylint, mypy, black, isort, docker-compose, pip) and requires human approval`,
  };
}

/** docker-compose global options that take a value (`-f x.yml`), so the value is not the subcommand */
const COMPOSE_VALUE_OPTIONS = new Set([
  "-f", "--file", "-p", "--project-name", "--env-file", "--profile", "--project-directory",
  "-H", "--host", "--log-level", "--ansi", "--context", "-c",
]);

function composeSubcommand(args: readonly string[]): string | undefined {
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (COMPOSE_VALUE_OPTIONS.has(a)) i++;
    else if (!a.startsWith("-")) return a;
  }
  return undefined;
}

function evaluateCompose(args: readonly string[]): Verdict {
  const sub = composeSubcommand(args);
  if (sub === "rm") {
    return {
      decision: "forbid",
      ruleId: "shell.forbidden.compose-rm",
      clause: CLAUSE_COMPOSE,
      reason: "`docker-compose rm` (container removal) is forbidden",
    };
  }
  if (sub === "down" && args.some((a) => a === "-v" || a === "--volumes" || /^-[a-zA-Z]*v[a-zA-Z]*$/.test(a))) {
    return {
      decision: "forbid",
      ruleId: "shell.forbidden.compose-down-volumes",
      clause: CLAUSE_COMPOSE,
      reason: "`docker-compose down -v` (volume removal) is forbidden; use `docker-compose down`",
    };
  }
  if (sub !== undefined && COMPOSE_ALLOWED.has(sub)) {
    return {
      decision: "allow",
      ruleId: "shell.compose-allowed",
      clause: CLAUSE_COMPOSE,
      reason: `\`docker-compose ${sub}\` is allowed`,
    };
  }
  return {
    decision: "ask",
    ruleId: "shell.compose-other",
    clause: CLAUSE_COMPOSE,
    reason: `\`docker-compose ${sub ?? ""}\` is not one of up, down, ps, logs, restart and requires human approval`,
  };
}
