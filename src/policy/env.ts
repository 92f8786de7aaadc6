/**
 * The variables a project's `.env` cannot set for the agent's commands.
 *
 * SKILLS.md lets the agent read its configuration from `.env`, and every
 * command gets it in its environment. But the agent can write `.env` (or
 * the project it comes from), and many variables change *what runs* or
 * *where packages come from* without the command line showing it: the
 * policy judges `bash -c true` or `pip install requests`, and BASH_ENV or
 * PIP_INDEX_URL would make them something else. Those names are reserved:
 * dropped from what `.env` gives the commands, and named (never their
 * values) in the phase's trail when it starts (`phase.start` `envReserved`).
 * The daemon's own values (PATH, HOME, the pip proxy, the service URLs) are
 * set after the `.env` and are not affected.
 *
 * One group per reason, so a new name is added where its reason is.
 */

export interface ReservedGroup {
  /** why these names are reserved */
  readonly why: string;
  readonly names?: readonly string[];
  /** every name starting with one of these */
  readonly prefixes?: readonly string[];
}

export const RESERVED_ENV: readonly ReservedGroup[] = [
  {
    why: "the sandbox's own plumbing: set by the daemon for every command",
    names: ["PATH", "HOME", "LANG", "SHELL", "USER", "LOGNAME", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"],
    prefixes: ["SANDBOXD_"],
  },
  {
    why: "shells read these at start or while running and run code from them (a script to source, exported functions, a prompt or trace string with $(…))",
    names: [
      "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS1", "PS2", "PS3", "PS4", "PROMPT_COMMAND", "IFS", "CDPATH", "GLOBIGNORE",
      "BASH_XTRACEFD", "BASH_LOADABLES_PATH", "EXECIGNORE", "INPUTRC", "HISTFILE", "TMOUT",
    ],
    prefixes: ["BASH_FUNC_"],
  },
  {
    why: "GNU tools read their options differently (the policy reads them as getopt does)",
    names: ["POSIXLY_CORRECT"],
  },
  {
    why: "Python runs or imports other code with these (a startup file, module search paths, the user site, breakpoint hooks, warning categories it imports, cached bytecode from elsewhere)",
    names: [
      "PYTHONSTARTUP", "PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONINSPECT", "PYTHONEXECUTABLE", "PYTHONBREAKPOINT",
      "PYTHONWARNINGS", "PYTHONPLATLIBDIR", "PYTHONPYCACHEPREFIX", "PYTHONCASEOK",
    ],
  },
  {
    why: "test runners read options and plugins from these, and Python strips asserts with PYTHONOPTIMIZE: `PYTEST_ADDOPTS=--co` made a failing suite exit 0 without running a test",
    names: ["PYTHONOPTIMIZE", "PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DEBUG_TEMPROOT"],
  },
  {
    why: "where packages come from and how their source is trusted (pip's and uv's whole configuration, its config files under XDG dirs, CA bundles)",
    names: ["XDG_CONFIG_HOME", "XDG_CONFIG_DIRS", "XDG_DATA_HOME", "XDG_CACHE_HOME", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE"],
    prefixes: ["PIP_", "UV_"],
  },
  {
    why: "where connections go: the daemon routes pip through its own allow-list proxy",
    names: [
      "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "FTP_PROXY",
      "http_proxy", "https_proxy", "no_proxy", "all_proxy", "ftp_proxy",
    ],
  },
  {
    why: "the dynamic loader and the C library load code or data from these paths (preloads, library paths, iconv modules, locales, message catalogs, resolver files, tunables)",
    names: ["GCONV_PATH", "LOCPATH", "NLSPATH", "HOSTALIASES", "RES_OPTIONS", "LOCALDOMAIN", "GLIBC_TUNABLES"],
    prefixes: ["LD_", "MALLOC_"],
  },
  {
    why: "where commands write temporary files: the phase's own /tmp, not the project or a path of the agent's choosing",
    names: ["TMPDIR", "TMP", "TEMP"],
  },
  {
    why: "other interpreters and tools run code or programs named here (option injection, library paths, pagers, editors, git's helpers)",
    names: [
      "PERL5OPT", "PERL5LIB", "PERLLIB", "RUBYOPT", "RUBYLIB", "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS",
      "JDK_JAVA_OPTIONS", "PAGER", "EDITOR", "VISUAL", "BROWSER",
    ],
    prefixes: ["GIT_"],
  },
];

const NAMES = new Set(RESERVED_ENV.flatMap((g) => g.names ?? []));
const PREFIXES = RESERVED_ENV.flatMap((g) => g.prefixes ?? []);

export function isReservedEnv(name: string): boolean {
  return NAMES.has(name) || PREFIXES.some((p) => name.startsWith(p));
}

/** Why a name is reserved (its group's reason), or null when `.env` may set it. */
export function reservedReason(name: string): string | null {
  const g = RESERVED_ENV.find((x) => (x.names ?? []).includes(name) || (x.prefixes ?? []).some((p) => name.startsWith(p)));
  return g ? g.why : null;
}

/** Splits a project's .env: what commands get, and the reserved names dropped (sorted). */
export function splitDotenv(vars: Readonly<Record<string, string>>): { kept: Record<string, string>; dropped: string[] } {
  const kept: Record<string, string> = {};
  const dropped: string[] = [];
  for (const [k, v] of Object.entries(vars)) {
    if (isReservedEnv(k)) dropped.push(k);
    else kept[k] = v;
  }
  return { kept, dropped: dropped.sort() };
}
