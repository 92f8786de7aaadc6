/**
 * Option parsing, in one place: how the programs the policy has rules about
 * read their own arguments, so that a rule sees what the program will do and
 * not how it was spelt.
 *
 * The rules match argv words. A program that parses its options with getopt
 * accepts many spellings of one option: `rm -rf`, `rm -r -f`, `rm --rec`
 * (GNU getopt_long takes any unique prefix of a long option), `rm x -R`;
 * `kill -9`, `kill -s 9`, `kill -sKILL`, `kill -n 9`, `kill --signal KILL`,
 * `kill -SIGKILL`; `python3 -mpip`, `python3 -I -m pip`. A rule written for
 * one spelling missed the others. So a program listed here is judged on its
 * *judging view*: its arguments parsed with the program's own option grammar
 * and written out canonically:
 *
 * - every option under one canonical name (`-R`, `--rec`, `--recursive` →
 *   `--recursive`), clusters split (`-rf` → `--recursive --force`);
 * - an option's value attached to a long canonical name (`--signal=KILL`,
 *   `--file=x.yml`), so no rule has to know which options take a value; a
 *   value normalised where the program accepts several spellings (signals);
 * - operands as they are, in order; `--` kept;
 * - a word the grammar does not know kept as it is (the program would refuse
 *   it: getopt reports an unknown or ambiguous option and runs nothing).
 *
 * A view is only ever judged, never run: the shim runs the argv as given.
 * Where a program's own reading depends on its version (ip's abbreviations of
 * objects and commands), every reading is a view and the strictest verdict
 * over all of them wins.
 *
 * Programs not listed here are judged on their argv as given; the rules'
 * {flag: …} matcher still reads short clusters and `--long=value` there.
 */

export type Arity = 0 | 1 | 2 | "optional";

export interface OptionSpec {
  /** every spelling: "-r", "-R", "--recursive" */
  readonly names: readonly string[];
  /** the name in the view (default: the first long name, else the first name) */
  readonly canonical?: string;
  /** 0: a flag; 1: takes a value (attached or the next word); "optional": only attached (`--x=v`, `-xv`); 2: two words (kill --timeout MS SIG) */
  readonly arity?: Arity;
  /** normalises the (last) value: one spelling per meaning */
  readonly value?: (v: string) => string;
  /** python -c/-m: option parsing ends with this option */
  readonly ends?: boolean;
  /** how the option appears in the view (default `--name=value`, or `-x value` for a short canonical name) */
  readonly render?: (values: readonly string[]) => string[];
}

export interface Grammar {
  readonly options: readonly OptionSpec[];
  /** GNU getopt_long: a unique prefix of a long option stands for it (`--rec` → `--recursive`) */
  readonly abbreviations?: boolean;
  /** GNU getopt: options may follow operands until `--`; false ("+" in the optstring): the first operand ends options */
  readonly permute?: boolean;
  /** a word the option table does not cover, read another way (kill -9, nice -5); tried first */
  readonly special?: (word: string) => Parsed | undefined;
  /** the first operand names a subcommand whose arguments follow that subcommand's grammar */
  readonly subcommands?: Readonly<Record<string, Grammar>>;
}

export type Parsed =
  | { kind: "option"; spec: OptionSpec; values: string[] }
  | { kind: "operand"; value: string }
  | { kind: "end" }
  | { kind: "unknown"; word: string };

export interface ParsedArgs {
  items: Parsed[];
  /** words that look like options the grammar does not know (or ambiguous abbreviations) */
  unknown: string[];
  /** index in args of the first word after an option that ends option parsing or the first operand (when !permute) */
  rest: number;
}

/* --------------------------------- parsing -------------------------------- */

function canonicalName(spec: OptionSpec): string {
  return spec.canonical ?? spec.names.find((n) => n.startsWith("--")) ?? spec.names[0]!;
}

/** Words of one option in the view. */
export function renderOption(spec: OptionSpec, values: readonly string[]): string[] {
  if (spec.render) return spec.render(values);
  const name = canonicalName(spec);
  if (values.length === 0) return [name];
  if (name.startsWith("--")) return [`${name}=${values.join(",")}`];
  return [name, ...values];
}

interface Index {
  short: Map<string, OptionSpec>;
  long: Map<string, OptionSpec>;
}

const indexes = new WeakMap<Grammar, Index>();

function indexOf(g: Grammar): Index {
  let ix = indexes.get(g);
  if (ix) return ix;
  ix = { short: new Map(), long: new Map() };
  for (const spec of g.options) {
    for (const n of spec.names) {
      if (n.startsWith("--")) ix.long.set(n, spec);
      else ix.short.set(n.slice(1), spec);
    }
  }
  indexes.set(g, ix);
  return ix;
}

function longOption(g: Grammar, name: string): OptionSpec | "ambiguous" | undefined {
  const ix = indexOf(g);
  const exact = ix.long.get(name);
  if (exact || !g.abbreviations) return exact;
  const found = new Set<OptionSpec>();
  for (const [n, spec] of ix.long) if (n.startsWith(name)) found.add(spec);
  if (found.size === 1) return [...found][0];
  return found.size > 1 ? "ambiguous" : undefined;
}

/**
 * Parses args (the words after the program) with a grammar, as getopt would.
 * With `stopAtOperand` (or a grammar that does not permute) parsing stops at
 * the first operand; `rest` is where it stopped.
 */
export function parseArgs(g: Grammar, args: readonly string[], stopAtOperand = g.permute === false): ParsedArgs {
  const items: Parsed[] = [];
  const unknown: string[] = [];
  let i = 0;
  const take = (): string | undefined => (i < args.length ? args[i++] : undefined);
  for (; i < args.length; ) {
    const word = args[i]!;
    if (word === "--") {
      items.push({ kind: "end" });
      i++;
      return { items, unknown, rest: i };
    }
    if (word === "-" || !word.startsWith("-")) {
      if (stopAtOperand) return { items, unknown, rest: i };
      items.push({ kind: "operand", value: word });
      i++;
      continue;
    }
    i++;
    const special = g.special?.(word);
    if (special) {
      items.push(special);
      continue;
    }
    if (word.startsWith("--")) {
      const eq = word.indexOf("=");
      const name = eq === -1 ? word : word.slice(0, eq);
      const spec = longOption(g, name);
      if (spec === undefined || spec === "ambiguous") {
        unknown.push(word);
        items.push({ kind: "unknown", word });
        continue;
      }
      const arity = spec.arity ?? 0;
      const values: string[] = [];
      if (eq !== -1) {
        if (arity === 0) {
          unknown.push(word);
          items.push({ kind: "unknown", word });
          continue;
        }
        values.push(word.slice(eq + 1));
      }
      const wanted = arity === "optional" ? values.length : arity;
      while (values.length < wanted) {
        const v = take();
        if (v === undefined) break;
        values.push(v);
      }
      items.push(option(spec, values));
      if (spec.ends) return { items, unknown, rest: i };
      continue;
    }
    // a cluster of short options: -rf, -sKILL, -mpip
    const ix = indexOf(g);
    for (let k = 1; k < word.length; k++) {
      const spec = ix.short.get(word[k]!);
      if (spec === undefined) {
        unknown.push(word);
        items.push({ kind: "unknown", word: k === 1 ? word : `-${word.slice(k)}` });
        break;
      }
      const arity = spec.arity ?? 0;
      if (arity === 0) {
        items.push(option(spec, []));
        continue;
      }
      const attached = word.slice(k + 1);
      const values: string[] = attached === "" ? [] : [attached];
      const wanted = arity === "optional" ? values.length : arity;
      while (values.length < wanted) {
        const v = take();
        if (v === undefined) break;
        values.push(v);
      }
      items.push(option(spec, values));
      if (spec.ends) return { items, unknown, rest: i };
      break;
    }
  }
  return { items, unknown, rest: i };
}

function option(spec: OptionSpec, values: string[]): Parsed {
  if (spec.value && values.length > 0) values[values.length - 1] = spec.value(values[values.length - 1]!);
  return { kind: "option", spec, values };
}

/** The view of program + args under a grammar (subcommands followed). */
export function getoptView(g: Grammar, program: string, args: readonly string[]): string[] {
  const out = [program];
  let grammar = g;
  let rest = args;
  for (;;) {
    const stop = grammar.subcommands !== undefined;
    const parsed = parseArgs(grammar, rest, stop || grammar.permute === false);
    for (const item of parsed.items) out.push(...renderItem(item));
    rest = rest.slice(parsed.rest);
    if (!stop || rest.length === 0) break;
    // the first operand is the subcommand
    const sub = rest[0]!;
    out.push(sub);
    rest = rest.slice(1);
    if (!Object.hasOwn(grammar.subcommands!, sub)) break;
    grammar = grammar.subcommands![sub]!;
  }
  out.push(...rest);
  return out;
}

function renderItem(item: Parsed): string[] {
  switch (item.kind) {
    case "option":
      return renderOption(item.spec, item.values);
    case "operand":
      return [item.value];
    case "end":
      return ["--"];
    case "unknown":
      return [item.word];
  }
}

/* --------------------------------- signals -------------------------------- */

const SIGNALS = [
  "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2", "PIPE", "ALRM", "TERM",
  "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG", "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
];
const SIGNAL_ALIASES: Record<string, string> = { IOT: "ABRT", CLD: "CHLD", POLL: "IO", UNUSED: "SYS" };

/**
 * One spelling per signal: `9`, `KILL`, `kill`, `SIGKILL`, `sigkill` → `KILL`.
 * Undefined for a word that is no signal (kill, bash's kill builtin and
 * procps' all accept these, case-insensitively in some versions).
 */
export function signalName(spec: string): string | undefined {
  if (/^\d+$/.test(spec)) {
    const n = Number(spec);
    return n >= 1 && n <= SIGNALS.length ? SIGNALS[n - 1] : n === 0 ? "0" : `${n}`;
  }
  let s = spec.toUpperCase();
  if (s.startsWith("SIG")) s = s.slice(3);
  s = SIGNAL_ALIASES[s] ?? s;
  if (SIGNALS.includes(s) || /^RT(MIN|MAX)([+-]\d+)?$/.test(s)) return s;
  return undefined;
}

const normSignal = (v: string): string => signalName(v) ?? v;

/* --------------------------------- grammars ------------------------------- */

const RM: Grammar = {
  abbreviations: true,
  permute: true,
  options: [
    { names: ["-r", "-R", "--recursive"] },
    { names: ["-f", "--force"] },
    { names: ["-i"] },
    { names: ["-I"] },
    { names: ["--interactive"], arity: "optional" },
    { names: ["--one-file-system"] },
    { names: ["--no-preserve-root"] },
    { names: ["--preserve-root"], arity: "optional" },
    { names: ["-d", "--dir"] },
    { names: ["-v", "--verbose"] },
    { names: ["--help"] },
    { names: ["--version"] },
  ],
};

const SIGNAL_OPTION: OptionSpec = { names: ["-s", "--signal"], canonical: "--signal", arity: 1, value: normSignal };

/**
 * kill: procps', util-linux's and bash's builtin together. `-9`, `-KILL`,
 * `-SIGKILL` are the signal itself; `-n N` is bash's; `--timeout MS SIG`
 * (util-linux) sends SIG after MS, so it is a signal too.
 */
const KILL: Grammar = {
  abbreviations: true,
  permute: true,
  special: (word) => {
    const sig = signalName(word.slice(1));
    return sig === undefined ? undefined : { kind: "option", spec: SIGNAL_OPTION, values: [sig] };
  },
  options: [
    SIGNAL_OPTION,
    { names: ["-n"], canonical: "--signal", arity: 1, value: normSignal },
    { names: ["--timeout"], arity: 2, value: normSignal, render: (v) => [`--timeout=${v[0] ?? ""}`, ...(v[1] === undefined ? [] : [`--signal=${v[1]}`])] },
    { names: ["-q", "--queue"], arity: 1 },
    { names: ["-l", "--list"], arity: "optional" },
    { names: ["-L", "--table"] },
    { names: ["-p", "--pid"] },
    { names: ["-a", "--all"] },
    { names: ["--verbose"] },
  ],
};

/** docker-compose v1 (docopt: unique prefixes of long options are accepted) and v2 global options */
const COMPOSE_GLOBAL: OptionSpec[] = [
  { names: ["-f", "--file"], arity: 1 },
  { names: ["-p", "--project-name"], arity: 1 },
  { names: ["--profile"], arity: 1 },
  { names: ["--env-file"], arity: 1 },
  { names: ["--project-directory"], arity: 1 },
  { names: ["-H", "--host"], arity: 1 },
  { names: ["--log-level"], arity: 1 },
  { names: ["--ansi"], arity: 1 },
  { names: ["-c", "--context"], arity: 1 },
  { names: ["--parallel"], arity: 1 },
  { names: ["--progress"], arity: 1 },
  { names: ["--verbose"] },
  { names: ["--no-ansi"] },
  { names: ["--compatibility"] },
  { names: ["--dry-run"] },
  { names: ["--tls"] },
  { names: ["--tlsverify"] },
  { names: ["--skip-hostname-check"] },
  { names: ["--tlscacert"], arity: 1 },
  { names: ["--tlscert"], arity: 1 },
  { names: ["--tlskey"], arity: 1 },
  { names: ["-v", "--version"] },
];

const COMPOSE_DOWN: Grammar = {
  abbreviations: true,
  permute: true,
  options: [
    { names: ["-v", "--volumes"] },
    { names: ["--rmi"], arity: 1 },
    { names: ["--remove-orphans"] },
    { names: ["-t", "--timeout"], arity: 1 },
  ],
};

const COMPOSE: Grammar = {
  abbreviations: true,
  options: COMPOSE_GLOBAL,
  subcommands: { down: COMPOSE_DOWN },
};

const DOCKER: Grammar = {
  options: [
    { names: ["-H", "--host"], arity: 1 },
    { names: ["-c", "--context"], arity: 1 },
    { names: ["--config"], arity: 1 },
    { names: ["-l", "--log-level"], arity: 1 },
    { names: ["-D", "--debug"] },
    { names: ["--tls"] },
    { names: ["--tlsverify"] },
    { names: ["--tlscacert"], arity: 1 },
    { names: ["--tlscert"], arity: 1 },
    { names: ["--tlskey"], arity: 1 },
  ],
  subcommands: { compose: COMPOSE },
};

/**
 * CPython's own option parser: clusters (`-IsE`, `-mpip`, `-cCODE`), no long
 * abbreviations, and `-c`/`-m` end the interpreter's options. The view keeps
 * only what runs: `python -m MOD args…`, `python -c CODE args…` or `python
 * SCRIPT args…`. The interpreter's other options (-I -E -s -S -B -u -O -W -X
 * …) only narrow where modules come from or change diagnostics; none of them
 * runs something else.
 */
const PYTHON: Grammar = {
  permute: false,
  options: [
    { names: ["-c"], arity: 1, ends: true },
    { names: ["-m"], arity: 1, ends: true },
    { names: ["-W"], arity: 1 },
    { names: ["-X"], arity: 1 },
    { names: ["--check-hash-based-pycs"], arity: 1 },
    ...["b", "B", "d", "E", "h", "i", "I", "O", "P", "q", "s", "S", "u", "v", "V", "x", "R", "?"].map((l) => ({ names: [`-${l}`] })),
    { names: ["--help"] },
    { names: ["--help-env"] },
    { names: ["--help-xoptions"] },
    { names: ["--help-all"] },
    { names: ["--version"] },
  ],
};

export function pythonView(program: string, args: readonly string[]): string[] {
  const parsed = parseArgs(PYTHON, args, true);
  const last = parsed.items[parsed.items.length - 1];
  const out = [program];
  // an unknown option stays visible (python refuses it and runs nothing)
  for (const item of parsed.items) if (item.kind === "unknown") out.push(item.word);
  if (last?.kind === "option" && last.spec.ends) out.push(last.spec.names[0]!, ...last.values);
  else if (last?.kind === "end") out.push("--");
  out.push(...args.slice(parsed.rest));
  return out;
}

/** what a python argv runs: module, inline code, a script, or stdin */
export type PythonTarget = { kind: "module"; name: string } | { kind: "code" } | { kind: "script"; path: string } | { kind: "stdin" };

export function pythonTarget(args: readonly string[]): PythonTarget {
  const parsed = parseArgs(PYTHON, args, true);
  const last = parsed.items[parsed.items.length - 1];
  if (last?.kind === "option" && last.spec.ends) {
    return last.spec.names[0] === "-m" ? { kind: "module", name: last.values[0] ?? "" } : { kind: "code" };
  }
  const script = args[parsed.rest];
  return script === undefined || script === "-" ? { kind: "stdin" } : { kind: "script", path: script };
}

export const PYTHON_NAME = /^python(3(\.\d+)?)?$/;

/* ----------------------------------- ip ----------------------------------- */

/** ip's objects (iproute2 ip.c), in its order */
const IP_OBJECTS = [
  "address", "addrlabel", "maddress", "route", "rule", "neighbor", "neighbour", "ntable", "ntbl", "link", "l2tp", "fou", "ila",
  "macsec", "tunnel", "tuntap", "tap", "token", "tcpmetrics", "tcp_metrics", "monitor", "xfrm", "mroute", "mrule", "netns",
  "netconf", "vrf", "sr", "nexthop", "mptcp", "ioam", "stats", "help",
];
/** the commands of the objects whose commands are well known; others: IP_COMMANDS */
const IP_OBJECT_COMMANDS: Record<string, string[]> = {
  addrlabel: ["add", "delete", "list", "show", "lst", "flush", "help"],
  maddress: ["add", "delete", "list", "show", "lst", "help"],
  address: ["add", "change", "chg", "replace", "delete", "list", "show", "lst", "flush", "save", "showdump", "restore", "help"],
  link: ["add", "set", "change", "replace", "delete", "show", "list", "lst", "help", "xstats", "afstats", "property"],
  route: ["add", "change", "replace", "prepend", "append", "test", "delete", "list", "show", "lst", "flush", "get", "save", "restore", "showdump", "help"],
  rule: ["add", "delete", "flush", "list", "show", "lst", "save", "restore", "help"],
  neighbor: ["add", "change", "replace", "delete", "flush", "show", "list", "lst", "get", "help"],
};
IP_OBJECT_COMMANDS.neighbour = IP_OBJECT_COMMANDS.neighbor!;
const IP_COMMANDS = [
  "add", "append", "attach", "change", "chg", "del", "delete", "detach", "exec", "flush", "get", "help", "identify", "list", "lst",
  "monitor", "pids", "prepend", "replace", "restore", "save", "set", "show", "showdump", "test", "update",
];

/**
 * ip reads objects, commands and its own options by prefix (`ip a fl` is
 * `ip address flush`), first match in a table that changes between
 * versions. So every object and command a word can abbreviate is a reading,
 * and each reading is a view: `ip l s` is `ip link set` (forbidden) as well
 * as `ip link show`. ip's own options (`-4`, `-n NS`, `-b FILE` …) are left
 * out of the views; `-b`/`-batch` (commands from a file) keeps ip asking.
 */
export function ipViews(program: string, args: readonly string[]): string[][] {
  let i = 0;
  const kept: string[] = [];
  while (i < args.length && args[i]!.startsWith("-") && args[i] !== "--") {
    const w = args[i]!.replace(/^--?/, "");
    if (["n", "netns", "b", "batch", "rc", "rcvbuf", "l", "loops", "f", "family"].some((o) => o === w || (w.length > 1 && o.startsWith(w)))) {
      if (w.startsWith("b")) kept.push(args[i]!, args[i + 1] ?? "");
      i += 2;
    } else i++;
  }
  if (args[i] === "--") i++;
  const object = args[i];
  if (object === undefined) return [[program, ...kept]];
  const objects = IP_OBJECTS.filter((o) => o.startsWith(object));
  if (objects.length === 0) return [[program, ...kept, ...args.slice(i)]];
  const command = args[i + 1];
  const views: string[][] = [];
  for (const o of objects) {
    if (command === undefined) {
      views.push([program, ...kept, o]);
      continue;
    }
    const commands = (IP_OBJECT_COMMANDS[o] ?? IP_COMMANDS).filter((c) => c.startsWith(command));
    if (commands.length === 0) views.push([program, ...kept, o, ...args.slice(i + 1)]);
    for (const c of commands) views.push([program, ...kept, o, c, ...args.slice(i + 2)]);
  }
  return views;
}

/* -------------------------------- the table ------------------------------- */

const GRAMMARS: Record<string, Grammar> = {
  rm: RM,
  kill: KILL,
  "docker-compose": COMPOSE,
  docker: DOCKER,
};

export function baseName(program: string): string {
  return program.slice(program.lastIndexOf("/") + 1);
}

/**
 * The views an argv is judged on: one for most programs (its canonical form,
 * or argv itself for a program without a grammar here), several where the
 * program's reading is ambiguous. Rules match every view; strictest wins.
 */
export function judgingViews(argv: readonly string[]): string[][] {
  const program = argv[0];
  if (program === undefined) return [[...argv]];
  const name = baseName(program);
  const args = argv.slice(1);
  if (name === "ip") return ipViews(program, args);
  if (PYTHON_NAME.test(name)) return [pythonView(program, args)];
  return [Object.hasOwn(GRAMMARS, name) ? getoptView(GRAMMARS[name]!, program, args) : [...argv]];
}
