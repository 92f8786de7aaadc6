/**
 * Rendering of build_audit.log lines in the SKILLS.md "Audit & Logging
 * Requirements" format. Every line this module returns starts with
 * `[TIMESTAMP]`; text from the sandbox (command arguments, output) can never
 * start a line of its own: control characters in single-line fields are
 * escaped, and multi-line output continues on lines indented with "    | ".
 */

/** ISO 8601 UTC with milliseconds, e.g. 2026-01-28T14:32:01.123Z */
export function timestamp(date: Date): string {
  return date.toISOString();
}

const SAFE_ARG = /^[A-Za-z0-9_\-+=.,/:@%^]+$/;

/**
 * Characters a terminal does not show as themselves: C0/C1 controls and DEL
 * (ESC starts cursor movements that can overwrite what was printed before,
 * CR returns to the line start, BS steps back), Unicode format characters
 * (bidi overrides such as U+202E reorder the text around them; zero-width
 * characters hide), line and paragraph separators, unusual spaces that look
 * like a plain space, surrogates, private-use and unassigned code points.
 */
export const INVISIBLE = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Cs}\p{Co}\p{Cn}\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]/u;
const INVISIBLE_ALL = new RegExp(INVISIBLE.source, "gu");

function escapeChar(ch: string): string {
  switch (ch) {
    case "\n":
      return "\\n";
    case "\r":
      return "\\r";
    case "\t":
      return "\\t";
  }
  const cp = ch.codePointAt(0)!;
  if (cp <= 0xff) return `\\x${cp.toString(16).padStart(2, "0")}`;
  if (cp <= 0xffff) return `\\u${cp.toString(16).padStart(4, "0")}`;
  return `\\U${cp.toString(16).padStart(8, "0")}`;
}

/**
 * POSIX-shell quoting of argv for display (the command is never run from
 * this text). A word with an invisible character is written bash's `$'…'`
 * way with the character escaped (`$'a\x1b[2Kb'`), so what a person reads is
 * exactly the argument, on one line.
 */
export function quoteArgv(argv: readonly string[]): string {
  return argv.map(quoteWord).join(" ");
}

function quoteWord(a: string): string {
  if (a !== "" && SAFE_ARG.test(a)) return a;
  if (!INVISIBLE.test(a)) return `'${a.replace(/'/g, `'\\''`)}'`;
  let out = "";
  for (const ch of a) {
    if (ch === "\\" || ch === "'") out += `\\${ch}`;
    else if (INVISIBLE.test(ch)) out += escapeChar(ch);
    else out += ch;
  }
  return `$'${out}'`;
}

/**
 * Escape every invisible character (see INVISIBLE: controls, ANSI escapes,
 * bidi overrides, separators) so one field stays on one line and shows what
 * it holds.
 */
export function escapeControl(text: string): string {
  return text.replace(INVISIBLE_ALL, escapeChar);
}

/**
 * Output as one header line plus continuation lines. Tabs are kept; other
 * control characters (ANSI escapes included) are escaped. When bytes were
 * left out between a kept head and tail, a line of the daemon's own —
 * `    ~ [N bytes not kept]`, a prefix no output line has — stands where
 * they were.
 */
export function renderOutput(ts: string, label: "STDOUT" | "STDERR", head: string, omitted = 0, tail = ""): string[] {
  const rows = (text: string) => text.split("\n").map((row) => escapeControl(row).replace(/\\t/g, "\t"));
  const strip = (text: string) => (text.endsWith("\n") ? text.slice(0, -1) : text);
  if (omitted === 0) {
    const trimmed = strip(head);
    if (trimmed === "") return [`[${ts}] ${label}: (empty)`];
    const [first, ...rest] = rows(trimmed);
    return [`[${ts}] ${label}: ${first}`, ...rest.map((r) => `    | ${r}`)];
  }
  const [first, ...rest] = rows(head);
  return [
    `[${ts}] ${label}: ${first}`,
    ...rest.map((r) => `    | ${r}`),
    `    ~ [${omitted} bytes not kept]`,
    ...(strip(tail) === "" ? [] : rows(strip(tail)).map((r) => `    | ${r}`)),
  ];
}

/**
 * `[TIMESTAMP] [SKILL] [ACTION] [TARGET] [RESULT]`. The target never holds
 * `] [`: a file named `x] [SUCCESS` would end the field early for whoever
 * splits the line there, and make a refused change read as a success (its
 * space is written `\x20`).
 */
export function actionLine(ts: string, skill: string, action: string, target: string, result: string): string {
  return `[${ts}] [${skill}] [${action}] [${escapeControl(target).replaceAll("] [", "]\\x20[")}] [${escapeControl(result)}]`;
}

/**
 * The daemon's own part at the start of a line this module renders: the
 * timestamp and `[SKILL] [ACTION] `, or `LABEL: ` (with `[Engine]` and a
 * byte-count note), or the continuation indent. Never sandbox text.
 */
const OWN_PREFIX = /^(?:\[[0-9T:.Z-]+\] (?:\[[A-Z_]+\] \[[A-Z_]+\] |[A-Z_]+(?: \[[A-Za-z]+\])?: ?)|    \| |    ~ )/;

/**
 * Redacts a build_audit.log line but not its structure: the prefix the
 * daemon wrote (timestamp, skill, action, label) is kept as is, the rest —
 * where command lines, output, SQL and error text go — is scrubbed.
 */
export function redactLine(line: string, redactor: { redact(text: string): string }): string {
  const m = OWN_PREFIX.exec(line);
  if (!m) return redactor.redact(line);
  return m[0] + redactor.redact(line.slice(m[0].length));
}
