/**
 * The policy's `database` section reaches the SQL classifier
 * (src/db/policy-rules.ts): what the operator's policy says is what the
 * gateway enforces.
 */
import { readFile } from "node:fs/promises";
import { beforeAll, describe, expect, it } from "vitest";
import { classifyQuestDb } from "../../src/db/questdb-gate.js";
import { classifySql, initSqlParser } from "../../src/db/classify.js";
import { sqlRulesFor } from "../../src/db/policy-rules.js";
import { DEFAULT_POLICY_FILE, combine, parsePolicy } from "../../src/policy/load.js";
import type { Policy } from "../../src/policy/schema.js";

let text = "";
let base: Policy;

/** The default policy with its database section edited. */
function variant(edit: (yaml: string) => string): Policy {
  const edited = edit(text);
  expect(edited).not.toBe(text); // the edit must have applied
  return parsePolicy(edited, "variant.yaml");
}

const LIFT_SLEEP = (y: string) => y.replace(/(functions: \[pg_read_file[^\]]*\])/, "$1\n    allow: [pg_sleep]");

beforeAll(async () => {
  await initSqlParser();
  text = await readFile(DEFAULT_POLICY_FILE, "utf8");
  base = parsePolicy(text, DEFAULT_POLICY_FILE);
});

describe("sqlRulesFor", () => {
  it("the default policy: built-in denials and the policy's own both hold; alpha markers refused", () => {
    const rules = sqlRulesFor(base.database);
    expect(classifySql("select pg_sleep(1)", { mode: "test", rules }).decision).toBe("forbid");
    expect(classifySql("select lo_import('/etc/passwd')", { mode: "test", rules }).ruleId).toBe("db.denied-function");
    const alpha = classifySql("select stddev(price) from fills", { mode: "paper", rules });
    expect(alpha).toMatchObject({ decision: "forbid", ruleId: "db.alpha-marker" }); // the policy says forbid; the built-in default is ask
    expect(classifySql("select * from signals s join fills f on f.signal_id = s.id", { mode: "paper", rules }).decision).toBe("forbid");
    expect(classifySql("select count(*) from candles", { mode: "paper", rules }).decision).toBe("allow");
  });

  it("deniedFunctions.allow lifts exactly the named built-in denial", () => {
    const rules = sqlRulesFor(variant(LIFT_SLEEP).database);
    expect(classifySql("select pg_sleep(40)", { mode: "test", rules }).decision).toBe("allow");
    expect(classifySql("select pg_catalog.pg_sleep(1)", { mode: "test", rules }).decision).toBe("allow");
    // the rest of the pg_sleep* family stays denied
    expect(classifySql("select pg_sleep_for('1 second')", { mode: "test", rules }).decision).toBe("forbid");
    expect(classifyQuestDb("select pg_sleep(1)", { mode: "test", rules }).decision).not.toBe("forbid");
  });

  it("a phase policy cannot lift what the daemon's policy does not, and the daemon's lift needs the phase's too", () => {
    const lifted = variant(LIFT_SLEEP);
    expect(classifySql("select pg_sleep(1)", { mode: "test", rules: sqlRulesFor(combine(base, lifted).database) }).decision).toBe("forbid");
    expect(classifySql("select pg_sleep(1)", { mode: "test", rules: sqlRulesFor(combine(lifted, base).database) }).decision).toBe("forbid");
    expect(classifySql("select pg_sleep(1)", { mode: "test", rules: sqlRulesFor(combine(lifted, lifted).database) }).decision).toBe("allow");
  });

  it("the policy's alpha-marker decision and extra denied functions are what the classifier applies", () => {
    const ask = variant((y) => y.replace(/(id: db\.anti-alpha\n\s+clause: [^\n]+\n\s+decision:) forbid/, "$1 ask"));
    expect(classifySql("select corr(a, b) from fills", { mode: "paper", rules: sqlRulesFor(ask.database) }).decision).toBe("ask");
    const extra = variant((y) => y.replace(/functions: \[pg_read_file/, "functions: [risk_reset, pg_read_file"));
    expect(classifySql("select risk_reset()", { mode: "test", rules: sqlRulesFor(extra.database) })).toMatchObject({
      decision: "forbid",
      ruleId: "db.denied-function",
    });
    expect(classifySql("select risk_reset()", { mode: "test", rules: sqlRulesFor(base.database) }).decision).toBe("allow");
  });

  it("the same content gives the same rules object (shared compiled rules and verdict caches)", () => {
    expect(sqlRulesFor(base.database)).toBe(sqlRulesFor(parsePolicy(text, "again.yaml").database));
    expect(sqlRulesFor(base.database)).not.toBe(sqlRulesFor(variant(LIFT_SLEEP).database));
  });
});
