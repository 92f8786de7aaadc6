/**
 * Parses a shell command string into the simple commands it runs, or refuses.
 *
 * The policy judges argv, so a command string is only acceptable when every
 * word the shell will execute can be known now, exactly as the shell will see
 * it. The string is parsed with a real shell grammar (tree-sitter-bash, typed
 * tree) and then walked against a whitelist of node types: anything the walk
 * does not positively recognise is refused, never allowed. A refusal says
 * which construct was not allowed and where.
 *
 * Accepted: simple commands (`prog arg …`) joined by `&&`, `||`, `;`, `|` and
 * newlines; words made of plain characters, backslash escapes, single quotes
 * and double quotes without expansions; comments; and the redirections
 * `2>&1`, `>&2`, `[1|2]>/dev/null`, `[1|2]>>/dev/null`, `</dev/null`, which
 * neither read nor write a file (output is captured by the API anyway).
 *
 * Refused, with the reason:
 * - command substitution `$(…)`/`` `…` `` and process substitution `<(…)`,
 *   anywhere: inside double quotes, heredocs and `${x:-$(…)}` too;
 * - parameter and arithmetic expansion (`$X`, `${X}`, `$((…))`): the value is
 *   not known when the command is judged;
 * - unquoted glob characters `*`, `?`, `[`, `]`: the file list the shell would
 *   substitute is unknown, and a file named `-rf` turns `rm *` into `rm -rf …`.
 *   Quote them (`'*.py'`) if the program should see them literally;
 * - brace expansion `{a,b}`, tilde `~`, unquoted `!`;
 * - any other redirection (files, heredocs, here-strings, `&>`);
 * - assignments (`X=1 cmd`, `export X=1`), subshells `( … )`, groups
 *   `{ … }`, functions, `if`/`for`/`while`/`until`/`case`, `[[ … ]]`, `!`,
 *   background `&`, `|&`, `;;`, shell keywords as command names;
 * - `$'…'` and `$"…"` strings: bash-only, and the sandbox's /bin/sh is dash;
 * - syntax errors and incomplete input (ERROR/MISSING nodes);
 * - control characters other than tab and newline, Unicode spaces and format
 *   characters (the grammar and dash could disagree on where a word ends),
 *   NUL, empty input, and input longer than MAX_COMMAND_LENGTH.
 *
 * Everything accepted means the same in bash and in dash, so the string can be
 * run with `/bin/sh -c`. The grammar is bash's, and tree-sitter is lenient in
 * places where a shell is not (`pytest 2>&1 x` parses as if `x` belonged to
 * the redirection; `a \ b` drops the escaped space). The walk therefore also
 * checks every byte between the nodes it accepted: separators may only be
 * blanks, newlines and line continuations, words of one command must be
 * separated by blanks, parts of one word must touch.
 *
 * `bash -c STRING` / `sh -c STRING` (and other wrappers) are recognised by
 * ./wrappers.ts; the evaluator parses and judges the inner string (nesting
 * depth ≤ 2).
 */
import { createRequire } from "node:module";
import { Language, Parser, type Node } from "web-tree-sitter";
import { SandboxdError } from "../errors.js";

export type ParseResult = { ok: true; commands: string[][] } | { ok: false; reason: string };

/** Longer strings are refused; pass argv instead. */
export const MAX_COMMAND_LENGTH = 32 * 1024;
/** `a && b && … ` with more operators than this is refused (the tree nests one level per operator). */
const MAX_NESTING = 500;

let parser: Parser | undefined;
let initializing: Promise<void> | undefined;

/**
 * Loads the grammar (once; later calls return the same promise). The daemon
 * awaits this at start; parseCommand() is synchronous afterwards.
 */
export function initShellParser(): Promise<void> {
  initializing ??= (async () => {
    await Parser.init();
    const wasm = createRequire(import.meta.url).resolve("tree-sitter-bash/tree-sitter-bash.wasm");
    const language = await Language.load(wasm);
    const p = new Parser();
    p.setLanguage(language);
    parser = p;
  })().catch((cause: unknown) => {
    initializing = undefined;
    throw new SandboxdError("SBX_ERR_INTERNAL", `cannot load the shell grammar (tree-sitter-bash): ${String(cause)}`, {
      cause,
      hint: "check that web-tree-sitter and tree-sitter-bash are installed (npm ci)",
    });
  });
  return initializing;
}

export function isShellParserReady(): boolean {
  return parser !== undefined;
}

/** Parses a command string; see the module comment for what is accepted. Call initShellParser() first. */
export function parseCommand(command: string): ParseResult {
  if (parser === undefined) {
    throw new SandboxdError("SBX_ERR_INTERNAL", "parseCommand() called before initShellParser() finished", {
      hint: "await initShellParser() once at daemon start, before judging command strings",
    });
  }
  const pre = precheck(command);
  if (pre !== undefined) return { ok: false, reason: pre };
  const tree = parser.parse(command);
  if (tree === null) return { ok: false, reason: "the shell grammar returned no tree" };
  try {
    return { ok: true, commands: new Walker(command).program(tree.rootNode) };
  } catch (e) {
    if (e instanceof Refusal) return { ok: false, reason: e.message };
    if (e instanceof RangeError) return { ok: false, reason: "the command is too deeply nested to judge" };
    throw e;
  } finally {
    tree.delete();
  }
}

/* -------------------------------------------------------------------------- */

class Refusal extends Error {}

/** Unicode white space and format characters other than space, tab, newline. */
const ODD_SPACE = /[\p{White_Space}\p{Cf}]/u;
const CONTROL = /[\x00-\x08\x0b-\x1f\x7f]/;

function precheck(command: string): string | undefined {
  if (command.length > MAX_COMMAND_LENGTH) {
    return `the command is ${command.length} characters long; the limit is ${MAX_COMMAND_LENGTH}`;
  }
  const control = CONTROL.exec(command);
  if (control) {
    return `control character U+${hex(control[0])} at ${position(command, control.index)} is not allowed`;
  }
  for (let i = 0; i < command.length; i++) {
    const c = command[i]!;
    if (c === " " || c === "\t" || c === "\n" || c < "\x80") continue;
    const cp = command.codePointAt(i)!;
    const ch = String.fromCodePoint(cp);
    if (ODD_SPACE.test(ch)) {
      return `Unicode space or format character U+${hex(ch)} at ${position(command, i)} is not allowed (dash and the grammar could split words differently); use a plain space`;
    }
    if (cp > 0xffff) i++;
  }
  if (command.trim() === "") return "the command is empty";
  return undefined;
}

function hex(ch: string): string {
  return ch.codePointAt(0)!.toString(16).toUpperCase().padStart(4, "0");
}

/** 1-based line:column of a string index */
function position(text: string, index: number): string {
  let line = 1;
  let lineStart = 0;
  for (let i = text.indexOf("\n"); i !== -1 && i < index; i = text.indexOf("\n", i + 1)) {
    line++;
    lineStart = i + 1;
  }
  return `${line}:${index - lineStart + 1}`;
}

/** Why a node type is refused (types not listed get a generic reason). */
const UNKNOWN_VALUE = "the value is not known when the command is judged";
const REFUSED: Record<string, [what: string, why?: string]> = {
  command_substitution: ["command substitution"],
  process_substitution: ["process substitution"],
  simple_expansion: ["parameter expansion", UNKNOWN_VALUE],
  expansion: ["parameter expansion", UNKNOWN_VALUE],
  arithmetic_expansion: ["arithmetic expansion", UNKNOWN_VALUE],
  variable_assignment: ["variable assignment"],
  variable_assignments: ["variable assignment"],
  declaration_command: ["declaration/export of variables"],
  unset_command: ["unset"],
  subshell: ["subshell ( … )"],
  compound_statement: ["command group { … }"],
  function_definition: ["function definition"],
  if_statement: ["if statement"],
  for_statement: ["for loop"],
  c_style_for_statement: ["for loop"],
  while_statement: ["while/until loop"],
  case_statement: ["case statement"],
  negated_command: ["negation `!`"],
  test_command: ["test expression [ … ] / [[ … ]]"],
  heredoc_redirect: ["heredoc (<<)"],
  herestring_redirect: ["here-string (<<<)"],
  ansi_c_string: ["$'…' string", "bash-only; the sandbox's /bin/sh is dash"],
  translated_string: ['$"…" string', "bash-only; the sandbox's /bin/sh is dash"],
  brace_expression: ["brace expansion", "quote `{` and `}` to pass them literally"],
  extglob_pattern: ["extended glob"],
  regex: ["regular expression"],
};

/** Words that are shell syntax, not programs, when they stand first (bash and dash). */
const RESERVED = new Set([
  "if", "then", "else", "elif", "fi", "case", "esac", "for", "select", "while", "until", "do", "done",
  "in", "function", "time", "coproc", "{", "}", "!", "[[", "]]",
]);

/** unquoted characters that stand for themselves in bash and dash */
const PLAIN = /[A-Za-z0-9_@%+=:,./-]/;

const SEPARATOR_GAP = /^(?:[ \t\n]|\\\n)*$/;
const BLANKS = /^[ \t]*$/;

class Walker {
  private readonly commands: string[][] = [];
  /** statements being walked, nested */
  private depth = 0;

  constructor(private readonly src: string) {}

  /** "WHAT at LINE:COL (`SNIPPET`): WHY" */
  private refuse(node: Node | number, what: string, why?: string): never {
    const index = typeof node === "number" ? node : node.startIndex;
    const snippet = typeof node === "number" ? "" : ` (\`${clip(node.text)}\`)`;
    throw new Refusal(`${what} at ${position(this.src, index)}${snippet}${why === undefined ? "" : `: ${why}`}`);
  }

  private refuseNode(node: Node): never {
    const known = REFUSED[node.type];
    if (known !== undefined) this.refuse(node, known[0], known[1]);
    this.refuse(node, node.isNamed ? `shell construct "${node.type}"` : `operator "${node.type}"`);
  }

  program(root: Node): string[][] {
    // The most dangerous constructs are named first, wherever they hide.
    const subst = root.descendantsOfType(["command_substitution", "process_substitution"])[0];
    if (subst) this.refuseNode(subst);
    if (root.hasError) this.syntaxError(root);
    this.checkGap(0, root.startIndex, "separator");
    this.checkGap(root.endIndex, this.src.length, "separator");

    let prevEnd = root.startIndex;
    let pendingStatement: Node | undefined; // a statement not yet terminated by ; or newline
    for (const child of children(root)) {
      this.checkGap(prevEnd, child.startIndex, "separator");
      if (child.type === "comment") {
        this.comment(child);
      } else if (!child.isNamed) {
        if (child.type !== ";" || pendingStatement === undefined) {
          if (child.type === "&") this.refuse(child, "running in the background with `&`", "the sandbox runs one command at a time");
          this.refuseNode(child);
        }
        pendingStatement = undefined;
      } else {
        if (pendingStatement !== undefined && !this.src.slice(pendingStatement.endIndex, child.startIndex).includes("\n")) {
          this.refuse(child, "a command that does not follow a separator");
        }
        this.statement(child);
        pendingStatement = child;
      }
      prevEnd = child.endIndex;
    }
    this.checkGap(prevEnd, root.endIndex, "separator");
    if (this.commands.length === 0) throw new Refusal("the command contains no command to run (only comments)");
    return this.commands;
  }

  private syntaxError(root: Node): never {
    const bad = findError(root);
    if (bad === undefined) throw new Refusal("the shell grammar reports a syntax error");
    if (bad.isMissing) this.refuse(bad.startIndex, `incomplete command (missing \`${bad.type}\`)`);
    this.refuse(bad, "syntax the shell grammar cannot parse");
  }

  private statement(node: Node): void {
    // lists nest to the left (`a && b && c` is ((a && b) && c)): bound the recursion
    if (++this.depth > MAX_NESTING) this.refuse(node, `more than ${MAX_NESTING} nested operators`, "split the command");
    try {
      this.statementOf(node);
    } finally {
      this.depth--;
    }
  }

  private statementOf(node: Node): void {
    switch (node.type) {
      case "command":
        this.command(node);
        return;
      case "list":
        this.joined(node, ["&&", "||"]);
        return;
      case "pipeline":
        this.joined(node, ["|"]);
        return;
      case "redirected_statement":
        this.redirected(node);
        return;
      default:
        this.refuseNode(node);
    }
  }

  /** `a && b`, `a || b`, `a | b`: statements alternating with the given operators */
  private joined(node: Node, operators: string[]): void {
    let prevEnd = node.startIndex;
    let expectStatement = true;
    for (const child of children(node)) {
      this.checkGap(prevEnd, child.startIndex, "separator");
      prevEnd = child.endIndex;
      if (child.type === "comment") {
        this.comment(child);
      } else if (expectStatement) {
        if (!child.isNamed) this.refuseNode(child);
        this.statement(child);
        expectStatement = false;
      } else {
        if (child.isNamed || !operators.includes(child.type)) {
          if (child.type === "|&") this.refuse(child, "`|&`", "bash-only; write `2>&1 |`");
          this.refuseNode(child);
        }
        expectStatement = true;
      }
    }
    this.checkGap(prevEnd, node.endIndex, "separator");
    if (expectStatement) this.refuse(node, "an operator without a command after it");
  }

  private redirected(node: Node): void {
    let prevEnd = node.startIndex;
    let body = false;
    for (let i = 0; i < node.childCount; i++) {
      const child = node.child(i)!;
      const field = node.fieldNameForChild(i);
      // a newline here would end the command: the redirection must stay on its line
      this.checkGap(prevEnd, child.startIndex, i === 0 ? "none" : "blanks");
      prevEnd = child.endIndex;
      if (field === "body" && !body) {
        this.statement(child);
        body = true;
      } else if (field === "redirect") {
        this.redirect(child);
      } else if (child.type === "comment") {
        this.comment(child);
      } else {
        this.refuseNode(child);
      }
    }
    if (!body) this.refuse(node, "a redirection without a command");
    this.checkGap(prevEnd, node.endIndex, "none");
  }

  private command(node: Node): void {
    const argv: string[] = [];
    let named = false;
    let prev: Node | undefined;
    for (let i = 0; i < node.childCount; i++) {
      const child = node.child(i)!;
      const field = node.fieldNameForChild(i);
      if (prev === undefined) this.checkGap(node.startIndex, child.startIndex, "none");
      else this.wordGap(prev, child);
      prev = child;
      if (field === "name") {
        if (named || argv.length > 0 || child.type !== "command_name" || child.namedChildCount !== 1) this.refuseNode(child);
        const word = child.namedChild(0)!;
        if (word.startIndex !== child.startIndex || word.endIndex !== child.endIndex) this.refuseNode(child);
        const name = this.word(word);
        if (RESERVED.has(name)) this.refuse(child, `shell keyword \`${name}\` as a command`);
        if (name === "") this.refuse(child, "an empty command name");
        if (name.includes("=")) this.refuse(child, "a command name containing `=`", "read as an assignment by some shells");
        argv.push(name);
        named = true;
      } else if (field === "argument") {
        if (!named) this.refuseNode(child);
        argv.push(this.word(child));
      } else if (field === "redirect") {
        this.redirect(child);
      } else if (child.type === "comment") {
        this.comment(child);
      } else {
        this.refuseNode(child);
      }
    }
    if (prev !== undefined) this.checkGap(prev.endIndex, node.endIndex, "none");
    if (!named) this.refuse(node, "a command without a program name");
    this.commands.push(argv);
  }

  /** Two children of one simple command: words need blanks between them; a redirection delimits itself. */
  private wordGap(prev: Node, next: Node): void {
    const raw = this.src.slice(prev.endIndex, next.startIndex);
    const gap = raw.replaceAll("\\\n", "");
    const redirect = prev.type.endsWith("redirect") || next.type.endsWith("redirect") || prev.type === "comment" || next.type === "comment";
    if (!BLANKS.test(gap) || (gap === "" && !redirect)) {
      this.refuse(prev.endIndex, `text between words ${JSON.stringify(clip(raw))}`, "the grammar and the shell may split these words differently");
    }
  }

  private checkGap(from: number, to: number, kind: "separator" | "blanks" | "none"): void {
    if (to <= from) return;
    const gap = this.src.slice(from, to);
    if (kind === "separator" && SEPARATOR_GAP.test(gap)) return;
    if (kind === "blanks" && BLANKS.test(gap.replaceAll("\\\n", ""))) return;
    this.refuse(from, `text the grammar skipped ${JSON.stringify(clip(gap))}`, "the shell may read it differently");
  }

  /** Allowed: [1|2]>&[1|2], [1|2]>/dev/null, [1|2]>>/dev/null, </dev/null. */
  private redirect(node: Node): void {
    if (node.type !== "file_redirect") this.refuseNode(node);
    let descriptor: Node | undefined;
    let operator: Node | undefined;
    const destinations: Node[] = [];
    for (let i = 0; i < node.childCount; i++) {
      const child = node.child(i)!;
      const field = node.fieldNameForChild(i);
      if (field === "descriptor") descriptor = child;
      else if (field === "destination") destinations.push(child);
      else if (!child.isNamed && operator === undefined) operator = child;
      else this.refuseNode(child);
    }
    const explain: () => never = () =>
      this.refuse(node, "redirection", "only 2>&1, >&2, >/dev/null, 2>/dev/null and </dev/null are allowed; the API captures output");
    const dest = destinations[0];
    if (operator === undefined || dest === undefined) explain();
    if (destinations.length !== 1) this.refuse(node, "a redirection followed by more words", "put redirections last");
    if (descriptor !== undefined) {
      // `2 >&1` is the word 2 and a redirection of stdout: the descriptor must touch the operator
      const touching = descriptor.startIndex === node.startIndex && descriptor.endIndex === operator.startIndex;
      if (!touching || (descriptor.text !== "1" && descriptor.text !== "2")) explain();
    } else if (operator.startIndex !== node.startIndex) {
      explain();
    }
    if (!BLANKS.test(this.src.slice(operator.endIndex, dest.startIndex).replaceAll("\\\n", ""))) explain();
    if (dest.endIndex !== node.endIndex) explain();
    const op = operator.type;
    const ok =
      (op === ">&" && (dest.text === "1" || dest.text === "2") && dest.startIndex === operator.endIndex) ||
      ((op === ">" || op === ">>") && dest.type === "word" && dest.text === "/dev/null") ||
      (op === "<" && descriptor === undefined && dest.type === "word" && dest.text === "/dev/null");
    if (!ok) explain();
  }

  /** `#` starts a comment only at the start of a word; the grammar must agree with the shell. */
  private comment(node: Node): void {
    // A line continuation vanishes before the shell splits words: in
    // `pytest\<newline>#; rm -rf /` the `#` is glued to `pytest` and `rm` runs.
    let i = node.startIndex;
    while (i >= 2 && this.src[i - 1] === "\n" && this.src[i - 2] === "\\") i -= 2;
    const before = i === 0 ? "" : this.src[i - 1]!;
    if (i !== node.startIndex || (before !== "" && !" \t\n;&|()".includes(before))) {
      this.refuse(node, "a `#` the grammar reads as a comment but the shell may not", "put a blank before the `#`");
    }
  }

  /** The literal value of one word (quote removal), or a refusal. */
  private word(node: Node, first = true): string {
    switch (node.type) {
      case "word":
      case "number":
        return this.unquoted(node, first);
      case "raw_string": {
        const t = node.text;
        if (t.length < 2 || !t.startsWith("'") || !t.endsWith("'")) this.refuseNode(node);
        return t.slice(1, -1);
      }
      case "string":
        return this.doubleQuoted(node);
      case "concatenation": {
        let out = "";
        let prevEnd = node.startIndex;
        let i = 0;
        for (const part of children(node)) {
          if (part.startIndex !== prevEnd) this.refuse(prevEnd, "a gap inside a word");
          out += this.word(part, first && i === 0);
          prevEnd = part.endIndex;
          i++;
        }
        if (prevEnd !== node.endIndex || i === 0) this.refuse(node, "a word the grammar split unexpectedly");
        return out;
      }
      default:
        this.refuseNode(node);
    }
  }

  private unquoted(node: Node, first: boolean): string {
    const t = node.text;
    let out = "";
    for (let i = 0; i < t.length; i++) {
      const c = t[i]!;
      if (c === "\\") {
        const n = t[i + 1];
        if (n === undefined) this.refuse(node, "a trailing backslash");
        i++;
        if (n !== "\n") out += n;
      } else if (PLAIN.test(c) || c >= "\x80" || (c === "#" && !(first && i === 0))) {
        out += c;
      } else if (c === "*" || c === "?" || c === "[" || c === "]") {
        this.refuse(node, "unquoted glob character", "the file list is unknown when the command is judged; quote it to pass it literally");
      } else if (c === "{" || c === "}") {
        this.refuse(node, "brace expansion", "quote `{` and `}` to pass them literally");
      } else if (c === "~") {
        this.refuse(node, "tilde expansion", "write the path out, or quote `~`");
      } else if (c === "$") {
        this.refuse(node, "unquoted `$`");
      } else {
        this.refuse(node, `unquoted character ${JSON.stringify(c)}`);
      }
    }
    return out;
  }

  private doubleQuoted(node: Node): string {
    for (const child of node.children) {
      if (child === null) continue;
      if (child.isNamed && child.type !== "string_content") this.refuseNode(child);
      if (!child.isNamed && child.type !== '"') this.refuse(child, `\`${child.type}\` inside double quotes`);
    }
    const t = node.text;
    if (t.length < 2 || !t.startsWith('"') || !t.endsWith('"')) this.refuseNode(node);
    let out = "";
    for (let i = 1; i < t.length - 1; i++) {
      const c = t[i]!;
      if (c === "\\") {
        const n = t[i + 1]!;
        if (n === "$" || n === "`" || n === '"' || n === "\\") {
          out += n;
          i++;
        } else if (n === "\n") {
          i++;
        } else {
          out += c;
        }
      } else if (c === "$" || c === "`") {
        this.refuse(node, `\`${c}\` inside double quotes`, `escape it as \\${c}, or use single quotes`);
      } else {
        out += c;
      }
    }
    return out;
  }
}

function* children(node: Node): Generator<Node> {
  for (let i = 0; i < node.childCount; i++) yield node.child(i)!;
}

function findError(node: Node): Node | undefined {
  if (node.isError || node.isMissing) return node;
  for (const child of children(node)) {
    if (child.hasError || child.isMissing) {
      const found = findError(child);
      if (found) return found;
    }
  }
  return undefined;
}

function clip(text: string, max = 40): string {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}
