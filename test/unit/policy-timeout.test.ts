import { describe, expect, it } from "vitest";
import { TIMEOUT_RULE_ID, judgeTimeout, timeoutNeedsApproval, type Verdict } from "../../src/policy/index.js";

const part = (argv: string[], decision: Verdict["decision"], ruleId: string) => ({ argv, decision, ruleId, clause: "c", reason: "r" });
const verdict = (decision: Verdict["decision"], parts: Verdict["parts"]): Verdict => ({ decision, ruleId: "shell.x", clause: "c", reason: "because", parts, execArgv: ["pytest"] });

describe("a timeout over the mode's limit", () => {
  it("needs a person between the mode's limit and the 5-minute ceiling only", () => {
    expect(timeoutNeedsApproval(60_000, 60_000)).toBe(false);
    expect(timeoutNeedsApproval(60_001, 60_000)).toBe(true);
    expect(timeoutNeedsApproval(300_000, 60_000)).toBe(true);
    expect(timeoutNeedsApproval(300_001, 60_000)).toBe(false);
  });

  it("turns allow into ask for every part, keeps the policy's own ask reason, and leaves a forbid alone", () => {
    const allowed = judgeTimeout(verdict("allow", [part(["pytest"], "allow", "shell.pytest")]), 120_000, 60_000, "backtest");
    expect(allowed).toMatchObject({ decision: "ask", ruleId: TIMEOUT_RULE_ID });
    expect(allowed.reason).toBe("timeout 120 s exceeds the 60 s limit of a backtest-mode phase; a person may allow it for this command");
    expect(allowed.parts.map((p) => p.decision)).toEqual(["ask"]);
    expect(allowed.parts[0]!.ruleId).toBe("shell.pytest");

    const asked = judgeTimeout(verdict("ask", [part(["sh", "x"], "ask", "shell.not-whitelisted"), part(["pytest"], "allow", "shell.pytest")]), 90_500, 60_000, "test");
    expect(asked.reason).toContain("timeout 90.5 s");
    expect(asked.reason).toContain("because (rule shell.x)");
    expect(asked.parts.map((p) => p.decision)).toEqual(["ask", "ask"]);

    const forbidden = verdict("forbid", [part(["rm", "-rf", "/"], "forbid", "shell.rm")]);
    expect(judgeTimeout(forbidden, 120_000, 60_000, "test")).toBe(forbidden);
  });
});
