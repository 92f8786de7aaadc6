import { describe, expect, it } from "vitest";
import { judgeCompose, parseCompose } from "../../src/phases/compose.js";
import type { Verdict } from "../../src/policy/index.js";

const ok = (argv: string[]) => {
  const r = parseCompose(argv);
  if ("refused" in r) throw new Error(r.refused);
  return [r.call.sub, ...r.call.args].join(" ");
};
const refused = (argv: string[]) => {
  const r = parseCompose(argv);
  return "refused" in r ? r.refused : null;
};

describe("the docker-compose grammar the daemon runs", () => {
  it("runs up -d (never building), down, ps, logs and restart with their few options", () => {
    expect(ok(["docker-compose", "up", "-d"])).toBe("up -d --no-build");
    expect(ok(["docker-compose", "up", "--detach", "db", "redis"])).toBe("up -d --no-build db redis");
    expect(ok(["docker-compose", "down"])).toBe("down");
    expect(ok(["docker-compose", "ps", "-q", "db"])).toBe("ps -q db");
    expect(ok(["docker-compose", "logs", "--tail", "20", "-t", "db"])).toBe("logs --tail 20 -t db");
    expect(ok(["docker-compose", "restart", "-t", "5", "db"])).toBe("restart -t 5 db");
  });

  it("refuses everything else", () => {
    for (const argv of [
      ["docker-compose"],
      ["docker-compose", "-f", "x.yml", "ps"],
      ["docker-compose", "-p", "other", "down"],
      ["docker-compose", "up"],
      ["docker-compose", "up", "-d", "--build"],
      ["docker-compose", "up", "-d", "-V"],
      ["docker-compose", "down", "-v"],
      ["docker-compose", "down", "--rmi", "all"],
      ["docker-compose", "down", "--remove-orphans"],
      ["docker-compose", "logs", "-f"],
      ["docker-compose", "logs", "--tail", "x"],
      ["docker-compose", "restart", "--", "db"],
      ["docker-compose", "ps", "$(id)"],
      ["docker-compose", "rm"],
      ["docker-compose", "exec", "db", "sh"],
      ["docker-compose", "run", "db"],
      ["docker-compose", "pull"],
      ["docker-compose", "build"],
      ["docker-compose", "config"],
    ]) {
      expect(refused(argv), argv.join(" ")).not.toBeNull();
    }
  });

  it("a compose command must stand alone; a forbid stays the policy's; other commands are untouched", () => {
    const part = (argv: string[], decision: Verdict["decision"] = "allow") => ({ argv, decision, ruleId: "r", clause: "c", reason: "x" });
    const v = (parts: Verdict["parts"], execArgv: string[], decision: Verdict["decision"] = "allow"): Verdict => ({ decision, ruleId: "r", clause: "c", reason: "x", parts, execArgv });
    expect(judgeCompose(v([part(["docker-compose", "ps"])], ["docker-compose", "ps"])).call).toEqual({ sub: "ps", args: [] });
    const compound = judgeCompose(v([part(["docker-compose", "ps"]), part(["pytest"])], ["/bin/sh", "-c", "docker-compose ps && pytest"]));
    expect(compound.verdict).toMatchObject({ decision: "forbid", ruleId: "compose.mediated" });
    const forbidden = v([part(["docker-compose", "down", "-v"], "forbid")], ["docker-compose", "down", "-v"], "forbid");
    expect(judgeCompose(forbidden).verdict).toBe(forbidden);
    const asked = judgeCompose(v([part(["docker-compose", "pull"], "ask")], ["docker-compose", "pull"], "ask"));
    expect(asked.verdict).toMatchObject({ decision: "forbid", ruleId: "compose.mediated" });
    const plain = v([part(["pytest"])], ["pytest"]);
    expect(judgeCompose(plain)).toEqual({ verdict: plain, call: null });
  });
});
