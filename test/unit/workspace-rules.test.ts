/**
 * judgeChangeSet against the default policy (SKILLS.md §1): the counting rule
 * with coupling, protected paths, the size cap, mass changes, the
 * failed-iteration decision, and the Python compile check (run for real
 * with the host's python3 on a temporary directory).
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { combine, loadPolicy, parsePolicy, type Policy, type WorkspacePolicy } from "../../src/policy/index.js";
import type { ChangeSet, FileChange } from "../../src/workspace/changes.js";
import {
  COUPLING_ANALYSIS_MAX_FILES,
  MAX_FAILURES_PER_RULE,
  compileCheckArgv,
  countFiles,
  judgeChangeSet,
  parseCompileOutput,
  pythonFilesToCompile,
  withCompileResults,
  type JudgeContext,
} from "../../src/workspace/rules.js";
import { DEFAULT_POLICY_FILE } from "../../src/policy/index.js";
import { readFileSync } from "node:fs";

let policy: Policy;
let ws: WorkspacePolicy;
beforeAll(async () => {
  policy = await loadPolicy();
  ws = policy.workspace;
});

const MiB = 1024 * 1024;
const mod = (p: string, size = 100): FileChange => ({ kind: "modify", path: p, isDir: false, sizeBytes: size });
const add = (p: string, size = 100): FileChange => ({ kind: "create", path: p, isDir: false, sizeBytes: size });
const del = (p: string): FileChange => ({ kind: "delete", path: p, isDir: false, sizeBytes: 0 });
const ren = (from: string, p: string): FileChange => ({ kind: "rename", from, path: p, isDir: false, sizeBytes: 100 });
const set = (...changes: FileChange[]): ChangeSet => ({ changes });
const ctx = (over: Partial<JudgeContext> = {}): JudgeContext => ({ policy: ws, allowMainPy: false, approvedPaths: new Set(), ...over });
const judge = (s: ChangeSet, over: Partial<JudgeContext> = {}) => judgeChangeSet(s, ctx(over));
const rules = (j: { failures: Array<{ rule: string }> }) => j.failures.map((f) => f.rule);

describe("the atomic modification rule (at most 2 files unless directly coupled)", () => {
  it("accepts one or two files", () => {
    expect(judge(set(mod("services/a.py")))).toEqual({ decision: "accept", failures: [] });
    expect(judge(set(mod("services/a.py"), add("services/b.py")))).toEqual({ decision: "accept", failures: [] });
  });

  it("rejects 3 unrelated files, naming the rule, the clause, the files and what to do", () => {
    const j = judge(set(mod("services/risk_manager.py"), mod("services/order_router.py"), mod("shared/utils.py")));
    expect(j.decision).toBe("reject");
    const f = j.failures.find((x) => x.rule === "workspace.atomic-modification")!;
    expect(f.clause).toBe("SKILLS.md §1 Atomic Modification Rule: maximum 2 files per iteration unless directly coupled");
    expect(f.message).toMatch(/^3 files changed, at most 2 per iteration unless directly coupled \(not coupled to any other changed file: services\/risk_manager\.py, services\/order_router\.py, shared\/utils\.py\)/);
    expect(f.message).toMatch(/split the work into iterations and checkpoint after each$/);
  });

  it("accepts a module and its test (SKILLS.md's example), also with a config file of the service", () => {
    expect(judge(set(mod("services/risk_manager.py"), add("tests/test_risk_manager.py"))).decision).toBe("accept");
    const three = set(mod("services/risk_manager.py"), add("tests/test_risk_manager.py"), mod("config/risk_manager.yaml"));
    expect(judge(three)).toEqual({ decision: "accept", failures: [] });
    expect(countFiles(three, ws).groups).toEqual([{ anchor: "services/risk_manager.py", coupled: ["tests/test_risk_manager.py", "config/risk_manager.yaml"] }]);
  });

  it("accepts a model with its schema and migration", () => {
    const s = set(mod("services/models/order.py"), mod("services/schemas/order.py"), add("migrations/0004_create_order_table.sql"));
    expect(judge(s)).toEqual({ decision: "accept", failures: [] });
    expect(countFiles(s, ws).groups).toEqual([{ anchor: "services/models/order.py", coupled: ["services/schemas/order.py", "migrations/0004_create_order_table.sql"] }]);
    // one more, unrelated file is a second anchor; two more are too many
    expect(judge({ changes: [...s.changes, mod("README.md")] }).decision).toBe("accept");
    expect(judge({ changes: [...s.changes, mod("README.md"), mod("setup.cfg")] }).decision).toBe("reject");
  });

  it("counts anchors, not chains: module+test plus one more module passes, three modules with their tests do not", () => {
    expect(judge(set(mod("services/a.py"), add("tests/test_a.py"), mod("services/b.py"))).decision).toBe("accept");
    const six = set(mod("services/a.py"), add("tests/test_a.py"), mod("services/b.py"), add("tests/test_b.py"), mod("services/c.py"), add("tests/test_c.py"));
    const j = judge(six);
    expect(j.decision).toBe("reject");
    expect(j.failures[0]!.message).toMatch(/^6 files changed, .*the couplings do not reduce them to 2 changes/);
    expect(judge(set(mod("services/a.py"), add("tests/test_a.py"), mod("services/b.py"), add("tests/test_b.py"))).decision).toBe("accept");
  });

  it("finds the anchors a greedy choice would miss", () => {
    // services/x.py couples to its test and its config; the test of y to y. The file with most couplings
    // (x) is an anchor, but so must y be: 2 anchors cover all.
    const s = set(mod("services/x.py"), add("tests/test_x.py"), add("config/x.yaml"), mod("services/y.py"), add("tests/test_y.py"));
    expect(judge(s).decision).toBe("accept");
  });

  it("does not count the SKILLS.md 'not considered coupled' pairs as coupled", () => {
    for (const [a, b] of [
      ["services/risk_manager.py", "services/order_router.py"],
      ["services/risk_manager.py", "shared/utils.py"],
      ["tests/test_risk_manager.py", "tests/test_order_router.py"],
    ] as const) {
      const j = judge(set(mod(a), mod(b), mod("services/third.py")));
      expect({ a, b, d: j.decision }).toEqual({ a, b, d: "reject" });
    }
  });

  it("counts a rename once, by its new path; directories do not count", () => {
    const s = set(ren("services/old_name.py", "services/new_name.py"), mod("services/b.py"), { kind: "create", path: "services/pkg", isDir: true, sizeBytes: 0 });
    expect(countFiles(s, ws).files).toEqual(["services/new_name.py", "services/b.py"]);
    expect(judge(s)).toEqual({ decision: "accept", failures: [] });
    // a module renamed together with its test still couples by the new names
    expect(judge(set(ren("services/a.py", "services/b.py"), ren("tests/test_a.py", "tests/test_b.py"), mod("services/c.py"))).decision).toBe("accept");
  });

  it("counts a mode-only change and a delete as files", () => {
    const j = judge(set({ ...mod("scripts/run.py"), modeOnly: true, mode: 0o755 }, del("services/old.py"), mod("services/c.py")));
    expect(rules(j)).toEqual(["workspace.atomic-modification"]);
  });

  it(`does not analyse coupling past ${COUPLING_ANALYSIS_MAX_FILES} files, and says so`, () => {
    const many = Array.from({ length: COUPLING_ANALYSIS_MAX_FILES + 1 }, (_, i) => add(`d${i}/m${i}.py`));
    const j = judge({ changes: many });
    expect(j.failures.find((f) => f.rule === "workspace.atomic-modification")!.message).toMatch(/coupling is not considered past 200 files/);
  });

  it("a phase policy with one file per iteration still lets a module and its test through", async () => {
    const strict = combine(policy, await loadPolicy(path.resolve(import.meta.dirname, "../../policies/examples/strict.yaml")));
    const c = ctx({ policy: strict.workspace });
    expect(judgeChangeSet(set(mod("services/a.py"), add("tests/test_a.py")), c).decision).toBe("accept");
    expect(judgeChangeSet(set(mod("services/a.py"), mod("services/b.py")), c).decision).toBe("reject");
    // the default couples a service with its config; the strict phase policy does not
    expect(judgeChangeSet(set(mod("services/a.py"), mod("config/a.yaml")), c).decision).toBe("reject");
  });
});

describe("protected paths", () => {
  it.each([".env", "config/.env", ".env.production"])("rejects any change to %s (hidden), with no approval possible", (p) => {
    for (const c of [mod(p), add(p), del(p), ren(p, "x.txt"), ren("x.txt", p)]) {
      const j = judge(set(c), { approvedPaths: new Set([p, "x.txt"]) });
      expect(j.decision).toBe("reject");
      expect(j.failures[0]).toMatchObject({ rule: "workspace.protected.credentials", path: p, final: true });
      expect(j.failures[0]!.message).toMatch(/is hidden from the sandbox.*edit \.env\.example instead/);
    }
  });

  it("accepts .env.example", () => {
    expect(judge(set(mod(".env.example"))).decision).toBe("accept");
  });

  it.each([".git/config", ".git/hooks/pre-commit", ".git/index", ".envrc", "build_audit.log"])("rejects a change to %s (read-only)", (p) => {
    const j = judge(set(p === ".git/hooks/pre-commit" ? add(p) : mod(p)));
    expect(j.decision).toBe("reject");
    expect(j.failures[0]!.message).toMatch(/is read-only in the sandbox/);
    expect(j.failures[0]!.final).toBe(true);
  });

  it("rejects deleting or renaming a file in shared/, asks for an edit, and a human's approval of the path lifts both", () => {
    const d = judge(set(del("shared/models.py")));
    expect(d.decision).toBe("reject");
    expect(d.failures[0]).toMatchObject({ rule: "workspace.protected.shared", path: "shared/models.py", final: false });
    expect(d.failures[0]!.message).toMatch(/^deleting shared\/models\.py: refused; shared\/ is used by every service; files there are not deleted or renamed, and edits wait for a human$/);
    expect(judge(set(ren("shared/utils.py", "services/utils.py"))).failures[0]!.message).toMatch(/^renaming shared\/utils\.py \(rename shared\/utils\.py → services\/utils\.py\): refused/);
    expect(judge(set(ren("services/x.py", "shared/x.py"))).decision).toBe("reject");
    const m = judge(set(mod("shared/models.py")));
    expect(m.decision).toBe("ask");
    expect(m.failures[0]!.message).toMatch(/it waits for a human's approval/);
    expect(judge(set(del("shared/models.py")), { approvedPaths: new Set(["shared/models.py"]) }).decision).toBe("accept");
    expect(judge(set(mod("shared/models.py")), { approvedPaths: new Set(["shared/models.py"]) }).decision).toBe("accept");
    // approval is for the exact path
    expect(judge(set(mod("shared/models.py")), { approvedPaths: new Set(["shared/schemas.py"]) }).decision).toBe("ask");
  });

  it("rejects main.py without the phase's permission and accepts it with --allow main.py", () => {
    const j = judge(set(mod("main.py")));
    expect(j.decision).toBe("reject");
    expect(j.failures[0]).toMatchObject({ rule: "workspace.protected.main-py", clause: expect.stringMatching(/main\.py without Phase specification/) });
    expect(j.failures[0]!.message).toMatch(/a phase started with --allow main\.py may change it/);
    expect(judge(set(mod("main.py")), { allowMainPy: true })).toEqual({ decision: "accept", failures: [] });
    // the permission is not an approval of anything else
    expect(judge(set(mod("main.py"), mod(".env")), { allowMainPy: true }).decision).toBe("reject");
  });

  it("applies to directories too: deleting shared/ or creating .git/hooks", () => {
    const j = judge(set({ kind: "delete", path: "shared", isDir: true, sizeBytes: 0 }));
    expect(rules(j)).toEqual(expect.arrayContaining(["workspace.protected.shared", "workspace.mass-change"]));
    expect(judge(set({ kind: "create", path: ".git/hooks", isDir: true, sizeBytes: 0 })).decision).toBe("reject");
  });
});

describe("size, mass change, bad paths", () => {
  it("asks for a 20 MB file and accepts it once the path is approved; 10 MiB exactly passes", () => {
    const j = judge(set(add("data/prices.parquet", 20 * MiB)));
    expect(j.decision).toBe("ask");
    expect(j.failures[0]).toMatchObject({ rule: "workspace.max-file-size", path: "data/prices.parquet", decision: "ask" });
    expect(j.failures[0]!.message).toMatch(/is 20971520 bytes, over the 10485760-byte limit: .*the iteration waits in the approval queue \(`sandboxd approvals ls`\)/);
    expect(judge(set(add("data/prices.parquet", 20 * MiB)), { approvedPaths: new Set(["data/prices.parquet"]) }).decision).toBe("accept");
    expect(judge(set(add("data/prices.parquet", 10 * MiB))).decision).toBe("accept");
    expect(judge(set(del("data/big.bin"))).decision).toBe("accept");
  });

  it("rejects deleting or renaming a whole directory", () => {
    const d = judge(set({ kind: "delete", path: "services/legacy", isDir: true, sizeBytes: 0 }));
    expect(d.failures).toEqual([expect.objectContaining({ rule: "workspace.mass-change", decision: "reject", path: "services/legacy" })]);
    expect(d.failures[0]!.message).toMatch(/^deleting the directory services\/legacy is a change to a whole directory: change a directory a few files at a time/);
    const r = judge(set({ kind: "rename", from: "services/a", path: "services/b", isDir: true, sizeBytes: 0 }));
    expect(r.failures[0]!.message).toMatch(/^renaming the directory services\/a → services\/b/);
  });

  it("names the topmost directory with too many changed files, once", () => {
    const s = set(...Array.from({ length: 7 }, (_, i) => mod(`services/deep/m${i}.py`)));
    const j = judge(s);
    expect(j.failures.filter((f) => f.rule === "workspace.mass-change")).toEqual([
      expect.objectContaining({ path: "services", message: expect.stringMatching(/^7 files changed under services\/, more than 5/) }),
    ]);
  });

  it("bounds the failures of a 50,000-file change set and still rejects it", () => {
    const big = { changes: Array.from({ length: 50_000 }, (_, i) => add(`gen/d${i % 100}/f${i}.py`, 11 * MiB)) };
    const t0 = performance.now();
    const j = judge(big);
    const ms = performance.now() - t0;
    expect(j.decision).toBe("reject");
    expect(j.failures.length).toBeLessThanOrEqual(3 * (MAX_FAILURES_PER_RULE + 1));
    expect(j.failures.find((f) => f.rule === "workspace.max-file-size" && f.path === undefined)!.message).toMatch(/^and 49980 more paths under rule workspace\.max-file-size/);
    expect(ms).toBeLessThan(2000);
  });

  it("rejects paths the layer should never produce", () => {
    for (const p of ["/etc/passwd", "../outside.py", "a/../../b", "a\0b", "", "./a.py"]) {
      const j = judge(set(mod(p)));
      expect({ p, d: j.decision, r: j.failures[0]?.rule }).toEqual({ p, d: "reject", r: "workspace.path" });
    }
  });

  it("escapes control characters in the paths it names", () => {
    const j = judge(set(del("shared/a\nb.py")));
    expect(j.failures[0]!.message).not.toContain("\n");
    expect(j.failures[0]!.message).toContain("shared/a\\nb.py");
    // and a newline in a path does not slip past a protected glob
    expect(judge(set(add(".git/hooks/x\ny"))).decision).toBe("reject");
    expect(judge(set(mod("config/\n/.env"))).failures[0]!.rule).toBe("workspace.protected.credentials");
  });
});

describe("what the layer's walk left unread, set-ID bits", () => {
  it("paths over the walk's cap and a truncated walk are refused for good, even with failedIteration: ask", () => {
    const askWs = { ...ws, failedIteration: { ...ws.failedIteration, decision: "ask" as const } };
    const j = judgeChangeSet({ changes: [add("a.py")], limits: { tooLong: ["deep/ddd"], notUtf8: ["x/\ufffd.py"], truncated: true } }, { ...ctx(), policy: askWs });
    expect(j.decision).toBe("reject");
    expect(j.failures).toContainEqual(expect.objectContaining({ rule: "workspace.path", path: "deep/ddd", final: true }));
    expect(j.failures).toContainEqual(expect.objectContaining({ rule: "workspace.change-limit", final: true }));
    expect(j.failures).toContainEqual(expect.objectContaining({ rule: "workspace.path", path: "x/\ufffd.py", final: true }));
  });

  it("a set-user-ID or set-group-ID file (created or chmod'ed) is refused for good; a setgid folder is not", () => {
    const j = judgeChangeSet(
      set({ ...add("run.sh"), mode: 0o4755 }, { ...mod("calc.py"), mode: 0o2755, modeOnly: true }, { kind: "create", path: "shared_dir", isDir: true, sizeBytes: 0, mode: 0o2775 }),
      ctx(),
    );
    expect(j.failures.filter((f) => f.rule === "workspace.setuid").map((f) => [f.path, f.final])).toEqual([
      ["run.sh", true],
      ["calc.py", true],
    ]);
    expect(judgeChangeSet(set({ ...add("run.sh"), mode: 0o755 }), ctx()).decision).toBe("accept");
  });
});

describe("the failed-iteration decision", () => {
  let askPolicy: WorkspacePolicy;
  beforeAll(() => {
    const text = readFileSync(DEFAULT_POLICY_FILE, "utf8").replace("decision: reject            # ask:", "decision: ask            # ask:");
    askPolicy = parsePolicy(text, "ask.yaml").workspace;
  });

  it("ask: a failing iteration waits for a human instead of being discarded", () => {
    const j = judgeChangeSet(set(mod("a.py"), mod("b.py"), mod("c.py")), ctx({ policy: askPolicy }));
    expect(j.decision).toBe("ask");
    expect(judgeChangeSet(set(del("shared/models.py")), ctx({ policy: askPolicy })).decision).toBe("ask");
  });

  it("…but hidden and read-only paths are refused whatever it says", () => {
    expect(judgeChangeSet(set(mod(".env")), ctx({ policy: askPolicy })).decision).toBe("reject");
    expect(judgeChangeSet(set(mod(".git/config")), ctx({ policy: askPolicy })).decision).toBe("reject");
    expect(judgeChangeSet(set(mod("main.py")), ctx({ policy: askPolicy })).decision).toBe("reject");
  });

  it("the strictest failure decides", () => {
    const j = judge(set(mod("shared/models.py"), add("big.bin", 20 * MiB), mod(".git/config")));
    expect(j.failures.map((f) => [f.rule, f.decision])).toEqual([
      ["workspace.protected.shared", "ask"],
      ["workspace.protected.git", "reject"],
      ["workspace.max-file-size", "ask"],
      ["workspace.atomic-modification", "reject"],
    ]);
    expect(j.decision).toBe("reject");
  });
});

describe("the Python compile check", () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), "ws-compile-"));
    mkdirSync(path.join(dir, "services"));
    writeFileSync(path.join(dir, "services/ok.py"), "def f(x: int) -> int:\n    return x + 1\n");
    writeFileSync(path.join(dir, "services/bad.py"), "def f(:\n    pass\n");
    writeFileSync(path.join(dir, "services/nul.py"), "x = 1\0\n");
    writeFileSync(path.join(dir, "-dash.py"), "x = 1\n");
    writeFileSync(path.join(dir, "services/latin.py"), Buffer.from("# -*- coding: latin-1 -*-\nname = '\xe9'\n", "latin1"));
    return () => rmSync(dir, { recursive: true, force: true });
  });

  it("picks the changed .py files that have content to compile", () => {
    const s = set(mod("services/ok.py"), del("services/gone.py"), { ...mod("scripts/x.py"), modeOnly: true }, add("README.md"), ren("a.py", "services/moved.py"));
    expect(pythonFilesToCompile(s, ws)).toEqual(["services/ok.py", "services/moved.py"]);
  });

  it("compiles each file with python3 (no bytecode written) and turns errors into failures with the compiler's message", () => {
    const paths = ["services/ok.py", "services/bad.py", "services/nul.py", "-dash.py", "services/latin.py", "services/missing.py"];
    const argv = compileCheckArgv(paths);
    // by its full path: the sandbox's PATH holds the package disk, which the agent writes
    expect(argv.slice(0, 4)).toEqual(["/usr/bin/python3", "-I", "-B", "-c"]);
    const out = execFileSync(argv[0]!, argv.slice(1), { cwd: dir, encoding: "utf8" });
    const failures = parseCompileOutput(out, paths, ws);
    expect(failures.map((f) => f.path)).toEqual(["services/bad.py", "services/nul.py", "services/missing.py"]);
    expect(failures[0]).toMatchObject({ rule: "workspace.python-compile", decision: "reject", final: true, clause: "SKILLS.md §1 Pre-Write Validation: check for Python syntax errors" });
    expect(failures[0]!.message).toMatch(/^services\/bad\.py:1:\d+: SyntaxError: .+ in `def f\(:`; every changed Python file must compile; fix the error/);
    expect(failures[1]!.message).toMatch(/^services\/nul\.py: (SyntaxError|ValueError): .*null bytes/);
    expect(failures[2]!.message).toMatch(/^services\/missing\.py: FileNotFoundError: /);
    expect(execFileSync("find", [dir, "-name", "*.pyc"], { encoding: "utf8" })).toBe("");
  });

  it("fails every file when the check gives no usable output", () => {
    expect(parseCompileOutput("Killed\n", ["a.py", "b.py"], ws).map((f) => f.message)).toEqual([
      expect.stringMatching(/^a\.py: the compile check gave no result/),
      expect.stringMatching(/^b\.py: the compile check gave no result/),
    ]);
    expect(parseCompileOutput('{"sandboxdCompile": 1, "results": [{"path": "./a.py", "ok": true}]}\n', ["a.py", "b.py"], ws).map((f) => f.path)).toEqual(["b.py"]);
  });

  it("refuses to build argv for a path outside the project", () => {
    expect(() => compileCheckArgv(["../x.py"])).toThrow(/not a project-relative path/);
  });

  it("merges into the judgment: a syntax error rejects even an otherwise accepted iteration", () => {
    const j = judge(set(mod("services/bad.py")));
    expect(j.decision).toBe("accept");
    const merged = withCompileResults(j, parseCompileOutput("", ["services/bad.py"], ws));
    expect(merged.decision).toBe("reject");
    expect(rules(merged)).toEqual(["workspace.python-compile"]);
  });
});
