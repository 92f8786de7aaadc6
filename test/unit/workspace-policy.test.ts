/**
 * The policy's workspace section (SKILLS.md §1): its path language, the
 * examples checked at load, every problem listed with its path, and the
 * narrowing by a phase policy.
 */
import { readFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import { DEFAULT_POLICY_FILE, combine, loadPolicy, parsePolicy, type Policy } from "../../src/policy/index.js";
import { compileCoupling, compileGlob, compileProtection, compileWorkspace, couples, protects, protectsName } from "../../src/policy/workspace.js";

const ROOT = path.resolve(import.meta.dirname, "../..");
const DEFAULT_TEXT = readFileSync(DEFAULT_POLICY_FILE, "utf8");

let policy: Policy;
beforeAll(async () => {
  policy = await loadPolicy();
});

function problemsOf(fn: () => unknown): string[] {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(SandboxdError);
    expect((e as SandboxdError).code).toBe("SBX_ERR_POLICY_INVALID");
    return ((e as SandboxdError).details as { problems: string[] }).problems;
  }
  throw new Error("the policy was accepted");
}

/** default.yaml with its workspace section edited */
function variant(edit: (text: string) => string): string {
  const out = edit(DEFAULT_TEXT);
  expect(out).not.toBe(DEFAULT_TEXT);
  return out;
}

const coupledUnder = (p: Policy, a: string, b: string) =>
  compileWorkspace(p.workspace).couplingLayers.every((layer) => layer.some((c) => couples(c, a, b)));

describe("globs", () => {
  it.each([
    ["**/.env", [".env", "config/.env"], ["env", ".env.example", "x.env"]],
    ["**/.env.*", [".env.production", "a/b/.env.local"], [".env", "a.env.x"]],
    ["shared/**", ["shared", "shared/models.py", "shared/a/b/c.py"], ["sharedx", "services/shared/x.py", "x/shared"]],
    ["**/.git/**", [".git", ".git/config", ".git/hooks/pre-commit", "vendor/.git/HEAD"], [".gitignore", ".github/x"]],
    ["main.py", ["main.py"], ["main.pyc", "services/main.py", "xmain.py"]],
    ["**/*.py", ["a.py", "a/b/.hidden.py"], ["a.pyc", "a.py/x"]],
    ["a/?.py", ["a/b.py"], ["a/bc.py", "a/.py"]],
  ])("%s", (glob, yes, no) => {
    const re = compileGlob(glob);
    for (const p of yes) expect({ p, m: re.test(p) }).toEqual({ p, m: true });
    for (const p of no) expect({ p, m: re.test(p) }).toEqual({ p, m: false });
  });

  it.each([
    ["/etc/passwd", /project-relative/],
    ["a//b", /empty segment/],
    ["../x", /"\.\." segment/],
    ["a/**x", /whole segment/],
    ["a/[ab]", /reserved/],
    ["a/{x}", /placeholders .* belong in coupling templates/],
    ["**/**/x", /two \*\* segments/],
  ])("refuses %s", (glob, why) => {
    expect(() => compileGlob(glob)).toThrow(why);
  });
});

describe("coupling templates", () => {
  const pattern = (a: string, b: string) =>
    compileCoupling({ id: "t.p", clause: "SKILLS.md §1", justification: "a test pattern", between: [a, b], couples: [["x", "y"]] });

  it("binds a placeholder named on both sides to the same value, in either order of the pair", () => {
    const c = pattern("**/{module}.py", "tests/**/test_{module}.py");
    expect(couples(c, "services/risk_manager.py", "tests/test_risk_manager.py")).toBe(true);
    expect(couples(c, "tests/test_risk_manager.py", "services/risk_manager.py")).toBe(true);
    expect(couples(c, "services/risk_manager.py", "tests/test_order_router.py")).toBe(false);
    expect(couples(c, "services/risk_manager.py", "services/risk_manager.py")).toBe(false);
  });

  it("{dir**} stands for leading directories, the same on both sides (also none)", () => {
    const c = pattern("{dir**}/models.py", "{dir**}/schemas.py");
    expect(couples(c, "models.py", "schemas.py")).toBe(true);
    expect(couples(c, "a/b/models.py", "a/b/schemas.py")).toBe(true);
    expect(couples(c, "a/b/models.py", "a/schemas.py")).toBe(false);
  });

  it("tries every binding: ambiguous wildcards around a placeholder still find the match", () => {
    // name must be "order", which a greedy first match of `*_{name}` on the second path would miss
    const c = pattern("migrations/*_{name}_*.sql", "models/{name}.py");
    expect(couples(c, "migrations/0004_create_order_table.sql", "models/order.py")).toBe(true);
    expect(couples(c, "migrations/0004_create_order_table.sql", "models/fill.py")).toBe(false);
  });

  it("refuses a {dir**} that is not a whole leading segment, and a bad name", () => {
    expect(() => pattern("{dir**}models.py", "x")).toThrow(/whole segment/);
    expect(() => pattern("a/{dir**}", "x")).toThrow(/must be followed/);
    expect(() => pattern("{Module}.py", "x")).toThrow(/lower-case word/);
  });
});

describe("default.yaml workspace section", () => {
  it("encodes SKILLS.md §1 with a clause on every rule", () => {
    const ws = policy.workspace;
    expect(ws.atomicModification.maxFilesPerIteration).toBe(2);
    expect(ws.maxFileBytes).toMatchObject({ value: 10 * 1024 * 1024, decision: "ask" });
    expect(ws.failedIteration.decision).toBe("reject");
    expect(ws.checkpointBeforeValidation).toMatchObject({ value: true, programs: ["pytest", "pylint", "mypy", "black", "isort"] });
    expect(ws.disk).toMatchObject({ layerBytes: 2 * 1024 ** 3, tmpBytes: 256 * 1024 ** 2 });
    const clauses = [
      ws.failedIteration,
      ws.atomicModification,
      ws.coupling,
      ws.maxFileBytes,
      ws.massChange,
      ws.pythonCompile,
      ws.checkpointBeforeValidation,
      ws.disk,
      ...ws.protectedPaths,
      ...ws.coupling.layers[0]!,
    ].map((r) => r.clause);
    for (const c of clauses) expect(c).toMatch(/^SKILLS\.md /);
  });

  it("couples SKILLS.md's examples of directly coupled files", () => {
    const yes: Array<[string, string]> = [
      ["services/risk_manager.py", "tests/test_risk_manager.py"],
      ["risk_manager.py", "test_risk_manager.py"],
      ["shared/models.py", "shared/schemas.py"],
      ["shared/models/order.py", "migrations/0004_create_order_table.sql"],
      ["services/risk_manager.py", "config/risk_manager.yaml"],
    ];
    for (const [a, b] of yes) expect({ a, b, coupled: coupledUnder(policy, a, b) }).toEqual({ a, b, coupled: true });
  });

  it("does not couple SKILLS.md's 'not considered coupled' examples", () => {
    const no: Array<[string, string]> = [
      ["services/risk_manager.py", "services/order_router.py"], // multiple unrelated services
      ["services/risk_manager.py", "shared/utils.py"], // a service and shared utilities
      ["tests/test_risk_manager.py", "tests/test_order_router.py"], // test files for different modules
      ["services/risk_manager.py", "tests/test_order_router.py"],
      ["services/risk_manager.py", "config/order_router.yaml"],
    ];
    for (const [a, b] of no) expect({ a, b, coupled: coupledUnder(policy, a, b) }).toEqual({ a, b, coupled: false });
  });

  it("protects .env but not .env.example, .git and its hooks, shared/ and main.py", () => {
    const ws = compileWorkspace(policy.workspace);
    const ruleOf = (p: string) => ws.protections.filter((r) => protects(r, p)).map((r) => r.spec.id);
    expect(ruleOf(".env")).toEqual(["workspace.protected.credentials"]);
    expect(ruleOf(".env.example")).toEqual([]);
    expect(ruleOf(".git/hooks/pre-commit")).toEqual(["workspace.protected.git"]);
    expect(ruleOf("shared/models.py")).toEqual(["workspace.protected.shared"]);
    expect(ruleOf("main.py")).toEqual(["workspace.protected.main-py"]);
    expect(ruleOf("services/risk_manager.py")).toEqual([]);
  });

  it("a rule of name globs only is decided by the name alone, as its path patterns decide at any depth", () => {
    const ws = compileWorkspace(policy.workspace);
    const credentials = ws.protections.find((r) => r.spec.id === "workspace.protected.credentials")!;
    expect(credentials.names).not.toBeNull();
    // rules with a folder in a pattern, or no ** before the name, are tested by path
    expect(ws.protections.find((r) => r.spec.id === "workspace.protected.shared")!.names).toBeNull();
    expect(ws.protections.find((r) => r.spec.id === "workspace.protected.main-py")!.names).toBeNull();
    const names = [".env", ".env.production", ".env.example", ".env.sample", "env.py", "server.key", "keys.py", "a.pem", ".pem", "id_rsa", "id_rsa.pub",
      "id_ed25519", "x.pemx", ".pgpass", ".netrc", ".netrcx", "README.md", "line\nbreak.key", ".ENV", "key"];
    for (const name of names) {
      for (const dir of ["a", "a/b/c", "deep/er/than/that/x"]) {
        expect(protectsName(credentials.names!, name), `${dir}/${name}`).toBe(protects(credentials, `${dir}/${name}`));
      }
    }
    expect(names.filter((n) => protectsName(credentials.names!, n))).toEqual([".env", ".env.production", "server.key", "a.pem", ".pem", "id_rsa", "id_rsa.pub", "id_ed25519", ".pgpass", ".netrc", "line\nbreak.key"]);
    // an exception with a folder in it makes the whole rule a path rule
    expect(compileProtection({ ...credentials.spec, except: ["config/.env.example"] }).names).toBeNull();
    expect(compileProtection({ ...credentials.spec, paths: ["**/.env", "deploy/*.pem"] }).names).toBeNull();
  });
});

describe("loading checks the workspace section whole", () => {
  it("lists every problem with its path: schema errors, failing examples, bad templates, duplicate ids", () => {
    const text = variant((t) =>
      t
        .replace("maxFilesPerIteration: 2", "maxFilesPerIteration: 3")
        .replace("value: 10MiB\n    decision: ask", "value: 20MiB\n    decision: ask")
        // a pattern that no longer couples its own example
        .replace('between: ["**/{module}.py", "tests/**/test_{module}.py"]', 'between: ["**/{module}.py", "tests/**/{module}_test.py"]')
        // a template that does not compile
        .replace('between: ["{dir**}/models.py", "{dir**}/schemas.py"]', 'between: ["{dir**}models.py", "{dir**}/schemas.py"]')
        // a "not coupled" pair the patterns couple
        .replace("- [config/risk_manager.yaml, config/order_router.yaml]", "- [services/risk_manager.py, config/risk_manager.yaml]")
        // a protected rule that misses its own example, and a duplicate id
        .replace("covers: [main.py]", "covers: [main.py, app/main.py]")
        .replace("id: workspace.protected.main-py", "id: workspace.protected.shared")
        .replace("treatment: hidden", "treatment: invisible")
        .replace("layerBytes: 2GiB", "layerBytes: lots"),
    );
    const problems = problemsOf(() => parsePolicy(text, "ws.yaml"));
    const expected = [
      /^ws\.yaml:\d+: workspace\.atomicModification\.maxFilesPerIteration: at most 2 \(SKILLS\.md §1 Atomic Modification Rule\)/,
      /^ws\.yaml:\d+: workspace\.maxFileBytes\.value: at most 10485760/,
      /^ws\.yaml:\d+: workspace\.protectedPaths\[0\]\.treatment: expected hidden, readOnly or/,
      /^ws\.yaml:\d+: workspace\.disk\.layerBytes: expected a size/,
    ];
    for (const re of expected) expect(problems.some((p) => re.test(p)), `${re} in\n${problems.join("\n")}`).toBe(true);
    expect(problems.length).toBe(expected.length);

    // with the schema errors fixed, the examples are checked and every failing one is listed
    const schemaOk = text
      .replace("maxFilesPerIteration: 3", "maxFilesPerIteration: 2")
      .replace("value: 20MiB", "value: 10MiB")
      .replace("treatment: invisible", "treatment: hidden")
      .replace("layerBytes: lots", "layerBytes: 2GiB");
    const second = problemsOf(() => parsePolicy(schemaOk, "ws.yaml"));
    const expected2 = [
      /workspace\.coupling\.patterns\[0\]\.couples\[0\]: pattern workspace\.coupling\.unit-test does not couple services\/risk_manager\.py and tests\/test_risk_manager\.py/,
      /workspace\.coupling\.patterns\[2\]\.between: "\{dir\*\*\}models\.py": \{dir\*\*\} must be a whole segment/,
      /workspace\.coupling\.notCoupled\[5\]: pattern workspace\.coupling\.service-config couples services\/risk_manager\.py and config\/risk_manager\.yaml/,
      /workspace\.protectedPaths\[4\]\.covers\[1\]: rule workspace\.protected\.shared does not cover app\/main\.py/,
      /workspace\.protectedPaths\[4\]\.id: duplicate rule id workspace\.protected\.shared/,
    ];
    for (const re of expected2) expect(second.some((p) => re.test(p)), `${re} in\n${second.join("\n")}`).toBe(true);
    // the unit-test pattern's other examples fail too; each is its own line
    expect(second.filter((p) => p.includes("patterns[0].couples")).length).toBe(3);
    expect(second.length).toBe(expected2.length + 2);
    for (const p of second) expect(p).toMatch(/^ws\.yaml:\d+: workspace\./);
  });

  it("checks the examples even when another section of the file is broken", () => {
    const text = variant((t) => t.replace("covers: [main.py]", "covers: [app/main.py]").replace("syntax: 3", "syntax: 9"));
    const problems = problemsOf(() => parsePolicy(text, "ws.yaml"));
    expect(problems.some((p) => /failFast\.maxAttempts\.syntax/.test(p))).toBe(true);
    expect(problems.some((p) => /rule workspace\.protected\.main-py does not cover app\/main\.py/.test(p))).toBe(true);
  });

  it("refuses approvable on a hidden or read-only rule, and an unknown permission", () => {
    const approvable = variant((t) => t.replace("treatment: readOnly\n      unlessPermission: main.py", "treatment: readOnly\n      approvable: true\n      unlessPermission: main.py"));
    expect(problemsOf(() => parsePolicy(approvable, "ws.yaml"))).toEqual([
      expect.stringMatching(/^ws\.yaml:\d+: workspace\.protectedPaths\[4\]\.approvable: a readOnly path is never changed from the sandbox/),
    ]);
    const permission = variant((t) => t.replace("unlessPermission: main.py", "unlessPermission: main"));
    expect(problemsOf(() => parsePolicy(permission, "ws.yaml"))).toEqual([
      expect.stringMatching(/workspace\.protectedPaths\[4\]\.unlessPermission: Invalid enum value\. Expected 'main\.py'/),
    ]);
  });
});

describe("combine(): a phase policy only narrows the workspace section", () => {
  it("the example strict policy: smaller numbers, stricter decisions, fewer couplings, more protection", async () => {
    const strict = await loadPolicy(path.join(ROOT, "policies/examples/strict.yaml"));
    const c = combine(policy, strict);
    expect(c.workspace.atomicModification.maxFilesPerIteration).toBe(1);
    expect(c.workspace.maxFileBytes).toMatchObject({ value: 1024 * 1024, decision: "reject", approvable: false });
    expect(c.workspace.massChange.maxFilesPerDirectory).toBe(2);
    expect(c.workspace.disk).toMatchObject({ layerBytes: 512 * 1024 ** 2, tmpBytes: 128 * 1024 ** 2 });
    expect(c.workspace.protectedPaths.map((p) => p.id)).toEqual(expect.arrayContaining(["workspace.protected.credentials", "strict.protected.shared"]));
    // the module and its test still couple (both layers say so); the service and its config no longer do
    expect(coupledUnder(c, "services/risk_manager.py", "tests/test_risk_manager.py")).toBe(true);
    expect(coupledUnder(c, "services/risk_manager.py", "config/risk_manager.yaml")).toBe(false);
    expect(coupledUnder(policy, "services/risk_manager.py", "config/risk_manager.yaml")).toBe(true);
    expect(Object.isFrozen(c.workspace)).toBe(true);
  });

  it("a phase policy that tries to widen changes nothing", () => {
    const wide = parsePolicy(
      variant((t) =>
        t
          .replace("maxFilesPerIteration: 2\n    decision: reject", "maxFilesPerIteration: 2\n    decision: ask")
          .replace("decision: reject            # ask:", "decision: ask            # ask:")
          .replace("checkpointBeforeValidation:\n    id: workspace.checkpoint-before-validation\n    clause: \"SKILLS.md §1 Atomic Modification Rule; §2 Code Quality Validation\"\n    value: true", "checkpointBeforeValidation:\n    id: workspace.checkpoint-before-validation\n    clause: \"SKILLS.md §1 Atomic Modification Rule; §2 Code Quality Validation\"\n    value: false")
          .replace("layerBytes: 2GiB", "layerBytes: 20GiB")
          .replace(
            "    notCoupled:\n",
            '      - id: wide.coupling.anything\n        clause: "SKILLS.md §1"\n        justification: an attempt to couple everything\n        between: ["**", "**"]\n        couples: [[a.py, b.py]]\n    notCoupled:\n',
          )
          .replace(/ {4}notCoupled:\n(?: {6}- .*\n)+/, "    notCoupled: []\n"),
      ),
      "wide.yaml",
    );
    expect(coupledUnder(wide, "a.py", "b.py")).toBe(true);
    const c = combine(policy, wide);
    expect(coupledUnder(c, "a.py", "b.py")).toBe(false);
    expect(c.workspace.atomicModification.decision).toBe("reject");
    expect(c.workspace.failedIteration.decision).toBe("reject");
    expect(c.workspace.checkpointBeforeValidation.value).toBe(true);
    expect(c.workspace.disk.layerBytes).toBe(2 * 1024 ** 3);
  });
});
