/**
 * SKILLS.md "Error Categories": what kind of failure a command's result is,
 * and the evidence (the line that decided it). Pure: the exec path hands it
 * the result it already holds, so it costs nothing on a success (exit 0 is
 * never read) and one pass over the kept output on a failure.
 *
 * pytest is not read from its free text: the daemon asks it for a JUnit XML
 * report (exec.ts adds `--junitxml`), and its counts come from that report's
 * <testsuite> attributes (parseJunit). mypy is read from its own summary
 * line ("Found N errors in M files" / "Success: no issues found").
 */
import path from "node:path";
import { XMLParser } from "fast-xml-parser";

export const FAILURE_CATEGORIES = ["syntax", "import", "type", "test", "runtime", "database", "iteration", "policy", "unknown"] as const;
export type FailureCategory = (typeof FAILURE_CATEGORIES)[number];

/** The tool a command runs, as far as fail-fast is concerned: its successes reset the counters its failures fed. */
export type Tool = "pytest" | "mypy" | "pylint" | "black" | "flake8" | "isort" | "python" | "other";

export interface Failure {
  category: FailureCategory;
  /** the line (or summary) that decided the category, scrubbed by the caller's redactor, at most 500 characters */
  evidence: string;
}

export interface TestCounts {
  tests: number;
  passed: number;
  failures: number;
  errors: number;
  skipped: number;
  /** "file::name" of each failing or erroring test case, at most 50 */
  failed: string[];
}

export interface CategorizeInput {
  /** the program's argv as run (after the policy's wrappers): used to know the tool */
  argv: readonly string[];
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  stdout: string;
  stderr: string;
  /** pytest's JUnit report, when the daemon asked for one and read it back */
  junit?: TestCounts | null;
  /**
   * The daemon asked every pytest the command might run for a report
   * (PYTEST_ADDOPTS, and `--junitxml` on a pytest argv): a pytest that
   * exits 0 without one did not show that its tests passed.
   */
  junitAsked?: boolean;
  /** the tool as the daemon knows it after the run (a report found: pytest ran, whatever the argv said) */
  tool?: Tool;
  /** the command string sent its stderr to /dev/null (stderrDiscarded): a traceback could not be read */
  stderrDiscarded?: boolean;
  /** SKILLS.md leaves it open; the policy says whether pytest's "no tests collected" (exit 5) is a failure */
  noTestsIsFailure?: boolean;
  /**
   * OOM kills the container's cgroup counted while the command ran (the
   * resource watch's probe, read before and after): a failed command that
   * saw one is a `runtime` failure, whatever its output says
   */
  oomKills?: number;
  /** the container's hard memory limit, for the evidence */
  memoryLimitBytes?: number | null;
}

const MAX_EVIDENCE = 500;

/** 1536 MiB → "1.5 GiB", 300 MiB → "300 MiB" */
export function formatBytes(n: number): string {
  const MiB = 1024 * 1024;
  if (n >= 1024 * MiB) return `${+(n / (1024 * MiB)).toFixed(2)} GiB`;
  if (n >= MiB) return `${+(n / MiB).toFixed(1)} MiB`;
  return `${+(n / 1024).toFixed(1)} KiB`;
}
const clip = (s: string) => (s.length > MAX_EVIDENCE ? s.slice(0, MAX_EVIDENCE - 1) + "…" : s);

/** The tool of an argv: the program itself, or what `python -m X` / `python3 -m X` runs. */
export function toolOf(argv: readonly string[]): Tool {
  const prog = path.basename(argv[0] ?? "");
  let name = prog;
  if (/^python(\d(\.\d+)?)?$/.test(prog)) {
    const m = argv.indexOf("-m");
    name = m > 0 && argv[m + 1] ? argv[m + 1]! : "python";
  }
  if (name === "pytest" || name === "py.test") return "pytest";
  if (name === "mypy" || name === "pylint" || name === "black" || name === "flake8" || name === "isort" || name === "python") return name;
  return "other";
}

/** Where in an argv `--junitxml=…` may be added: pytest run directly or as `python -m pytest`. */
export function isPytest(argv: readonly string[]): boolean {
  return toolOf(argv) === "pytest";
}

/**
 * The category of a finished command, or null when it succeeded. Only a
 * non-zero exit (or a signal, a timeout) is read at all.
 */
export function categorize(r: CategorizeInput): Failure | null {
  const tool = r.tool ?? toolOf(r.argv);
  if (r.timedOut) return { category: "runtime", evidence: "timed out (killed by the phase's timeout)" };
  if (r.exitCode === 0) return hiddenFailure(r, tool);
  // the kernel's own count, not a guess from the output: a process of the container was killed for lack of memory meanwhile
  if (r.oomKills && r.oomKills > 0) {
    const limit = r.memoryLimitBytes ? ` (the phase's memory limit, ${formatBytes(r.memoryLimitBytes)})` : "";
    const how = r.exitCode === null ? `it was killed by ${r.signal ?? "a signal"}` : `it exited ${r.exitCode}`;
    return { category: "runtime", evidence: clip(`out of memory: the kernel's OOM killer killed ${r.oomKills} process(es) in the container while this command ran${limit}; ${how}`) };
  }
  if (tool === "pytest" && r.exitCode === 5) {
    if (r.noTestsIsFailure === false) return null;
    return { category: "test", evidence: "pytest collected no tests (exit 5)" };
  }
  // the deciding lines (a traceback's last, a tool's summary) are at the end: only the tails are read
  const text = `${tail(r.stderr)}\n${tail(r.stdout)}`;
  const oom = /\b(Killed|Out of memory|MemoryError|oom-kill)/.exec(text);
  if (r.exitCode === 137 || r.signal === "SIGKILL") {
    return { category: "runtime", evidence: clip(oom ? `killed (SIGKILL), likely out of memory: ${lineAt(text, oom.index)}` : "killed (SIGKILL / exit 137)") };
  }
  if (r.exitCode === null) return { category: "runtime", evidence: `killed by ${r.signal ?? "a signal"}` };

  // Linters' own words for "this does not parse".
  if (tool === "pylint") {
    const m = /^.*\bE0001\b.*$/m.exec(text);
    if (m) return { category: "syntax", evidence: clip(m[0].trim()) };
  }
  if (tool === "black") {
    const m = /^.*(cannot parse|Cannot parse).*$/m.exec(text);
    if (m) return { category: "syntax", evidence: clip(m[0].trim()) };
  }
  if (tool === "flake8") {
    const m = /^.*\bE999\b.*$/m.exec(text);
    if (m) return { category: "syntax", evidence: clip(m[0].trim()) };
  }
  if (tool === "mypy") {
    const syntax = /^.*: error: .*(invalid syntax|SyntaxError).*$/m.exec(text);
    if (syntax) return { category: "syntax", evidence: clip(syntax[0].trim()) };
    const summary = /^Found (\d+) errors? in (\d+) files?.*$/m.exec(text);
    if (summary) return { category: "type", evidence: clip(summary[0].trim()) };
  }

  // a test run with failing tests is a test failure, whatever the tests raised
  if (tool === "pytest" && r.junit && r.junit.failures > 0) return testFailure(r.junit);
  // Python's own exceptions: the last "Name: message" line of a traceback decides.
  const exc = lastException(text);
  if (exc) {
    if (exc.name === "SyntaxError" || exc.name === "IndentationError" || exc.name === "TabError") return { category: "syntax", evidence: clip(exc.line) };
    if (exc.name === "ModuleNotFoundError" || exc.name === "ImportError") {
      // pytest reports a test module that does not import as a collection error; it is still an import error.
      return { category: "import", evidence: clip(exc.line) };
    }
  }
  if (tool === "pytest") {
    if (r.junit) return testFailure(r.junit);
    return { category: "test", evidence: `pytest exit ${r.exitCode} (no JUnit report read)` };
  }
  if (tool === "mypy") return { category: "type", evidence: clip(firstLine(text, /: error: /) ?? `mypy exit ${r.exitCode}`) };
  if (tool === "pylint" || tool === "black" || tool === "flake8" || tool === "isort") {
    // lint findings that are not syntax: not a SKILLS.md category of their own
    return { category: "unknown", evidence: clip(firstLine(text, /\S/) ?? `${tool} exit ${r.exitCode}`) };
  }
  if (exc || /^Traceback \(most recent call last\):/m.test(text)) {
    return { category: "runtime", evidence: clip(exc?.line ?? "Traceback (most recent call last)") };
  }
  // A Python program that failed with its error output thrown away is a runtime failure:
  // `python3 main.py 2>/dev/null` must not turn a crash into an uncounted `unknown`.
  // (With stderr kept, a non-zero exit and no traceback is the program's own choice: unknown.)
  if (tool === "python" && r.stderrDiscarded) {
    return { category: "runtime", evidence: `python exit ${r.exitCode} with its error output discarded (2>/dev/null): no traceback could be read, a failure all the same` };
  }
  return { category: "unknown", evidence: `exit ${r.exitCode}` };
}

/**
 * Whether a command string sends stderr to /dev/null. The policy's shell
 * grammar (src/policy/shellparse.ts) allows only `2>&1`, `>&2`, `>/dev/null`,
 * `2>/dev/null` and `</dev/null`, so two shapes discard it: `2>/dev/null`,
 * and `>/dev/null` with a later `2>&1`.
 */
export function stderrDiscarded(command: string): boolean {
  if (/(^|\s)2>\s*\/dev\/null(?=\s|;|&|\||$)/.test(command)) return true;
  return /(^|\s)1?>\s*\/dev\/null(?=\s|;|&|\||$)[\s\S]*\s2>&1/.test(command);
}

/** pytest options that print and exit without running a test: their exit 0 is neither a pass nor a failure. */
const PYTEST_INFO_ONLY = new Set(["--version", "-V", "--help", "-h", "--co", "--collect-only", "--fixtures", "--fixtures-per-test", "--markers", "--setup-plan"]);

/**
 * A command that exited 0 and still failed, as far as fail-fast goes: the
 * exit code is the agent's to choose (`|| true`, `sys.exit(0)` after
 * `pytest.main()`, `os._exit(0)` from a conftest.py), pytest's report is not.
 *   - a report with failed or erroring tests: a `test` failure;
 *   - pytest run directly, asked for a report, exiting 0 without one (killed
 *     its own session before the report, switched the report off): a `test`
 *     failure — nothing shows its tests passed. Options that only print
 *     (--version, --help, --collect-only, …) are exempt.
 */
function hiddenFailure(r: CategorizeInput, tool: Tool): Failure | null {
  if (r.junit && r.junit.failures + r.junit.errors > 0) {
    return { category: "test", evidence: clip(`${testFailure(r.junit).evidence} (the command exited 0; pytest's report says its tests failed)`) };
  }
  if (tool === "pytest" && r.junitAsked && !r.junit && !r.argv.some((a) => PYTEST_INFO_ONLY.has(a))) {
    return { category: "test", evidence: "pytest exited 0 without the JUnit report the daemon asked for (--junitxml): nothing shows its tests passed, so it is not a pass" };
  }
  return null;
}

const TAIL_CHARS = 64 * 1024;
function tail(s: string): string {
  if (s.length <= TAIL_CHARS) return s;
  const cut = s.indexOf("\n", s.length - TAIL_CHARS);
  return s.slice(cut < 0 ? s.length - TAIL_CHARS : cut + 1);
}

function testFailure(j: TestCounts): Failure {
  const first = j.failed[0] ? `; first: ${j.failed[0]}` : "";
  return { category: "test", evidence: clip(`${j.failures} failed, ${j.errors} errors, ${j.passed} passed, ${j.skipped} skipped of ${j.tests}${first}`) };
}

function lastException(text: string): { name: string; line: string } | null {
  const re = /^\s*(?:E\s+)?((?:[A-Za-z_][\w]*\.)*([A-Z][A-Za-z0-9_]*(?:Error|Exception|Exit|Interrupt)))(?::\s.*)?$/gm;
  let found: { name: string; line: string } | null = null;
  let m: RegExpExecArray | null;
  while ((m = re.exec(text)) !== null) found = { name: m[2]!, line: m[0].trim() };
  return found;
}

function lineAt(text: string, index: number): string {
  const start = text.lastIndexOf("\n", index) + 1;
  const end = text.indexOf("\n", index);
  return text.slice(start, end < 0 ? undefined : end).trim();
}

function firstLine(text: string, re: RegExp): string | null {
  for (const l of text.split("\n")) if (re.test(l)) return l.trim();
  return null;
}

/* ------------------------------ JUnit XML ------------------------------ */

const MAX_FAILED_NAMES = 50;
const parser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: "",
  // no entity expansion beyond XML's five: a report is data, never markup to expand
  processEntities: false,
  parseAttributeValue: false,
  isArray: (name) => name === "testsuite" || name === "testcase",
});

/**
 * pytest's JUnit XML: `<testsuites><testsuite tests= failures= errors=
 * skipped=>` with one <testcase> per test, a <failure>/<error> child on
 * those that did not pass. Totals are summed over every suite; names are
 * "classname::name" of the failing cases. Throws on a report that is not one.
 */
export function parseJunit(xml: string): TestCounts {
  return parseJunitReport(xml).counts;
}

/** A report read: its counts, and every test case that passed ("classname::name"), which answers earlier failures (failfast.ts). */
export interface JunitReport {
  counts: TestCounts;
  passed: Set<string>;
}

export function parseJunitReport(xml: string): JunitReport {
  const doc = parser.parse(xml) as Record<string, unknown>;
  const root = (doc.testsuites ?? doc) as Record<string, unknown>;
  const suites = root.testsuite as Array<Record<string, unknown>> | undefined;
  if (!Array.isArray(suites) || suites.length === 0) throw new Error("no <testsuite> in the JUnit report");
  const n = (v: unknown) => {
    const x = Number.parseInt(String(v ?? "0"), 10);
    if (!Number.isFinite(x) || x < 0) throw new Error(`bad count ${String(v)} in the JUnit report`);
    return x;
  };
  const out: TestCounts = { tests: 0, passed: 0, failures: 0, errors: 0, skipped: 0, failed: [] };
  const passed = new Set<string>();
  for (const s of suites) {
    out.tests += n(s.tests);
    out.failures += n(s.failures);
    out.errors += n(s.errors);
    out.skipped += n(s.skipped);
    for (const c of (s.testcase as Array<Record<string, unknown>> | undefined) ?? []) {
      const id = `${String(c.classname ?? "")}::${String(c.name ?? "")}`;
      if (c.failure !== undefined || c.error !== undefined) {
        if (out.failed.length < MAX_FAILED_NAMES) out.failed.push(id);
      } else if (c.skipped === undefined) passed.add(id);
    }
  }
  out.passed = Math.max(0, out.tests - out.failures - out.errors - out.skipped);
  return { counts: out, passed };
}
