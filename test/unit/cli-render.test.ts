import { describe, expect, it } from "vitest";
import { renderRecord } from "../../src/cli/render.js";
import type { AuditRecord } from "../../src/audit/journal.js";

const base = { seq: 7, ts: "2026-12-04T19:00:00.000Z", phase: "ph_0123456789ab", prev: "x", hash: "y" };

describe("audit records as the CLI prints them", () => {
  it("a db.query shows its engine and SQL, control characters escaped", () => {
    const line = renderRecord({ ...base, type: "db.query", engine: "postgres", sql: "SELECT *\nFROM orders", decision: "allow", rule: "db.read" } as unknown as AuditRecord);
    expect(line).toContain("ALLOW");
    expect(line).toContain("postgres: SELECT *\\nFROM orders");
  });
  it("a net.connect shows where it went", () => {
    const line = renderRecord({ ...base, type: "net.connect", service: null, address: "10.0.0.5", port: 443, decision: "forbid", rule: "net.unlisted-destination" } as unknown as AuditRecord);
    expect(line).toContain("10.0.0.5:443");
  });
  it("an exec verdict shows its command", () => {
    const line = renderRecord({ ...base, type: "exec.verdict", argv: ["pytest", "-q"], decision: "allow", rule: "shell.whitelist" } as unknown as AuditRecord);
    expect(line).toMatch(/ALLOW\s+shell\.whitelist\s+pytest -q/);
  });
});
