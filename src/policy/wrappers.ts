/**
 * Programs that run another command: judged by what they wrap as well as by
 * themselves, the strictest verdict winning.
 *
 * `env rm -rf /`, `nice -n 5 rm -rf /`, `timeout 5 rm -rf /`, `sh -c 'rm -rf
 * x' x` run `rm -rf`; judged only as `env`, `nice`, `timeout`, `sh` (not on
 * the whitelist: ask) they turned a forbid into an ask that a human might
 * approve without seeing what it hides. Each wrapper is described here by its
 * option grammar (the same getopt reading as ./options.ts), so the command it
 * runs is found where the wrapper itself would find it: after its options,
 * after its own operands (timeout's DURATION, env's NAME=VALUE words), and
 * for a shell, in its `-c` string (parsed and judged like any command string)
 * whatever `$0` and arguments follow.
 *
 * An option the grammar does not know makes the wrapper ask (the program
 * might read it differently in another version), and the wrapped command is
 * judged under both readings (the option as a flag, or with the next word as
 * its value); the strictest verdict over everything wins. Forms whose
 * wrapped command cannot be known (`env -S STRING` splits a string by its own
 * rules) are refused.
 */
import { baseName, parseArgs, type Grammar, type OptionSpec } from "./options.js";

export type Inner =
  /** an argv the wrapper runs */
  | { kind: "argv"; argv: string[] }
  /** a shell command string it runs (sh -c, eval) */
  | { kind: "script"; script: string }
  /** a script file it runs (sh FILE, . FILE): not judged here, bound to its content by the approval */
  | { kind: "file"; path: string };

export interface Unwrapped {
  /** the wrapper's name (sh, env, …) */
  wrapper: string;
  /** what it runs; alternatives when an unknown option leaves the reading open */
  inner: Inner[];
  /** options the wrapper's grammar does not know */
  unknown: string[];
  /** set when what it runs cannot be known: the command is refused */
  refuse?: string;
}

interface WrapperSpec {
  grammar: Grammar;
  /** operands of the wrapper itself before the command (timeout DURATION, taskset MASK) */
  operands?: number;
  /** NAME=VALUE words before the command (env) */
  assignments?: boolean;
  /** what runs when no command is given (xargs → echo) */
  defaultCommand?: string[];
  /** options whose presence makes the wrapped command unknowable */
  refuse?: (option: OptionSpec) => string | undefined;
}

const flag = (...names: string[]): OptionSpec => ({ names });
const valued = (...names: string[]): OptionSpec => ({ names, arity: 1 });

const ENV_SPLIT: OptionSpec = { names: ["-S", "--split-string"], arity: 1 };

/** GNU coreutils/findutils/util-linux option grammars; all stop at the first operand ("+" in getopt's optstring) */
const WRAPPERS: Record<string, WrapperSpec> = {
  env: {
    grammar: {
      abbreviations: true,
      permute: false,
      options: [
        flag("-i", "--ignore-environment"),
        flag("-0", "--null"),
        valued("-u", "--unset"),
        valued("-C", "--chdir"),
        ENV_SPLIT,
        flag("-v", "--debug"),
        { names: ["--block-signal"], arity: "optional" },
        { names: ["--default-signal"], arity: "optional" },
        { names: ["--ignore-signal"], arity: "optional" },
        flag("--list-signal-handling"),
        flag("--help"),
        flag("--version"),
      ],
    },
    assignments: true,
    refuse: (o) => (o === ENV_SPLIT ? "`env -S` splits its string by rules of its own; pass the command's argv instead" : undefined),
  },
  nice: {
    grammar: {
      abbreviations: true,
      permute: false,
      // the old form `nice -5 cmd`, `nice --10 cmd`
      special: (w) => (/^-[-+]?\d+$/.test(w) ? { kind: "option", spec: { names: ["--adjustment"], arity: 1 }, values: [w.replace(/^-/, "")] } : undefined),
      options: [valued("-n", "--adjustment"), flag("--help"), flag("--version")],
    },
  },
  timeout: {
    grammar: {
      abbreviations: true,
      permute: false,
      options: [
        valued("-k", "--kill-after"),
        valued("-s", "--signal"),
        flag("--preserve-status"),
        flag("--foreground"),
        flag("-v", "--verbose"),
        flag("--help"),
        flag("--version"),
      ],
    },
    operands: 1,
  },
  stdbuf: {
    grammar: {
      abbreviations: true,
      permute: false,
      options: [valued("-i", "--input"), valued("-o", "--output"), valued("-e", "--error"), flag("--help"), flag("--version")],
    },
  },
  nohup: { grammar: { abbreviations: true, permute: false, options: [flag("--help"), flag("--version")] } },
  time: {
    grammar: {
      abbreviations: true,
      permute: false,
      options: [
        valued("-f", "--format"),
        valued("-o", "--output"),
        flag("-a", "--append"),
        flag("-p", "--portability"),
        flag("-v", "--verbose"),
        flag("-q", "--quiet"),
        flag("--help"),
        flag("-V", "--version"),
      ],
    },
  },
  xargs: {
    grammar: {
      abbreviations: true,
      permute: false,
      options: [
        flag("-0", "--null"),
        valued("-a", "--arg-file"),
        valued("-d", "--delimiter"),
        valued("-E"),
        { names: ["-e", "--eof"], arity: "optional" },
        valued("-I"),
        { names: ["-i", "--replace"], arity: "optional" },
        valued("-L", "--max-lines"),
        { names: ["-l"], arity: "optional" },
        valued("-n", "--max-args"),
        flag("-o", "--open-tty"),
        valued("-P", "--max-procs"),
        flag("-p", "--interactive"),
        valued("--process-slot-var"),
        flag("-r", "--no-run-if-empty"),
        valued("-s", "--max-chars"),
        flag("--show-limits"),
        flag("-t", "--verbose"),
        flag("-x", "--exit"),
        flag("--help"),
        flag("--version"),
      ],
    },
    defaultCommand: ["echo"],
  },
  // shell builtins (in a command string, dash runs them)
  command: { grammar: { permute: false, options: [flag("-p"), flag("-v"), flag("-V")] } },
  exec: { grammar: { permute: false, options: [flag("-c"), flag("-l"), valued("-a")] } },
  builtin: { grammar: { permute: false, options: [] } },
  // util-linux
  setsid: { grammar: { abbreviations: true, permute: false, options: [flag("-c", "--ctty"), flag("-f", "--fork"), flag("-w", "--wait"), flag("--help"), flag("--version")] } },
  ionice: {
    grammar: {
      permute: false,
      options: [valued("-c", "--class"), valued("-n", "--classdata"), valued("-p", "--pid"), valued("-P", "--pgid"), valued("-u", "--uid"), flag("-t", "--ignore")],
    },
  },
  taskset: {
    grammar: { abbreviations: true, permute: false, options: [flag("-a", "--all-tasks"), flag("-c", "--cpu-list"), flag("-p", "--pid")] },
    operands: 1,
  },
  // `busybox rm -rf /` is rm
  busybox: { grammar: { permute: false, options: [] } },
};

/** Shells: sh (dash), bash. Their options are `set` letters plus a few of their own. */
const SHELLS = new Set(["sh", "bash", "dash", "rbash"]);
const SHELL_LETTERS = new Set("abefhkmnptuvxBCHPEilrsDTc".split(""));
const SHELL_LONG_FLAGS = new Set(["--login", "--norc", "--noprofile", "--posix", "--restricted", "--verbose", "--noediting", "--debugger", "--dump-strings", "--dump-po-strings", "--help", "--version", "--pretty-print"]);
const SHELL_LONG_VALUED = new Set(["--rcfile", "--init-file"]);

function unwrapShell(name: string, args: readonly string[]): Unwrapped {
  const unknown: string[] = [];
  let command = false;
  let stdin = false;
  let i = 0;
  for (; i < args.length; i++) {
    const w = args[i]!;
    if (w === "--" || w === "-") {
      i++;
      break;
    }
    if (!(w.startsWith("-") || w.startsWith("+")) || w.length < 2) break;
    if (w.startsWith("--")) {
      if (SHELL_LONG_VALUED.has(w)) i++;
      else if (!SHELL_LONG_FLAGS.has(w)) unknown.push(w);
      continue;
    }
    for (let k = 1; k < w.length; k++) {
      const l = w[k]!;
      if (l === "o" || l === "O") {
        if (k === w.length - 1) i++; // -o NAME
        break;
      }
      if (!SHELL_LETTERS.has(l)) {
        unknown.push(w);
        break;
      }
      if (l === "c" && w.startsWith("-")) command = true;
      if (l === "s" && w.startsWith("-")) stdin = true;
    }
  }
  const operand = args[i];
  if (command) {
    // `sh -c STRING [$0 [args…]]`: the string is what runs, whatever follows it
    return { wrapper: name, inner: operand === undefined ? [] : [{ kind: "script", script: operand }], unknown };
  }
  if (stdin || operand === undefined) return { wrapper: name, inner: [], unknown };
  return { wrapper: name, inner: [{ kind: "file", path: operand }], unknown };
}

/** `find … -exec CMD… ;` / `-execdir` / `-ok` / `-okdir`: each CMD is run */
function unwrapFind(args: readonly string[]): Unwrapped | undefined {
  const inner: Inner[] = [];
  for (let i = 0; i < args.length; i++) {
    if (!["-exec", "-execdir", "-ok", "-okdir"].includes(args[i]!)) continue;
    const start = i + 1;
    let end = start;
    while (end < args.length && args[end] !== ";" && !(args[end] === "+" && args[end - 1] === "{}")) end++;
    if (end > start) inner.push({ kind: "argv", argv: args.slice(start, end) });
    i = end;
  }
  return inner.length === 0 ? undefined : { wrapper: "find", inner, unknown: [] };
}

/**
 * What argv runs besides itself, or undefined when it is no wrapper. The
 * caller judges each inner command (and the wrapper itself) and nests.
 */
export function unwrap(argv: readonly string[]): Unwrapped | undefined {
  const program = argv[0];
  if (program === undefined) return undefined;
  const name = baseName(program);
  const args = argv.slice(1);
  if (SHELLS.has(name)) return unwrapShell(name, args);
  if (name === "eval") return args.length === 0 ? undefined : { wrapper: name, inner: [{ kind: "script", script: args.join(" ") }], unknown: [] };
  if (name === "." || name === "source") return args[0] === undefined ? undefined : { wrapper: name, inner: [{ kind: "file", path: args[0] }], unknown: [] };
  if (name === "find") return unwrapFind(args);
  if (!Object.hasOwn(WRAPPERS, name)) return undefined;
  const spec = WRAPPERS[name]!;

  const parsed = parseArgs(spec.grammar, args, true);
  for (const item of parsed.items) {
    if (item.kind !== "option") continue;
    const why = spec.refuse?.(item.spec);
    if (why) return { wrapper: name, inner: [], unknown: parsed.unknown, refuse: why };
  }
  const readings = [parsed.rest];
  // an unknown option might have taken the next word as its value
  const unknowns = parsed.items.filter((x) => x.kind === "unknown");
  const lastUnknown = unknowns[unknowns.length - 1];
  if (lastUnknown && !lastUnknown.word.includes("=") && parsed.rest < args.length) readings.push(parsed.rest + 1);
  const inner: Inner[] = [];
  for (const start of readings) {
    let j = start + (spec.operands ?? 0);
    if (spec.assignments) while (j < args.length && /^[^=]+=/.test(args[j]!)) j++;
    const cmd = args.slice(j);
    if (cmd.length > 0) inner.push({ kind: "argv", argv: cmd });
    else if (spec.defaultCommand) inner.push({ kind: "argv", argv: [...spec.defaultCommand] });
  }
  return { wrapper: name, inner, unknown: parsed.unknown };
}

export function isWrapper(program: string): boolean {
  const name = baseName(program);
  return SHELLS.has(name) || Object.hasOwn(WRAPPERS, name) || name === "eval" || name === "." || name === "source" || name === "find";
}
