/**
 * Judges a command against a policy: SKILLS.md §2 applied to parsed argv.
 *
 * Every simple command is judged on its own argv, under every layer of the
 * policy (a combined policy has its base and its stricter phase policy), by
 * every rule that matches; the strictest decision wins (forbid > ask > allow),
 * and among equally strict rules the first in file order. A command no rule
 * matches gets the layer's `unknown` decision ("any command not matching this
 * pattern requires human approval").
 *
 * A command string is parsed (shellparse.ts) into simple commands, each
 * judged; a string the parser cannot vouch for is refused with
 * `{decision: "forbid", ruleId: "shell.parse"}` (SBX_ERR_COMMAND_PARSE): a
 * human would be asked to approve something nobody could judge, and argv is
 * always available instead.
 *
 * Each argv is judged on its judging views (./options.ts): the program's own
 * option grammar applied, options written canonically (`rm --rec`, `rm -R`
 * → `rm --recursive`; `kill -sKILL`, `kill -n 9` → `kill --signal=KILL`;
 * `python3 -I -mpip` → `python3 -m pip`), every view under every rule.
 *
 * A wrapper (./wrappers.ts: sh/bash -c, env, nice, timeout, xargs, stdbuf,
 * nohup, time, command, exec, find -exec, …) is judged as itself (none is on
 * the whitelist: ask) AND by what it runs, recursively: a forbidden inner
 * command forbids the wrapper. A shell's `-c` string is parsed and judged to a
 * shell nesting depth of 2; wrappers nest at most MAX_WRAPPER_DEPTH deep; an
 * option a wrapper's grammar does not know asks (rule shell.wrapper-option).
 */
import type { ErrorCode } from "../errors.js";
import {
  DECISION_RANK,
  type ArgMatcher,
  type AtomSpec,
  type CompiledRule,
  type Decision,
  type Policy,
  type ShellLayer,
  type ShellRuleSpec,
  type TokenSpec,
} from "./schema.js";
import { quoteArgv } from "../audit/format.js";
import { judgingViews } from "./options.js";
import { parseCommand } from "./shellparse.js";
import { unwrap } from "./wrappers.js";

export interface PartVerdict {
  argv: string[];
  decision: Decision;
  ruleId: string;
  clause: string;
  reason: string;
}

export interface Verdict {
  decision: Decision;
  ruleId: string;
  clause: string;
  reason: string;
  /** every simple command judged (for `bash -c`, the wrapper and then its inner commands) */
  parts: PartVerdict[];
  /**
   * What the shim runs if the verdict is allow (or a human approves an ask):
   * argv input → argv itself; a command string → ["/bin/sh", "-c", command],
   * safe because every part was judged and anything unvouched refused.
   */
  execArgv: string[];
}

export type CommandInput = { argv: readonly string[] } | { command: string };

export interface EvaluateOptions {
  /**
   * Programs the operator allows (daemon setting SANDBOXD_EXTRA_ALLOW), set
   * outside the sandbox only. They take the place of an `ask` for commands no
   * rule matches (rule id shell.operator-allow); a rule that asks or forbids
   * still wins, and an `unknown: forbid` policy is not overridden.
   */
  extraAllow?: ReadonlySet<string>;
  /** judge shell strings inside wrappers (sh -c); false only when the loader checks examples without the parser */
  scripts?: boolean;
}

export const PARSE_RULE_ID = "shell.parse";
export const UNKNOWN_RULE_ID = "shell.not-whitelisted";
export const OPERATOR_RULE_ID = "shell.operator-allow";
const CLAUSE_WHITELIST = "SKILLS.md §2 Command Whitelist Pattern";
/** `bash -c "bash -c '…'"` is judged; one level more is refused */
export const MAX_SHELL_NESTING = 2;
/** `nice timeout 5 env … cmd`: wrappers within wrappers, at most this deep */
export const MAX_WRAPPER_DEPTH = 8;
export const WRAPPER_OPTION_RULE_ID = "shell.wrapper-option";

/** how deep the current argv is nested: in shell strings, in wrappers */
interface Depth {
  shells: number;
  wrappers: number;
}

export function evaluateCommand(policy: Policy, input: CommandInput, opts: EvaluateOptions = {}): Verdict {
  const parts: PartVerdict[] = [];
  let execArgv: string[];
  if ("argv" in input && Array.isArray(input.argv)) {
    const argv = [...input.argv];
    execArgv = argv;
    judgeArgv(policy, argv, opts, { shells: 0, wrappers: 0 }, parts);
  } else if ("command" in input && typeof input.command === "string") {
    const command = input.command;
    execArgv = ["/bin/sh", "-c", command];
    judgeString(policy, command, opts, { shells: 0, wrappers: 0 }, parts, undefined);
  } else {
    throw new TypeError("evaluateCommand: pass {argv: string[]} or {command: string}");
  }
  let top = parts[0]!;
  for (const p of parts) if (DECISION_RANK[p.decision] > DECISION_RANK[top.decision]) top = p;
  const reason = parts.length > 1 && top.argv.length > 0 ? `${top.reason} (part ${parts.indexOf(top) + 1} of ${parts.length})` : top.reason;
  return { decision: top.decision, ruleId: top.ruleId, clause: top.clause, reason, parts, execArgv };
}

/** The coded error a non-allow verdict turns into at the API; null for allow. */
export function errorCodeFor(verdict: Pick<Verdict, "decision" | "ruleId">): ErrorCode | null {
  if (verdict.decision === "allow") return null;
  if (verdict.decision === "ask") return "SBX_ERR_POLICY_NEEDS_APPROVAL";
  return verdict.ruleId === PARSE_RULE_ID ? "SBX_ERR_COMMAND_PARSE" : "SBX_ERR_POLICY_DENIED";
}

function judgeString(
  policy: Policy,
  command: string,
  opts: EvaluateOptions,
  depth: Depth,
  parts: PartVerdict[],
  wrapper: readonly string[] | undefined,
): void {
  const parsed = parseCommand(command);
  if (!parsed.ok) {
    const where = wrapper ? `the inner command of \`${show(wrapper)}\`` : "the command string";
    parts.push({
      argv: wrapper ? [...wrapper] : [],
      decision: "forbid",
      ruleId: PARSE_RULE_ID,
      clause: CLAUSE_WHITELIST,
      reason: `${where} cannot be judged part by part: ${parsed.reason}; pass argv, or a string of simple commands joined by &&, ||, ;, |`,
    });
    return;
  }
  for (const argv of parsed.commands) judgeArgv(policy, argv, opts, depth, parts);
}

function judgeArgv(policy: Policy, argv: string[], opts: EvaluateOptions, depth: Depth, parts: PartVerdict[]): void {
  const program = argv[0];
  if (program === undefined || program === "" || argv.some((a) => a.includes("\0"))) {
    parts.push({
      argv,
      decision: "forbid",
      ruleId: PARSE_RULE_ID,
      clause: CLAUSE_WHITELIST,
      reason: program === undefined || program === "" ? "argv has no program" : "an argument contains a NUL byte",
    });
    return;
  }
  const views = judgingViews(argv);
  let best: PartVerdict | undefined;
  for (const layer of policy.shell.layers) {
    const v = judgeInLayer(layer, argv, opts.extraAllow, views);
    if (best === undefined || DECISION_RANK[v.decision] > DECISION_RANK[best.decision]) best = v;
  }
  const wrapped = unwrap(argv);
  if (wrapped !== undefined && wrapped.inner.length > 0 && best!.ruleId === UNKNOWN_RULE_ID) {
    best!.reason += "; or run the wrapped command itself, where it is judged on its own";
  }
  parts.push(best!);
  if (wrapped === undefined) return;
  const forbid = (reason: string) => parts.push({ argv, decision: "forbid", ruleId: PARSE_RULE_ID, clause: CLAUSE_WHITELIST, reason });
  if (wrapped.refuse !== undefined) {
    forbid(`\`${show(argv)}\`: ${wrapped.refuse}`);
    return;
  }
  if (wrapped.unknown.length > 0) {
    parts.push({
      argv,
      decision: "ask",
      ruleId: WRAPPER_OPTION_RULE_ID,
      clause: CLAUSE_WHITELIST,
      reason: `\`${show(argv)}\`: ${wrapped.wrapper} is given option${wrapped.unknown.length > 1 ? "s" : ""} ${wrapped.unknown.map((u) => `\`${u}\``).join(", ")} that sandboxd does not know, so what it runs is uncertain; it requires human approval`,
    });
  }
  for (const inner of wrapped.inner) {
    if (inner.kind === "file") continue; // a script file: bound to its content when approved (src/approvals/binding.ts)
    if (inner.kind === "script" && opts.scripts === false) continue;
    if (inner.kind === "argv") {
      if (depth.wrappers + 1 > MAX_WRAPPER_DEPTH) {
        forbid(`\`${show(argv)}\` nests wrappers deeper than ${MAX_WRAPPER_DEPTH} levels; run the innermost command directly`);
        return;
      }
      judgeArgv(policy, inner.argv, opts, { ...depth, wrappers: depth.wrappers + 1 }, parts);
      continue;
    }
    if (depth.shells + 1 > MAX_SHELL_NESTING) {
      forbid(`\`${show(argv)}\` nests shells deeper than ${MAX_SHELL_NESTING} levels; run the innermost command directly`);
      return;
    }
    judgeString(policy, inner.script, opts, { ...depth, shells: depth.shells + 1 }, parts, argv);
  }
}

/**
 * argv and every argv it runs through wrappers (not shell strings), for the
 * loader's example checks: an example `env rm -rf /` belongs to the rm rule.
 */
export function wrappedArgvs(argv: readonly string[], depth = 0): string[][] {
  const out = [[...argv]];
  const w = depth < MAX_WRAPPER_DEPTH ? unwrap(argv) : undefined;
  for (const inner of w?.inner ?? []) if (inner.kind === "argv") out.push(...wrappedArgvs(inner.argv, depth + 1));
  return out;
}

/** The verdict of one layer alone for argv, wrappers unwrapped (shell strings in them not judged): the loader's example check. */
export function evaluateInLayer(layer: ShellLayer, argv: readonly string[]): Verdict {
  return evaluateCommand({ shell: { layers: [layer] } } as unknown as Policy, { argv }, { scripts: false });
}

/** The verdict of one layer for one argv: strictest matching rule, else the layer's unknown decision. */
export function judgeInLayer(
  layer: ShellLayer,
  argv: readonly string[],
  extraAllow?: ReadonlySet<string>,
  views: readonly (readonly string[])[] = judgingViews(argv),
): PartVerdict {
  let best: CompiledRule | undefined;
  for (const rule of layer.rules) {
    if ((best === undefined || rule.rank > best.rank) && views.some((v) => matchView(rule, v))) {
      best = rule;
      if (rule.rank === DECISION_RANK.forbid) break;
    }
  }
  const program = argv[0] ?? "";
  if (best !== undefined) {
    return { argv: [...argv], decision: best.decision, ruleId: best.id, clause: best.clause, reason: `\`${show(argv)}\`: ${best.justification}` };
  }
  if (layer.unknown === "ask" && extraAllow?.has(program)) {
    return {
      argv: [...argv],
      decision: "allow",
      ruleId: OPERATOR_RULE_ID,
      clause: CLAUSE_WHITELIST,
      reason: `\`${program}\` is allowed by the operator's SANDBOXD_EXTRA_ALLOW`,
    };
  }
  const list = layer.whitelist.length > 0 ? ` (${layer.whitelist.join(", ")})` : "";
  const what = `\`${show(argv)}\` is not covered by the whitelist${list} or any other rule`;
  return {
    argv: [...argv],
    decision: layer.unknown,
    ruleId: UNKNOWN_RULE_ID,
    clause: CLAUSE_WHITELIST,
    reason:
      layer.unknown === "ask"
        ? `${what}; it requires human approval`
        : `${what}; the policy ${layer.source} forbids every command it does not cover`,
  };
}

/** Whether a rule matches argv: any of its judging views (./options.ts). */
export function ruleMatches(rule: CompiledRule, argv: readonly string[]): boolean {
  return judgingViews(argv).some((v) => matchView(rule, v));
}

function matchView(rule: CompiledRule, argv: readonly string[]): boolean {
  const program = argv[0];
  if (program === undefined) return false;
  if (!rule.program(program)) {
    const slash = program.lastIndexOf("/");
    if (slash === -1 || !rule.program(program.slice(slash + 1))) return false;
  }
  const rest = rule.rest;
  if (rest.length > 0) {
    if (rule.skipOptions === undefined) {
      if (argv.length <= rest.length) return false;
      for (let i = 0; i < rest.length; i++) if (!rest[i]!(argv[i + 1]!)) return false;
    } else if (!matchPositional(rest, rule.skipOptions, argv)) {
      return false;
    }
  }
  if (rule.anyArg !== undefined) {
    for (let i = 1; i < argv.length; i++) if (rule.anyArg(argv[i]!)) return true;
    return false;
  }
  return true;
}

function matchPositional(rest: readonly ArgMatcher[], withValue: ReadonlySet<string>, argv: readonly string[]): boolean {
  let k = 0;
  let options = true;
  for (let i = 1; i < argv.length && k < rest.length; i++) {
    const a = argv[i]!;
    if (options && a === "--") {
      options = false;
      continue;
    }
    if (options && a.length > 1 && a.startsWith("-")) {
      if (withValue.has(a)) i++;
      continue;
    }
    if (!rest[k]!(a)) return false;
    k++;
  }
  return k === rest.length;
}

/* ------------------------------- compiling ------------------------------ */

export function compileRule(spec: ShellRuleSpec): CompiledRule {
  const [first, ...rest] = spec.pattern;
  return {
    id: spec.id,
    clause: spec.clause,
    decision: spec.decision,
    rank: DECISION_RANK[spec.decision],
    justification: spec.justification,
    program: compileToken(first!),
    rest: rest.map(compileToken),
    anyArg: spec.anyArg === undefined ? undefined : compileToken(spec.anyArg),
    skipOptions: spec.skipOptions === undefined ? undefined : new Set(spec.skipOptions.withValue),
  };
}

export function compileLayer(source: string, rules: readonly ShellRuleSpec[], unknown: "ask" | "forbid"): ShellLayer {
  const whitelist: string[] = [];
  for (const r of rules) {
    if (r.decision !== "allow") continue;
    const first = r.pattern[0]!;
    for (const atom of Array.isArray(first) ? first : [first]) {
      if (typeof atom === "string" && !whitelist.includes(atom)) whitelist.push(atom);
    }
  }
  return { source, rules: rules.map(compileRule), unknown, whitelist };
}

function compileToken(token: TokenSpec): ArgMatcher {
  if (!Array.isArray(token)) return compileAtom(token);
  const words = new Set(token.filter((a): a is string => typeof a === "string"));
  const matchers = token.filter((a) => typeof a !== "string").map(compileAtom);
  if (matchers.length === 0) return (arg) => words.has(arg);
  return (arg) => words.has(arg) || matchers.some((m) => m(arg));
}

const SHORT_CLUSTER = /^-[A-Za-z]+$/;

function compileAtom(atom: AtomSpec): ArgMatcher {
  if (typeof atom === "string") return (arg) => arg === atom;
  if ("prefix" in atom) return (arg) => arg.startsWith(atom.prefix);
  if ("contains" in atom) return (arg) => arg.includes(atom.contains);
  if ("not" in atom) {
    const except = new Set(atom.not);
    return (arg) => !except.has(arg);
  }
  const exact = new Set<string>();
  const shortLetters: string[] = [];
  const longPrefixes: string[] = [];
  for (const f of atom.flag) {
    exact.add(f);
    if (/^-[A-Za-z]$/.test(f)) shortLetters.push(f[1]!);
    else if (f.startsWith("--")) longPrefixes.push(`${f}=`);
  }
  return (arg) => {
    if (exact.has(arg)) return true;
    if (shortLetters.length > 0 && SHORT_CLUSTER.test(arg)) {
      for (const l of shortLetters) if (arg.includes(l, 1)) return true;
    }
    for (const p of longPrefixes) if (arg.startsWith(p)) return true;
    return false;
  };
}

/* -------------------------------- display ------------------------------- */

/** argv as a reader would type it (invisible characters escaped, src/audit/format.ts), shortened for messages */
export function show(argv: readonly string[], max = 160): string {
  let out = "";
  for (const a of argv) {
    const word = quoteArgv([a]);
    out = out === "" ? word : `${out} ${word}`;
    if (out.length > max) return `${out.slice(0, max - 1)}…`;
  }
  return out;
}
