import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { categorize, parseJunit, parseJunitReport, stderrDiscarded, toolOf, type TestCounts } from "../../src/phases/categorize.js";
import { FailFastState, escalationReport } from "../../src/phases/failfast.js";
import { loadPolicy, type Policy } from "../../src/policy/index.js";
import { ROOT } from "../helpers/sandbox.js";

const base = { signal: null, timedOut: false, stdout: "", stderr: "" };

describe("categorize", () => {
  it("never reads a success", () => {
    expect(categorize({ ...base, argv: ["pytest"], exitCode: 0, stderr: "SyntaxError: x" })).toBeNull();
  });
  it("knows the tool behind python -m", () => {
    expect(toolOf(["python3", "-m", "pytest", "-q"])).toBe("pytest");
    expect(toolOf(["/usr/bin/mypy", "."])).toBe("mypy");
    expect(toolOf(["python3", "main.py"])).toBe("python");
    expect(toolOf(["ls"])).toBe("other");
  });
  it("syntax: Python's own and the linters'", () => {
    const tb = 'Traceback (most recent call last):\n  File "x.py", line 1\n    def f(:\n          ^\nSyntaxError: invalid syntax\n';
    expect(categorize({ ...base, argv: ["python3", "x.py"], exitCode: 1, stderr: tb })).toEqual({ category: "syntax", evidence: "SyntaxError: invalid syntax" });
    expect(categorize({ ...base, argv: ["python3", "x.py"], exitCode: 1, stderr: "IndentationError: unexpected indent" })?.category).toBe("syntax");
    expect(categorize({ ...base, argv: ["pylint", "x.py"], exitCode: 2, stdout: "x.py:1:7: E0001: Parsing failed: 'invalid syntax' (syntax-error)\n" })).toEqual({
      category: "syntax",
      evidence: "x.py:1:7: E0001: Parsing failed: 'invalid syntax' (syntax-error)",
    });
    expect(categorize({ ...base, argv: ["black", "--check", "."], exitCode: 123, stderr: "error: cannot format x.py: Cannot parse: 1:6: def f(:\n" })?.category).toBe("syntax");
    // a lint finding that is not a syntax error is not a SKILLS.md category
    expect(categorize({ ...base, argv: ["pylint", "x.py"], exitCode: 16, stdout: "x.py:1:0: C0114: Missing module docstring\n" })?.category).toBe("unknown");
  });
  it("import", () => {
    const r = categorize({ ...base, argv: ["python3", "main.py"], exitCode: 1, stderr: "Traceback (most recent call last):\n  File \"main.py\", line 1\nModuleNotFoundError: No module named 'numpyy'\n" });
    expect(r).toEqual({ category: "import", evidence: "ModuleNotFoundError: No module named 'numpyy'" });
    // pytest's collection error for a test module that does not import
    const p = categorize({ ...base, argv: ["pytest"], exitCode: 2, stdout: "E   ImportError: cannot import name 'x' from 'm'\n", junit: { tests: 1, passed: 0, failures: 0, errors: 1, skipped: 0, failed: ["::tests.test_m"] } });
    expect(p?.category).toBe("import");
  });
  it("type: mypy's summary", () => {
    const out = "m.py:3: error: Incompatible return value type (got \"str\", expected \"int\")  [return-value]\nFound 1 error in 1 file (checked 2 source files)\n";
    expect(categorize({ ...base, argv: ["mypy", "."], exitCode: 1, stdout: out })).toEqual({ category: "type", evidence: "Found 1 error in 1 file (checked 2 source files)" });
  });
  it("test: pytest's report, not its text", () => {
    const junit = { tests: 4, passed: 1, failures: 1, errors: 1, skipped: 1, failed: ["tests.test_a::test_bad", "tests.test_a::test_err"] };
    const r = categorize({ ...base, argv: ["pytest", "-q"], exitCode: 1, stdout: "E   ZeroDivisionError: division by zero\n", junit });
    expect(r).toEqual({ category: "test", evidence: "1 failed, 1 errors, 1 passed, 1 skipped of 4; first: tests.test_a::test_bad" });
    expect(categorize({ ...base, argv: ["pytest"], exitCode: 5 })?.category).toBe("test");
    expect(categorize({ ...base, argv: ["pytest"], exitCode: 5, noTestsIsFailure: false })).toBeNull();
  });
  it("runtime: exceptions, timeouts, kills", () => {
    expect(categorize({ ...base, argv: ["python3", "main.py"], exitCode: 1, stderr: "Traceback (most recent call last):\n  File …\nValueError: bad candle\n" })).toEqual({ category: "runtime", evidence: "ValueError: bad candle" });
    expect(categorize({ ...base, argv: ["python3", "main.py"], exitCode: null, signal: "SIGKILL", timedOut: true })?.category).toBe("runtime");
    expect(categorize({ ...base, argv: ["python3", "main.py"], exitCode: 137 })?.category).toBe("runtime");
    expect(categorize({ ...base, argv: ["grep", "x", "f"], exitCode: 1 })).toEqual({ category: "unknown", evidence: "exit 1" });
    // a Python program with its error output thrown away still failed; with it kept, no traceback is the program's choice
    expect(categorize({ ...base, argv: ["python3", "main.py"], exitCode: 1, stderrDiscarded: true })).toEqual({
      category: "runtime",
      evidence: "python exit 1 with its error output discarded (2>/dev/null): no traceback could be read, a failure all the same",
    });
    expect(categorize({ ...base, argv: ["python3", "main.py"], exitCode: 3 })?.category).toBe("unknown");
    for (const c of ["python3 m.py 2>/dev/null", "python3 m.py 2> /dev/null", "python3 m.py >/dev/null 2>&1", "python3 m.py > /dev/null 2>&1"]) expect(stderrDiscarded(c), c).toBe(true);
    for (const c of ["python3 m.py", "python3 m.py 2>&1", "python3 m.py >/dev/null", "python3 m.py 2>&1 >/dev/null", "python3 m2>/dev/null.py"]) expect(stderrDiscarded(c), c).toBe(false);
  });
  it("an exit 0 that pytest's report contradicts is a test failure; pytest exiting 0 without the report asked for too", () => {
    const junit = { tests: 2, passed: 1, failures: 1, errors: 0, skipped: 0, failed: ["t::test_x"] };
    expect(categorize({ ...base, argv: ["python3", "run.py"], tool: "pytest", exitCode: 0, junit, junitAsked: true })).toEqual({
      category: "test",
      evidence: "1 failed, 0 errors, 1 passed, 0 skipped of 2; first: t::test_x (the command exited 0; pytest's report says its tests failed)",
    });
    expect(categorize({ ...base, argv: ["pytest", "-q"], exitCode: 0, junit: null, junitAsked: true })?.evidence).toMatch(/^pytest exited 0 without the JUnit report/);
    // options that only print are neither
    expect(categorize({ ...base, argv: ["pytest", "--version"], exitCode: 0, junit: null, junitAsked: true })).toBeNull();
    expect(categorize({ ...base, argv: ["pytest", "-q"], exitCode: 0, junit: { ...junit, failures: 0, passed: 2, failed: [] }, junitAsked: true })).toBeNull();
  });
});

describe("parseJunit", () => {
  it("reads pytest's totals and failing names exactly", () => {
    const xml = `<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="2" skipped="1" tests="7" time="0.05">
<testcase classname="tests.test_x" name="test_ok" time="0.001" />
<testcase classname="tests.test_x" name="test_bad" time="0.001"><failure message="assert 1 == 2">x &lt; y</failure></testcase>
<testcase classname="tests.test_x" name="test_bad2"><failure message="boom" /></testcase>
<testcase classname="tests.test_x" name="test_err"><error message="fixture">e</error></testcase>
<testcase classname="tests.test_x" name="test_skip"><skipped message="no" /></testcase>
</testsuite></testsuites>`;
    expect(parseJunit(xml)).toEqual({ tests: 7, passed: 3, failures: 2, errors: 1, skipped: 1, failed: ["tests.test_x::test_bad", "tests.test_x::test_bad2", "tests.test_x::test_err"] });
  });
  it("lists the cases that passed (not the skipped, not the failed)", () => {
    const xml = `<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1"><testcase classname="a" name="ok" /><testcase classname="a" name="bad"><failure /></testcase><testcase classname="a" name="skip"><skipped /></testcase></testsuite></testsuites>`;
    expect([...parseJunitReport(xml).passed]).toEqual(["a::ok"]);
  });
  it("refuses what is not a report", () => {
    expect(() => parseJunit("<html/>")).toThrow();
    expect(() => parseJunit('<testsuite tests="-1"/>')).toThrow();
  });
});

describe("FailFastState", () => {
  let policy: Policy;
  beforeAll(async () => {
    policy = await loadPolicy(path.join(ROOT, "policies", "default.yaml"));
  });
  const att = (category: "test" | "import" | "unknown" | "policy" | "syntax", source: "pytest" | "python" | "pylint" | "policy" = "pytest") => ({
    at: "t",
    category,
    source,
    action: "pytest",
    result: "FAIL exit 1",
    evidence: "e",
  });

  it("has SKILLS.md's defaults and makes failFast real", () => {
    expect(policy.failFast.maxAttempts).toEqual({ syntax: 3, import: 2, type: 3, test: 3, runtime: 2, database: 1, iteration: 3, policy: 3 });
    expect(policy.failFast.consecutive).toBe(3);
    expect(policy.failFast.countPolicyRefusals).toBe(false);
  });
  it("escalates test on the third, import on the second", () => {
    const s = new FailFastState();
    expect(s.fail(policy.failFast, att("test")).reached).toBeNull();
    expect(s.fail(policy.failFast, att("test")).reached).toBeNull();
    const third = s.fail(policy.failFast, att("test"));
    expect(third.reached).toMatchObject({ scope: "category", category: "test", count: 3, limit: 3 });
    expect(third.reached!.attempts.map((a) => a.n)).toEqual([1, 2, 3]);
    const t = new FailFastState();
    expect(t.fail(policy.failFast, att("import", "python")).reached).toBeNull();
    expect(t.fail(policy.failFast, att("import", "python")).reached).toMatchObject({ category: "import", count: 2 });
  });
  it("a success of another tool resets nothing; the gateway's and the checkpoint's reset their own", () => {
    const s = new FailFastState();
    s.fail(policy.failFast, att("test"));
    s.fail(policy.failFast, att("test"));
    expect(s.succeedExec({ source: "mypy", action: "mypy .", tests: null })).toEqual([]);
    expect(s.succeed("checkpoint")).toEqual([]);
    expect(s.fail(policy.failFast, att("test")).reached).toMatchObject({ count: 3 });
  });

  const report = (counts: Partial<TestCounts>, passed: string[]) => ({
    counts: { tests: 1, passed: 1, failures: 0, errors: 0, skipped: 0, failed: [], ...counts },
    passed: new Set(passed),
  });
  const failing = (action: string, tests?: string[]) => ({ at: "t", category: "test" as const, source: "pytest" as const, action, result: "FAIL exit 1", evidence: "e", ...(tests ? { tests } : {}) });

  it("a pytest success resets only when it shows the failing tests passing: not --version, not a subset without them", () => {
    const s = new FailFastState();
    s.fail(policy.failFast, failing("pytest -q tests/test_b.py", ["tests.test_b::test_b"]));
    // pytest --version: no report
    expect(s.succeedExec({ source: "pytest", action: "pytest --version", tests: null })).toEqual([]);
    // the same command exiting 0 without a report (os._exit(0)): not a pass
    expect(s.succeedExec({ source: "pytest", action: "pytest -q tests/test_b.py", tests: null })).toEqual([]);
    // a passing subset that leaves the failing test out
    expect(s.succeedExec({ source: "pytest", action: "pytest -q tests/test_a.py", tests: report({}, ["tests.test_a::test_a"]) })).toEqual([]);
    expect(s.snapshot()).toEqual({ test: 1 });
    // the full suite with it passing
    expect(s.succeedExec({ source: "pytest", action: "pytest -q", tests: report({ tests: 2, passed: 2 }, ["tests.test_a::test_a", "tests.test_b::test_b"]) })).toEqual(["test"]);
    expect(s.streak).toEqual([]);
  });

  it("every attempt on the counter must be answered; a collection error is answered by its module's tests", () => {
    const s = new FailFastState();
    s.fail(policy.failFast, failing("pytest tests/test_b.py", ["tests.test_b::test_b"]));
    s.fail(policy.failFast, failing("pytest tests/test_c.py", ["tests.test_c::test_c"]));
    expect(s.succeedExec({ source: "pytest", action: "pytest tests/test_b.py", tests: report({}, ["tests.test_b::test_b"]) })).toEqual([]);
    expect(s.succeedExec({ source: "pytest", action: "pytest", tests: report({ tests: 2, passed: 2 }, ["tests.test_b::test_b", "tests.test_c::test_c"]) })).toEqual(["test"]);
    const m = new FailFastState();
    m.fail(policy.failFast, { ...failing("pytest", ["::tests.test_m"]), category: "import" });
    expect(m.succeedExec({ source: "pytest", action: "pytest tests/test_x.py", tests: report({}, ["tests.test_x::test_1"]) })).toEqual([]);
    expect(m.succeedExec({ source: "pytest", action: "pytest tests/test_m.py", tests: report({}, ["tests.test_m::test_1"]) })).toEqual(["import"]);
  });

  it("a python failure is answered by the same command succeeding, not by another script", () => {
    const s = new FailFastState();
    s.fail(policy.failFast, { ...att("import", "python"), action: "python3 main.py" });
    expect(s.succeedExec({ source: "python", action: "python3 other.py", tests: null })).toEqual([]);
    expect(s.succeedExec({ source: "python", action: "python3 main.py", tests: null })).toEqual(["import"]);
  });

  it("three consecutive failures of different kinds escalate", () => {
    const s = new FailFastState();
    s.fail(policy.failFast, att("syntax", "pylint"));
    s.fail(policy.failFast, att("test"));
    expect(s.fail(policy.failFast, att("syntax", "python")).reached).toMatchObject({ scope: "consecutive", count: 3, limit: 3 });
  });
  it("unknown and (by default) policy refusals are not counted", () => {
    const s = new FailFastState();
    for (let i = 0; i < 5; i++) expect(s.fail(policy.failFast, att("unknown")).counted).toBe(false);
    for (let i = 0; i < 5; i++) expect(s.fail(policy.failFast, att("policy", "policy")).counted).toBe(false);
    expect(s.streak).toEqual([]);
    const strict = { ...policy.failFast, countPolicyRefusals: true };
    s.fail(strict, att("policy", "policy"));
    s.fail(strict, att("policy", "policy"));
    expect(s.fail(strict, att("policy", "policy")).reached?.category).toBe("policy");
  });
  it("renders SKILLS.md's Human Escalation Log", () => {
    const s = new FailFastState();
    let reached = null;
    for (let i = 0; i < 3; i++) reached = s.fail(policy.failFast, { ...att("test"), evidence: "1 failed; first: t::test_x" }).reached;
    const lines = escalationReport({
      phase: { id: "ph_0", name: "1.2", mode: "test", project: "/p" },
      reached: reached!,
      filesModified: null,
      lastError: "E assert 1 == 2\nFAILED t::test_x",
      tests: { tests: 2, passed: 1, failures: 1, errors: 0, skipped: 0, failed: ["t::test_x"] },
      at: "2026-01-01 00:00:00",
    });
    expect(lines[0]).toBe("[ESCALATION] Phase 1.2 (ph_0) failed after 3 attempts");
    expect(lines).toContain("Error Category: Test");
    expect(lines).toContain("Last Error:");
    expect(lines).toContain("  E assert 1 == 2");
    expect(lines.filter((l) => /^ {2}\d\. /.test(l))).toHaveLength(3);
    expect(lines.find((l) => l.startsWith("Recommendation:"))).toMatch(/t::test_x.*same error came back 3 times/);
  });
});
