import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { parse as parseYaml } from "yaml";
import { beforeAll, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import { PHASE_MODES } from "../../src/phases/types.js";
import {
  DEFAULT_POLICY_FILE,
  combine,
  defaultLimits,
  errorCodeFor,
  evaluateCommand,
  initShellParser,
  loadPolicy,
  parsePolicy,
  type Decision,
  type Policy,
} from "../../src/policy/index.js";
import { evaluateArgv } from "../../src/policy/shell.js";

const ROOT = path.resolve(import.meta.dirname, "../..");
const STRICT_FILE = path.join(ROOT, "policies/examples/strict.yaml");

let policy: Policy;
let strict: Policy;

beforeAll(async () => {
  await initShellParser();
  policy = await loadPolicy(DEFAULT_POLICY_FILE);
  strict = await loadPolicy(STRICT_FILE);
});

const argv = (argv: string[]) => ({ argv });
const cmd = (command: string) => ({ command });

/** the problems listed by a rejected policy */
function problemsOf(fn: () => unknown): string[] {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(SandboxdError);
    const err = e as SandboxdError;
    expect(err.code).toBe("SBX_ERR_POLICY_INVALID");
    return (err.details as { problems: string[] }).problems;
  }
  throw new Error("the policy was accepted");
}

/* A small valid policy to vary in the tests below. */
const BASE_LIMITS = `
limits:
  default:
    memoryBytes: 2GiB
    cpus: 1
    pidsLimit: 256
    fileSizeBytes: 10MiB
    tmpfsBytes: 512MiB
    defaultTimeoutMs: 60s
    maxTimeoutMs: 60s
    killGraceMs: 2s
    outputCapBytes: 1MiB
    auditOutputCapBytes: 64KiB
  modes:
    paper: { maxTimeoutMs: 5m }
failFast:
  clause: "SKILLS.md Error Categories"
  maxAttempts: { syntax: 3, import: 2, type: 3, test: 3, runtime: 2, database: 1 }
workspace:
  failedIteration: { id: ws.failed, clause: "SKILLS.md §1", decision: reject, justification: redo the iteration within the rules }
  atomicModification: { id: ws.atomic, clause: "SKILLS.md §1 Atomic Modification Rule", maxFilesPerIteration: 2, decision: reject, justification: at most two files per iteration }
  coupling: { id: ws.coupling, clause: "SKILLS.md §1 Directly coupled", patterns: [], notCoupled: [] }
  maxFileBytes: { id: ws.size, clause: "SKILLS.md Resource Limits", value: 10MiB, decision: ask, approvable: true, justification: big files need approval }
  massChange: { id: ws.mass, clause: "SKILLS.md §1 Forbidden Operations", maxFilesPerDirectory: 5, directoryDelete: reject, directoryRename: reject, decision: reject, justification: a few files at a time }
  protectedPaths: []
  pythonCompile: { id: ws.compile, clause: "SKILLS.md §1 Pre-Write Validation", paths: ["**/*.py"], justification: fix the syntax error and retry }
  checkpointBeforeValidation: { id: ws.checkpoint, clause: "SKILLS.md §1", value: true, programs: [pytest] }
  disk: { id: ws.disk, clause: "SKILLS.md Resource Limits", layerBytes: 2GiB, tmpBytes: 256MiB }
database:
  readOnlyDefault: { id: db.ro, clause: "SKILLS.md §3 Read-Only Default", value: true, testDatabaseEnv: DATABASE_URL_TEST, paperTablePrefix: paper_ }
  statementTimeoutMs: { id: db.timeout, clause: "SKILLS.md §3 Connection Management", value: 30s }
  deniedFunctions: { id: db.fn, clause: "SKILLS.md §3", decision: forbid, functions: [pg_sleep] }
  alphaMarkers: { id: db.alpha, clause: "SKILLS.md §3 Anti-Alpha-Mining", decision: forbid, functions: [corr], joins: [] }
  schemaChanges: { id: db.schema, clause: "SKILLS.md §3 Schema Safety", decision: ask, statements: [drop-table] }
`;

function policyText(rules: string, unknown = "ask", limits = BASE_LIMITS): string {
  return `version: 1\nshell:\n  unknown: ${unknown}\n  rules:\n${rules}\n${limits}`;
}

const RULES_OVERLAP = `
    - id: t.allow-git
      clause: "SKILLS.md §2 Command Whitelist Pattern"
      decision: allow
      justification: git is allowed in this test policy
      pattern: [git]
      match: [git status]
    - id: t.ask-push
      clause: "SKILLS.md §2 Command Whitelist Pattern"
      decision: ask
      justification: pushing needs approval in this test policy
      pattern: [git, push]
      match: [git push origin]
    - id: t.forbid-force
      clause: "SKILLS.md §2 Non-Destructive Command Filtering"
      decision: forbid
      justification: force-pushing is forbidden in this test policy
      pattern: [git, push]
      anyArg: {flag: [-f, --force]}
      match: [git push -f, git push --force=true origin]
      not_match: [git push origin]
`;

describe("the default policy (policies/default.yaml)", () => {
  it("loads, and its own examples pass (they are checked at load)", () => {
    const rules = policy.shell.layers[0]!.rules;
    expect(rules.length).toBeGreaterThanOrEqual(20);
    for (const r of rules) expect(r.clause).toMatch(/^SKILLS\.md (§\d|Security|Resource|Core|Error)/);
  });

  it("gives every shell rule a clause, a justification and at least one match example", () => {
    const raw = parseYaml(readFileSync(DEFAULT_POLICY_FILE, "utf8")) as {
      shell: { rules: Array<{ id: string; match?: unknown[]; justification: string }> };
    };
    for (const r of raw.shell.rules) {
      expect({ id: r.id, examples: (r.match?.length ?? 0) > 0 }).toEqual({ id: r.id, examples: true });
      expect(r.justification.length).toBeGreaterThan(20);
    }
  });

  it("encodes the limits of src/policy/limits.ts for every mode", () => {
    for (const mode of PHASE_MODES) expect({ mode, limits: policy.limits[mode] }).toEqual({ mode, limits: defaultLimits(mode) });
    expect(policy.limits.paper.maxTimeoutMs).toBe(300_000);
    expect(policy.limits.backtest.maxTimeoutMs).toBe(60_000);
  });

  it("encodes the fail-fast attempts per error category", () => {
    expect(policy.failFast.maxAttempts).toEqual({ syntax: 3, import: 2, type: 3, test: 3, runtime: 2, database: 1 });
  });

  it("encodes the workspace and database rules", () => {
    expect(policy.workspace.atomicModification.maxFilesPerIteration).toBe(2);
    expect(policy.workspace.maxFileBytes.value).toBe(10 * 1024 * 1024);
    const byId = Object.fromEntries(policy.workspace.protectedPaths.map((p) => [p.id, p]));
    expect(byId["workspace.protected.shared"]).toMatchObject({ treatment: { delete: "reject", rename: "reject", modify: "ask" } });
    expect(byId["workspace.protected.main-py"]).toMatchObject({ treatment: "readOnly", unlessPermission: "main.py" });
    expect(byId["workspace.protected.credentials"]).toMatchObject({ treatment: "hidden" });
    expect(policy.database.readOnlyDefault).toMatchObject({ value: true, paperTablePrefix: "paper_", testDatabaseEnv: "DATABASE_URL_TEST" });
    expect(policy.database.statementTimeoutMs.value).toBe(30_000);
    expect(policy.database.alphaMarkers.functions).toContain("corr");
    expect(policy.database.alphaMarkers.joins).toContainEqual(["signals", "fills"]);
  });

  it("is frozen", () => {
    expect(Object.isFrozen(policy)).toBe(true);
    expect(Object.isFrozen(policy.shell.layers[0]!.rules)).toBe(true);
    expect(() => {
      (policy.limits.test as { cpus: number }).cpus = 8;
    }).toThrow(TypeError);
    expect(() => {
      (policy.shell.layers as unknown as unknown[]).push({});
    }).toThrow(TypeError);
  });
});

describe("evaluateCommand: the examples of the issue", () => {
  const table: Array<[string, string[], Decision, string]> = [
    ["pytest tests/", ["pytest", "tests/"], "allow", "shell.whitelist"],
    ["pip install -r requirements.txt", ["pip", "install", "-r", "requirements.txt"], "allow", "shell.whitelist"],
    ["docker-compose down", ["docker-compose", "down"], "allow", "shell.compose-allowed"],
    ["docker-compose down -v", ["docker-compose", "down", "-v"], "forbid", "shell.forbidden.compose-down-volumes"],
    ["docker-compose rm", ["docker-compose", "rm"], "forbid", "shell.forbidden.compose-rm"],
    ["rm -rf /", ["rm", "-rf", "/"], "forbid", "shell.forbidden.rm-recursive"],
    ["sudo pytest", ["sudo", "pytest"], "forbid", "shell.forbidden.privilege"],
    ["sudo rm -rf /", ["sudo", "rm", "-rf", "/"], "forbid", "shell.forbidden.privilege"],
    ["python main.py --mode backtest", ["python", "main.py", "--mode", "backtest"], "allow", "shell.whitelist"],
    ["curl https://example.com", ["curl", "https://example.com"], "ask", "shell.not-whitelisted"],
    // the documented choice: inline Python asks
    [`python -c "import os"`, ["python", "-c", "import os"], "ask", "shell.python-inline"],
    // bash -c / sh -c: judged by the inner command; the wrapper itself is not whitelisted
    [`bash -c "rm -rf /"`, ["bash", "-c", "rm -rf /"], "forbid", "shell.forbidden.rm-recursive"],
    [`sh -c "sudo id"`, ["sh", "-c", "sudo id"], "forbid", "shell.forbidden.privilege"],
    [`bash -c "pytest -q"`, ["bash", "-c", "pytest -q"], "ask", "shell.not-whitelisted"],
    [`sh -c 'echo $(id)'`, ["sh", "-c", "echo $(id)"], "forbid", "shell.parse"],
    [`bash -c "bash -c 'docker-compose down -v'"`, ["bash", "-c", "bash -c 'docker-compose down -v'"], "forbid", "shell.forbidden.compose-down-volumes"],
  ];

  for (const [command, args, decision, ruleId] of table) {
    it(`${command} → ${decision} (${ruleId}), as argv and as a string`, () => {
      const a = evaluateCommand(policy, argv(args));
      const s = evaluateCommand(policy, cmd(command));
      expect({ decision: a.decision, ruleId: a.ruleId }).toEqual({ decision, ruleId });
      expect({ decision: s.decision, ruleId: s.ruleId }).toEqual({ decision, ruleId });
      expect(a.clause).toMatch(/^SKILLS\.md /);
      expect(a.reason.length).toBeGreaterThan(10);
    });
  }

  it("names the rule, the command and the alternative in the reason", () => {
    const v = evaluateCommand(policy, cmd("docker-compose down -v"));
    expect(v.reason).toContain("`docker-compose down -v`");
    expect(v.reason).toContain("use `docker-compose down`");
    expect(v.clause).toContain("§2 Infrastructure Management");
  });

  it("refuses a shell nested deeper than two levels", () => {
    const v = evaluateCommand(policy, cmd(`bash -c "bash -c 'bash -c pytest'"`));
    expect(v).toMatchObject({ decision: "forbid", ruleId: "shell.parse" });
    expect(v.reason).toMatch(/deeper than 2/);
    const two = evaluateCommand(policy, cmd(`bash -c "bash -c pytest"`));
    expect(two.decision).toBe("ask");
    expect(two.parts.map((p) => p.argv[0])).toEqual(["bash", "bash", "pytest"]);
  });

  it("gives the shim argv as is, and a judged string to /bin/sh -c", () => {
    expect(evaluateCommand(policy, argv(["pytest", "a b"])).execArgv).toEqual(["pytest", "a b"]);
    const s = "pytest tests/ && black --check .";
    const v = evaluateCommand(policy, cmd(s));
    expect(v.decision).toBe("allow");
    expect(v.execArgv).toEqual(["/bin/sh", "-c", s]);
    expect(v.parts.map((p) => p.argv)).toEqual([
      ["pytest", "tests/"],
      ["black", "--check", "."],
    ]);
  });

  it("refuses argv with no program or with a NUL byte", () => {
    expect(evaluateCommand(policy, argv([]))).toMatchObject({ decision: "forbid", ruleId: "shell.parse" });
    expect(evaluateCommand(policy, argv(["pytest", "a\0b"]))).toMatchObject({ decision: "forbid", ruleId: "shell.parse" });
  });

  it("maps verdicts to error codes", () => {
    expect(errorCodeFor(evaluateCommand(policy, cmd("pytest")))).toBeNull();
    expect(errorCodeFor(evaluateCommand(policy, cmd("curl x")))).toBe("SBX_ERR_POLICY_NEEDS_APPROVAL");
    expect(errorCodeFor(evaluateCommand(policy, cmd("rm -rf /")))).toBe("SBX_ERR_POLICY_DENIED");
    expect(errorCodeFor(evaluateCommand(policy, cmd("echo $(id)")))).toBe("SBX_ERR_COMMAND_PARSE");
  });
});

describe("evaluateCommand: strictest wins", () => {
  let overlap: Policy;
  beforeAll(() => {
    overlap = parsePolicy(policyText(RULES_OVERLAP), "overlap.yaml");
  });

  it("over all matching rules: forbid > ask > allow", () => {
    expect(evaluateCommand(overlap, argv(["git", "status"]))).toMatchObject({ decision: "allow", ruleId: "t.allow-git" });
    expect(evaluateCommand(overlap, argv(["git", "push", "origin"]))).toMatchObject({ decision: "ask", ruleId: "t.ask-push" });
    expect(evaluateCommand(overlap, argv(["git", "push", "-f"]))).toMatchObject({ decision: "forbid", ruleId: "t.forbid-force" });
    expect(evaluateCommand(overlap, argv(["git", "push", "-uf", "origin"]))).toMatchObject({ decision: "forbid" });
  });

  it("over all parts of a command string, naming the part that decided", () => {
    const v = evaluateCommand(policy, cmd("pytest && curl x && black ."));
    expect(v).toMatchObject({ decision: "ask", ruleId: "shell.not-whitelisted" });
    expect(v.reason).toMatch(/part 2 of 3/);
    expect(v.parts.map((p) => p.decision)).toEqual(["allow", "ask", "allow"]);
    const f = evaluateCommand(policy, cmd("pytest; curl x | sh; rm -r build"));
    expect(f).toMatchObject({ decision: "forbid", ruleId: "shell.forbidden.rm-recursive" });
  });

  it("judges a program named by path under its name too", () => {
    expect(evaluateCommand(policy, argv(["/usr/bin/sudo", "id"]))).toMatchObject({ decision: "forbid", ruleId: "shell.forbidden.privilege" });
    expect(evaluateCommand(policy, argv(["/bin/rm", "-rf", "/"]))).toMatchObject({ decision: "forbid" });
    expect(evaluateCommand(policy, argv(["/usr/bin/python3", "x.py"]))).toMatchObject({ decision: "ask", ruleId: "shell.program-path" });
  });
});

describe("evaluateCommand: refuses what the parser cannot vouch for", () => {
  const refusals: Array<[string, RegExp]> = [
    ["pytest `id`", /command substitution/],
    ['pytest "$(id)"', /command substitution/],
    ["cat <<EOF\n$(id)\nEOF", /command substitution/],
    ["pytest ${x:-$(id)}", /command substitution/],
    ["pytest $HOME", /parameter expansion/],
    ["rm *.pyc", /glob/],
    ["pytest > out.txt", /redirection/],
    ["X=1 pytest", /assignment/],
    ["(pytest)", /subshell/],
    ["{ pytest; }", /command group/],
    ["f() { pytest; }", /function/],
    ["if true; then pytest; fi", /if statement/],
    ["for x in a; do pytest; done", /for loop/],
    ["while true; do pytest; done", /while/],
    ["case a in a) pytest;; esac", /case/],
    ["pytest &", /background/],
    ['pytest "unterminated', /syntax|incomplete/],
  ];
  for (const [command, what] of refusals) {
    it(`${JSON.stringify(command)} → forbid (shell.parse), naming ${what}`, () => {
      const v = evaluateCommand(policy, cmd(command));
      expect(v).toMatchObject({ decision: "forbid", ruleId: "shell.parse", parts: [{ decision: "forbid", ruleId: "shell.parse" }] });
      expect(v.reason).toMatch(what);
      expect(v.reason).toMatch(/pass argv/);
    });
  }
});

/** test/unit/policy-shell.test.ts's table: the new engine must give the same decision and rule id. */
const LEGACY: Array<[string[], Decision, string]> = [
  [["pytest", "tests/"], "allow", "shell.whitelist"],
  [["pytest", "--cov=services", "tests/"], "allow", "shell.whitelist"],
  [["python", "main.py", "--mode", "backtest"], "allow", "shell.whitelist"],
  [["python3", "scripts/validate_config.py"], "allow", "shell.whitelist"],
  [["pip", "install", "-r", "requirements.txt"], "allow", "shell.whitelist"],
  [["mypy", "services/", "shared/", "--strict"], "allow", "shell.whitelist"],
  [["black", "--check", "."], "allow", "shell.whitelist"],
  [["isort", "--check-only", "."], "allow", "shell.whitelist"],
  [["pylint", "services/", "shared/"], "allow", "shell.whitelist"],
  [["docker-compose", "up", "-d"], "allow", "shell.compose-allowed"],
  [["docker-compose", "down"], "allow", "shell.compose-allowed"],
  [["docker-compose", "logs", "db"], "allow", "shell.compose-allowed"],
  [["docker-compose", "down", "-v"], "forbid", "shell.forbidden.compose-down-volumes"],
  [["docker-compose", "down", "--volumes"], "forbid", "shell.forbidden.compose-down-volumes"],
  [["docker-compose", "rm"], "forbid", "shell.forbidden.compose-rm"],
  [["docker-compose", "-f", "x.yml", "rm", "-f"], "forbid", "shell.forbidden.compose-rm"],
  [["docker-compose", "exec", "db", "psql"], "ask", "shell.compose-other"],
  [["docker-compose", "--file", "x.yml", "-p", "proj", "down", "-v"], "forbid", "shell.forbidden.compose-down-volumes"],
  [["docker-compose", "-f", "rm", "ps"], "allow", "shell.compose-allowed"],
  [["rm", "-rf", "/"], "forbid", "shell.forbidden.rm-recursive"],
  [["rm", "-r", "services"], "forbid", "shell.forbidden.rm-recursive"],
  [["rm", "--recursive", "x"], "forbid", "shell.forbidden.rm-recursive"],
  [["rm", "notes.txt"], "ask", "shell.not-whitelisted"],
  [["sudo", "pytest"], "forbid", "shell.forbidden.privilege"],
  [["su", "-"], "forbid", "shell.forbidden.privilege"],
  [["mkfs.ext4", "/dev/sda"], "forbid", "shell.forbidden.mkfs"],
  [["dd", "if=/dev/zero", "of=x"], "forbid", "shell.forbidden.dd"],
  [["iptables", "-F"], "forbid", "shell.forbidden.netconfig"],
  [["apt-get", "install", "x"], "forbid", "shell.forbidden.os-packages"],
  [["chmod", "777", "/etc/passwd"], "forbid", "shell.forbidden.chmod-chown"],
  [["kill", "-9", "1"], "forbid", "shell.forbidden.kill-9"],
  [["curl", "https://example.com"], "ask", "shell.not-whitelisted"],
  [["bash", "-c", "pytest"], "ask", "shell.not-whitelisted"],
  [["/usr/bin/python3", "x.py"], "ask", "shell.program-path"],
  [["./pytest"], "ask", "shell.program-path"],
  [["pythonx"], "ask", "shell.not-whitelisted"],
  [["Python"], "ask", "shell.not-whitelisted"],
];

describe("the decisions of src/policy/shell.ts (evaluateArgv) are kept", () => {
  for (const [args, decision, ruleId] of LEGACY) {
    it(`${args.join(" ")} → ${decision} (${ruleId})`, () => {
      const v = evaluateCommand(policy, argv(args));
      expect({ decision: v.decision, ruleId: v.ruleId }).toEqual({ decision, ruleId });
      expect(v.clause).toMatch(/^SKILLS\.md §2 /);
      // and the old implementation still agrees with its own table
      expect(evaluateArgv(args)).toMatchObject({ decision, ruleId });
    });
  }

  it("judges the program by argv[0]: a whitelisted word elsewhere does not help", () => {
    expect(evaluateCommand(policy, argv(["touch", "pytest"])).decision).toBe("ask");
    expect(evaluateCommand(policy, argv(["env", "python", "x.py"])).decision).toBe("ask");
  });

  it("lets the operator allow extra programs, but never over a rule that asks or forbids", () => {
    const extraAllow = new Set(["true", "sudo", "docker-compose", "rm"]);
    expect(evaluateCommand(policy, argv(["true"]), { extraAllow })).toMatchObject({ decision: "allow", ruleId: "shell.operator-allow" });
    expect(evaluateCommand(policy, argv(["sudo", "id"]), { extraAllow }).decision).toBe("forbid");
    expect(evaluateCommand(policy, argv(["rm", "notes.txt"]), { extraAllow }).decision).toBe("allow");
    expect(evaluateCommand(policy, argv(["rm", "-r", "x"]), { extraAllow }).decision).toBe("forbid");
    expect(evaluateCommand(policy, argv(["docker-compose", "exec", "db"]), { extraAllow }).ruleId).toBe("shell.compose-other");
    expect(evaluateCommand(policy, cmd("true && true"), { extraAllow }).decision).toBe("allow");
    expect(evaluateCommand(policy, argv(["true"])).decision).toBe("ask");
    // a phase policy that forbids unknown commands is not overridden
    expect(evaluateCommand(combine(policy, strict), argv(["true"]), { extraAllow }).decision).toBe("forbid");
  });

  /**
   * Differential check against the old implementation over a wider corpus:
   * the new engine agrees everywhere except where the default policy is
   * deliberately stricter (listed, with the reason).
   */
  it("agrees with evaluateArgv on a wider corpus, except the documented tightenings", () => {
    const corpus: string[][] = [
      ...LEGACY.map(([a]) => a),
      ["pytest", "-x", "-k", "risk"], ["python", "-m", "pytest"], ["pip", "list"], ["pip", "install", "requests"],
      ["docker-compose", "ps"], ["docker-compose", "restart", "db"], ["docker-compose", "pull"], ["docker-compose", "down", "-t", "5"],
      ["rm", "-f", "x"], ["rm", "-fr", "x"], ["kill", "1"], ["chown", "a", "b"], ["yum", "install", "x"],
      ["ls"], ["cat", "x"], ["git", "status"], ["make"], ["node", "x.js"], ["doas", "id"], ["mkfs", "x"], ["ifconfig"],
      ["/bin/ls"], ["sh", "-c", "pytest"], ["bash", "-lc", "pytest"],
    ];
    const tightened: Array<[string[], string]> = [
      [["python", "-c", "print(1)"], "shell.python-inline"],
      [["pip", "install", "-i", "https://x/simple", "y"], "shell.pip-index"],
      [["/usr/bin/sudo", "id"], "shell.forbidden.privilege"],
      [["bash", "-c", "rm -rf /"], "shell.forbidden.rm-recursive"],
      [["find", ".", "-delete"], "shell.forbidden.find-delete"],
      [["docker", "volume", "rm", "x"], "shell.forbidden.docker-volumes-networks"],
      [["dpkg", "-i", "x.deb"], "shell.forbidden.os-packages"],
      [["chgrp", "x", "y"], "shell.forbidden.chmod-chown"],
    ];
    // the old rule forbade `kill -s` whatever the signal; SKILLS.md forbids kill -9, and kill's
    // own grammar now reads every spelling of SIGKILL, so another signal only asks
    const loosened: Array<[string[], Decision]> = [[["kill", "-s", "TERM", "1"], "ask"]];
    for (const [a, decision] of loosened) {
      expect(evaluateArgv(a).decision).toBe("forbid");
      expect(evaluateCommand(policy, argv(a)).decision).toBe(decision);
    }
    for (const a of corpus) {
      const oldV = evaluateArgv(a);
      const newV = evaluateCommand(policy, argv(a));
      expect({ argv: a, decision: newV.decision, ruleId: newV.ruleId }).toEqual({ argv: a, decision: oldV.decision, ruleId: oldV.ruleId });
    }
    const rank = { allow: 0, ask: 1, forbid: 2 };
    for (const [a, ruleId] of tightened) {
      const oldV = evaluateArgv(a);
      const newV = evaluateCommand(policy, argv(a));
      expect({ argv: a, ruleId: newV.ruleId }).toEqual({ argv: a, ruleId });
      expect(rank[newV.decision]).toBeGreaterThan(rank[oldV.decision]);
    }
  });
});

describe("parsePolicy: validation", () => {
  it("accepts the minimal test policy", () => {
    const p = parsePolicy(policyText(RULES_OVERLAP), "ok.yaml");
    expect(p.shell.layers[0]!.rules.map((r) => r.id)).toEqual(["t.allow-git", "t.ask-push", "t.forbid-force"]);
    expect(p.sources).toEqual(["ok.yaml"]);
  });

  it("rejects a policy whose match example is overridden by a stricter rule", () => {
    const rules = RULES_OVERLAP.replace("match: [git status]", "match: [git status, git push -f]");
    const problems = problemsOf(() => parsePolicy(policyText(rules), "p.yaml"));
    expect(problems).toHaveLength(1);
    expect(problems[0]).toMatch(/^p\.yaml:\d+: shell\.rules\[0\] \(t\.allow-git\)\.match\[1\]: example `git push -f` of rule t\.allow-git \(allow\) comes out forbid \(rule t\.forbid-force/);
  });

  it("rejects a policy whose rule does not match its own example", () => {
    const rules = RULES_OVERLAP.replace("match: [git push origin]", "match: [git pull]");
    const problems = problemsOf(() => parsePolicy(policyText(rules), "p.yaml"));
    expect(problems).toEqual([expect.stringMatching(/shell\.rules\[1\] \(t\.ask-push\)\.match\[0\]: rule t\.ask-push does not match its example `git pull`/)]);
  });

  it("rejects a policy whose rule matches a not_match example", () => {
    const rules = RULES_OVERLAP.replace("not_match: [git push origin]", "not_match: [git push origin, git push -vf]");
    const problems = problemsOf(() => parsePolicy(policyText(rules), "p.yaml"));
    expect(problems).toEqual([expect.stringMatching(/\.not_match\[1\]: rule t\.forbid-force matches `git push -vf`, listed as not matching/)]);
  });

  it("reports every problem of a broken policy at once, with file, line and path", () => {
    const text = `version: 2
shell:
  unknown: allow
  rules:
    - id: shell.ok
      clause: "SKILLS.md §2 Command Whitelist Pattern"
      decision: allow
      justification: this rule is fine and says why
      pattern: [pytest]
      match: [pytest -q, ls]
    - id: Bad Id
      clause: "§2 without the document"
      decision: maybe
      justification: short
      pattern: []
      not_mach: [x]
    - id: shell.ok
      clause: "SKILLS.md §2"
      decision: forbid
      justification: duplicate id and a number token
      pattern: [kill]
      anyArg: [-9]
    - id: shell.flags
      clause: "SKILLS.md §2"
      decision: forbid
      justification: a malformed flag matcher
      pattern: [rm]
      anyArg: {flag: [r]}
${BASE_LIMITS.replace("maxTimeoutMs: 60s", "maxTimeoutMs: 10m").replace("memoryBytes: 2GiB", "memoryBytes: lots").replace("syntax: 3", "syntax: 4")}
extra: true
`;
    const problems = problemsOf(() => parsePolicy(text, "broken.yaml"));
    const expected = [
      /^broken\.yaml:1: version: must be 1/,
      /^broken\.yaml:3: shell\.unknown: Invalid enum value/,
      /^broken\.yaml:10: shell\.rules\[0\] \(shell\.ok\)\.match\[1\]: rule shell\.ok does not match its example `ls`/,
      /shell\.rules\[1\] \(Bad Id\)\.id: must be a dotted lower-case id/,
      /shell\.rules\[1\] \(Bad Id\)\.clause: must name the SKILLS\.md clause/,
      /shell\.rules\[1\] \(Bad Id\)\.decision: Invalid enum value/,
      /shell\.rules\[1\] \(Bad Id\)\.justification: say why/,
      /shell\.rules\[1\] \(Bad Id\)\.pattern: a pattern needs at least the program/,
      /shell\.rules\[1\] \(Bad Id\)\.not_mach: unknown key/,
      /shell\.rules\[2\] \(shell\.ok\)\.id: duplicate rule id shell\.ok/,
      /shell\.rules\[2\] \(shell\.ok\)\.anyArg\[0\]: Expected string, received number \(YAML reads unquoted -9/,
      /shell\.rules\[3\] \(shell\.flags\)\.anyArg\.flag\[0\]: a flag such as "-r"/,
      /limits\.default\.memoryBytes: expected a size/,
      /limits\.default\.maxTimeoutMs: at most 300000/,
      /failFast\.maxAttempts\.syntax: at most 3/,
      /^broken\.yaml:\d+: extra: unknown key/,
    ];
    for (const re of expected) expect(problems.some((p) => re.test(p)), `${re} in\n${problems.join("\n")}`).toBe(true);
    expect(problems.length).toBe(expected.length);
    for (const p of problems) expect(p).toMatch(/^broken\.yaml:\d+: \S/);
  });

  it("puts every problem in one SandboxdError message", () => {
    try {
      parsePolicy(policyText(RULES_OVERLAP, "allow").replace("cpus: 1", "cpus: -1"), "two.yaml");
      expect.unreachable();
    } catch (e) {
      const err = e as SandboxdError;
      expect(err.code).toBe("SBX_ERR_POLICY_INVALID");
      expect(err.message).toMatch(/invalid \(2 problems\)/);
      expect(err.message).toMatch(/two\.yaml:\d+: shell\.unknown/);
      expect(err.message).toMatch(/two\.yaml:\d+: limits\.default\.cpus/);
    }
  });

  it("checks cross-field limits: the default timeout may not exceed the maximum", () => {
    const text = policyText(RULES_OVERLAP).replace("defaultTimeoutMs: 60s", "defaultTimeoutMs: 2m");
    const problems = problemsOf(() => parsePolicy(text, "t.yaml"));
    expect(problems).toEqual([
      expect.stringMatching(/limits\.default\.defaultTimeoutMs: defaultTimeoutMs \(120000\) exceeds maxTimeoutMs \(60000\) in backtest mode/),
      expect.stringMatching(/in test mode/),
    ]);
  });

  it("reports YAML syntax errors with their line", () => {
    const problems = problemsOf(() => parsePolicy("version: 1\nshell:\n  rules: [a, b\n", "y.yaml"));
    expect(problems[0]).toMatch(/^y\.yaml:\d+: \(document\): YAML: /);
    const dup = problemsOf(() => parsePolicy("version: 1\nversion: 1\n", "d.yaml"));
    expect(dup[0]).toMatch(/^d\.yaml:2: .*YAML: Map keys must be unique/);
  });

  it("refuses a file it cannot read", async () => {
    await expect(loadPolicy("/nonexistent/policy.yaml")).rejects.toMatchObject({
      code: "SBX_ERR_POLICY_INVALID",
      message: expect.stringMatching(/cannot read policy file \/nonexistent\/policy\.yaml: ENOENT/),
    });
  });

  it("loads from a file path, reporting that path", async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "sbx-policy-"));
    try {
      const file = path.join(dir, "p.yaml");
      writeFileSync(file, policyText(RULES_OVERLAP).replace("cpus: 1", "cpus: zero"));
      await expect(loadPolicy(file)).rejects.toMatchObject({ message: expect.stringContaining(`${file}:`) });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("combine(): a phase policy can only narrow", () => {
  it("the example strict policy forbids pip install and docker-compose and everything unknown", () => {
    const c = combine(policy, strict);
    expect(c.sources).toEqual([DEFAULT_POLICY_FILE, STRICT_FILE]);
    expect(evaluateCommand(c, cmd("pytest tests/"))).toMatchObject({ decision: "allow" });
    expect(evaluateCommand(c, cmd("pip install -r requirements.txt"))).toMatchObject({ decision: "forbid", ruleId: "strict.no-pip-install" });
    expect(evaluateCommand(c, cmd("docker-compose up -d"))).toMatchObject({ decision: "forbid", ruleId: "strict.no-compose" });
    expect(evaluateCommand(c, cmd("curl x"))).toMatchObject({ decision: "forbid", ruleId: "shell.not-whitelisted" });
    // the base's rules still apply under the phase policy
    expect(evaluateCommand(c, cmd("python -c x"))).toMatchObject({ decision: "ask", ruleId: "shell.python-inline" });
    expect(evaluateCommand(c, cmd("rm -rf /"))).toMatchObject({ decision: "forbid", ruleId: "shell.forbidden.rm-recursive" });
  });

  it("takes the smaller of every limit and attempt count", () => {
    const c = combine(policy, strict);
    expect(c.limits.paper).toMatchObject({ memoryBytes: 1024 ** 3, maxTimeoutMs: 60_000, defaultTimeoutMs: 30_000, pidsLimit: 128 });
    expect(c.failFast.maxAttempts).toEqual({ syntax: 2, import: 1, type: 2, test: 2, runtime: 1, database: 1 });
    expect(c.workspace.atomicModification.maxFilesPerIteration).toBe(1);
    expect(c.database.statementTimeoutMs.value).toBe(10_000);
    expect(c.database.schemaChanges.decision).toBe("forbid");
    expect(c.database.deniedFunctions.functions).toEqual(expect.arrayContaining(["pg_read_file", "set_config", "pg_sleep"]));
    expect(c.workspace.protectedPaths.map((p) => p.id)).toEqual(expect.arrayContaining(["workspace.protected.credentials", "strict.protected.shared"]));
    expect(Object.isFrozen(c)).toBe(true);
  });

  it("ignores a 'phase policy' that tries to widen", () => {
    const wide = parsePolicy(
      policyText(
        `
    - id: wide.everything
      clause: "SKILLS.md §2 Command Whitelist Pattern"
      decision: allow
      justification: an attempt to allow what the base forbids
      pattern: [[curl, sudo, rm, bash, python]]
      match: [curl x, sudo id, rm -rf /]
`,
        "ask",
        BASE_LIMITS.replace("memoryBytes: 2GiB", "memoryBytes: 8GiB").replace("pidsLimit: 256", "pidsLimit: 4096"),
      ),
      "wide.yaml",
    );
    for (const c of [combine(policy, wide), combine(wide, policy)]) {
      expect(evaluateCommand(c, cmd("curl x")).decision).toBe("ask");
      expect(evaluateCommand(c, cmd("sudo id")).decision).toBe("forbid");
      expect(evaluateCommand(c, cmd("rm -rf /")).decision).toBe("forbid");
      expect(evaluateCommand(c, cmd("python -c x")).decision).toBe("ask");
      expect(c.limits.test.memoryBytes).toBe(2 * 1024 ** 3);
      expect(c.limits.test.pidsLimit).toBe(256);
    }
    // every verdict under the combination is at least as strict as under the base
    const rank = { allow: 0, ask: 1, forbid: 2 };
    for (const s of ["pytest", "curl x", "pip install x", "docker-compose up -d", "rm notes.txt", "bash -c pytest"]) {
      const base = evaluateCommand(policy, cmd(s));
      for (const other of [strict, wide]) {
        expect(rank[evaluateCommand(combine(policy, other), cmd(s)).decision]).toBeGreaterThanOrEqual(rank[base.decision]);
      }
    }
  });

  it("drops a database write exception the two policies disagree on", () => {
    const other = parsePolicy(policyText(RULES_OVERLAP).replace("paperTablePrefix: paper_", "paperTablePrefix: sim_"), "o.yaml");
    const c = combine(policy, other);
    expect(c.database.readOnlyDefault.paperTablePrefix).toBeNull();
    expect(c.database.readOnlyDefault.testDatabaseEnv).toBe("DATABASE_URL_TEST");
  });
});
