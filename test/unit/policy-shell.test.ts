import { describe, expect, it } from "vitest";
import { evaluateArgv } from "../../src/policy/shell.js";

const cases: Array<[string[], "allow" | "ask" | "forbid", string]> = [
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

describe("evaluateArgv (SKILLS.md §2 whitelist and forbidden commands)", () => {
  for (const [argv, decision, rule] of cases) {
    it(`${argv.join(" ")} → ${decision} (${rule})`, () => {
      const v = evaluateArgv(argv);
      expect({ decision: v.decision, rule: v.ruleId }).toEqual({ decision, rule });
      expect(v.clause).toMatch(/^SKILLS\.md §2 /);
      expect(v.reason.length).toBeGreaterThan(5);
    });
  }

  it("judges the program by argv[0] exactly: a whitelisted word elsewhere does not help", () => {
    expect(evaluateArgv(["touch", "pytest"]).decision).toBe("ask");
    expect(evaluateArgv(["env", "python", "x.py"]).decision).toBe("ask");
  });

  it("lets the operator allow extra programs, but never a forbidden one", () => {
    const extraAllow = new Set(["true", "sudo"]);
    expect(evaluateArgv(["true"], { extraAllow })).toMatchObject({ decision: "allow", ruleId: "shell.operator-allow" });
    expect(evaluateArgv(["sudo", "id"], { extraAllow }).decision).toBe("forbid");
    expect(evaluateArgv(["true"]).decision).toBe("ask");
  });
});
