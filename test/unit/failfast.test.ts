import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { categorize, parseJunit, toolOf } from "../../src/phases/categorize.js";
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
  it("a success of the same tool resets; another tool's does not", () => {
    const s = new FailFastState();
    s.fail(policy.failFast, att("test"));
    s.fail(policy.failFast, att("test"));
    expect(s.succeed("mypy")).toEqual([]);
    expect(s.succeed("pytest")).toEqual(["test"]);
    expect(s.fail(policy.failFast, att("test")).reached).toBeNull();
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
