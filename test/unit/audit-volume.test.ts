/**
 * The audit trail stays bounded (issue 11): untrusted text capped per field
 * with its byte count and SHA-256, a per-phase budget past which new work is
 * refused (SBX_ERR_AUDIT_BUDGET) while the ends of work under way are still
 * recorded and the refused records are summarised.
 */
import { createHash } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { AuditBudget } from "../../src/audit/budget.js";
import { BuildLog } from "../../src/audit/buildlog.js";
import { AuditJournal, JOURNAL_FILE } from "../../src/audit/journal.js";
import { Redactor } from "../../src/audit/redact.js";
import { verifyJournal } from "../../src/audit/verify.js";
import { PhaseRecorder } from "../../src/phases/recorder.js";
import { DEFAULT_AUDIT, type AuditPolicy } from "../../src/policy/schema.js";
import type { Clock } from "../../src/util/clock.js";

const dirs: string[] = [];
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

function manualClock(): Clock & { advance(ms: number): void } {
  let t = 0;
  return { now: () => new Date(Date.UTC(2026, 0, 1) + t), monotonicMs: () => t, advance: (ms) => (t += ms) };
}

async function setup(audit: AuditPolicy, clock = manualClock()) {
  const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-volume-"));
  dirs.push(dir);
  const journal = await AuditJournal.open(dir, { clock });
  const build = new BuildLog(path.join(dir, "build_audit.log"));
  const spent: string[] = [];
  const rec = new PhaseRecorder("ph_000000000001", journal, build, new Redactor(["s3cr3t-value-123"], { onWarning: () => undefined }), {
    audit: () => audit,
    clock,
    onSpent: (w) => spent.push(w),
  });
  const close = async () => {
    await journal.close();
    await build.close();
  };
  const records = async () =>
    (await readFile(path.join(dir, JOURNAL_FILE), "utf8"))
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as Record<string, any>);
  return { dir, journal, build, rec, spent, close, records, clock, buildText: () => readFile(path.join(dir, "build_audit.log"), "utf8") };
}

describe("untrusted text is capped with its byte count and SHA-256", () => {
  it("a 1 MiB SQL statement keeps its head; the record says how long it was and its hash; output fields are left to the exec's own cap", async () => {
    const s = await setup({ ...DEFAULT_AUDIT, textCapBytes: 1024 });
    const sql = `SELECT '${"x".repeat(1024 * 1024)}' -- s3cr3t-value-123`;
    const out = "y".repeat(5000);
    await s.rec.record({ type: "db.query", sql, stdout: out, argv: ["a", "é".repeat(2000)] }, [`[2026-01-01T00:00:00.000Z] DB_QUERY [PostgreSQL]: ${sql}`]);
    await s.close();
    const r = (await s.records())[0]!;
    const scrubbed = sql.replace("s3cr3t-value-123", "[REDACTED]");
    expect(Buffer.byteLength(r.sql)).toBeLessThanOrEqual(1024 + 3);
    expect(r.sql.endsWith("…")).toBe(true);
    expect(r.capped.sql).toEqual({ bytes: Buffer.byteLength(scrubbed), sha256: createHash("sha256").update(scrubbed).digest("hex") });
    expect(r.capped["argv.1"].bytes).toBe(4000);
    expect(r.argv[1]).toBe(`${"é".repeat(512)}…`);
    expect(r.stdout).toBe(out);
    expect(r.capped.stdout).toBeUndefined();
    const log = await s.buildText();
    expect(log.length).toBeLessThan(2000);
    expect(log).toMatch(/… \[\d+ more bytes not kept; \d+ bytes, sha256 [0-9a-f]{64}\]\n$/);
    expect(JSON.stringify(r)).not.toContain("s3cr3t");
    expect((await verifyJournal(s.dir)).ok).toBe(true);
  });
});

describe("the per-phase budget", () => {
  it("bytes: past the budget, new work is refused with SBX_ERR_AUDIT_BUDGET, ends of work still recorded, refusals summarised at the end", async () => {
    const s = await setup({ ...DEFAULT_AUDIT, phaseBudget: { bytes: 4000, recordsPerSecond: 1000, burstRecords: 1000 } });
    let refusedAt = -1;
    for (let i = 0; i < 100; i++) {
      const ok = await s.rec.record({ type: "exec.verdict", argv: ["echo", "z".repeat(200)] }, ["[2026-01-01T00:00:00.000Z] SHELL_EXEC: echo"]).then(
        () => true,
        (e: { code?: string }) => {
          expect(e.code).toBe("SBX_ERR_AUDIT_BUDGET");
          return false;
        },
      );
      if (!ok) {
        refusedAt = i;
        break;
      }
    }
    expect(refusedAt).toBeGreaterThan(3);
    expect(s.spent).toHaveLength(1);
    expect(s.rec.budgetSpent).toMatch(/more than 4000 bytes/);
    await expect(s.rec.recordMany([{ event: { type: "db.query", sql: "SELECT 1" }, lines: [] }])).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_BUDGET" });
    // the end of a command already running, and the phase's end, are still recorded
    await s.rec.record({ type: "exec.result", exitCode: 0 }, []);
    await s.rec.record({ type: "phase.complete", reason: "stopped" }, []);
    await s.close();
    const types = (await s.records()).map((r) => r.type);
    expect(types.filter((t) => t === "audit.budget_spent")).toHaveLength(1);
    expect(types.slice(-3)).toEqual(["exec.result", "audit.budget_summary", "phase.complete"]);
    const summary = (await s.records()).find((r) => r.type === "audit.budget_summary")!;
    expect(summary.refused).toEqual({ "exec.verdict": 1, "db.query": 1 });
    expect(await s.buildText()).toContain("[AUDIT] [BUDGET]");
  });

  it("rate: a burst above burstRecords spends the budget; a steady rate below recordsPerSecond does not", () => {
    const clock = manualClock();
    const steady = new AuditBudget(() => ({ bytes: 1e12, recordsPerSecond: 100, burstRecords: 50 }), clock);
    for (let i = 0; i < 1000; i++) {
      clock.advance(11); // ~90 records/s
      expect(steady.take(1)).toBeNull();
    }
    const burst = new AuditBudget(() => ({ bytes: 1e12, recordsPerSecond: 100, burstRecords: 50 }), clock);
    for (let i = 0; i < 50; i++) expect(burst.take(1)).toBeNull();
    expect(burst.take(1)).toMatch(/more than 100 records\/s/);
    expect(burst.take(1)).toBeNull(); // said once
    expect(burst.spent?.records).toBe(52);
  });
});

describe("HeadTailText: long output keeps its first and last bytes", () => {
  it("matches the head and tail of the whole text, whatever the chunking and the characters", async () => {
    const { HeadTailText } = await import("../../src/phases/exec.js");
    const whole = Array.from({ length: 3000 }, (_, i) => `line ${i} é😀\n`).join("");
    const bytes = Buffer.from(whole);
    for (const chunk of [1, 7, 100, 4096]) {
      const h = new HeadTailText(8192);
      // chunks of whole characters, as the stream decoder and redactor hand them over
      const chars = Array.from(whole);
      for (let i = 0; i < chars.length; i += chunk) h.push(chars.slice(i, i + chunk).join(""));
      expect(h.truncated).toBe(true);
      for (const limit of [8192, 1000]) {
        const v = h.view(limit);
        expect(bytes.subarray(0, Buffer.byteLength(v.head)).toString()).toBe(v.head);
        expect(bytes.subarray(bytes.length - Buffer.byteLength(v.tail)).toString()).toBe(v.tail);
        expect(Buffer.byteLength(v.head)).toBeGreaterThan(limit / 2 - 4);
        expect(Buffer.byteLength(v.tail)).toBeGreaterThan(limit / 2 - 4);
        expect(Buffer.byteLength(v.head) + v.omitted + Buffer.byteLength(v.tail)).toBe(bytes.length);
      }
    }
    const small = new HeadTailText(8192);
    small.push("short\n");
    expect(small.view(1000)).toEqual({ head: "short\n", omitted: 0, tail: "" });
    expect(small.text()).toBe("short\n");
  });
});

describe("build_audit.log rotation", () => {
  it("past rotateBytes the live file's lines move to <dir>/build_audit.log.1 (older shift, keep K), the live file is emptied in place", async () => {
    const { BuildLog } = await import("../../src/audit/buildlog.js");
    const { stat: statFile, readdir } = await import("node:fs/promises");
    const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-rotate-"));
    dirs.push(dir);
    const live = path.join(dir, "build_audit.log");
    const rotated = path.join(dir, "rotated");
    const log = await BuildLog.openSafely(live, 0o644, () => ({ rotateBytes: 100, keep: 2, dir: rotated }));
    const inode = (await statFile(live)).ino;
    for (let i = 0; i < 10; i++) await log.append([`line ${i} ${"x".repeat(30)}`]);
    await log.close();
    expect((await statFile(live)).ino).toBe(inode); // the same file, so a bind mount of it still shows it
    expect((await statFile(live)).size).toBeLessThanOrEqual(100);
    expect((await readdir(rotated)).sort()).toEqual(["build_audit.log.1", "build_audit.log.2"]);
    const all = [await readFile(path.join(rotated, "build_audit.log.2"), "utf8"), await readFile(path.join(rotated, "build_audit.log.1"), "utf8"), await readFile(live, "utf8")].join("");
    // the newest lines, in order, none lost between the files kept; the oldest file dropped
    expect(all.trim().split("\n").map((l) => Number(l.split(" ")[1]))).toEqual([4, 5, 6, 7, 8, 9]);
  });
});

describe("exec.lost: verdicts left open by a daemon that died", () => {
  it("pairs allowed verdicts with their ends by command, first come first served; what is left was lost", async () => {
    const { lostVerdicts } = await import("../../src/phases/reconcile.js");
    let seq = 0;
    const r = (type: string, argv: string[], extra: Record<string, unknown> = {}) => ({ seq: ++seq, ts: "t", prev: "", hash: "", type, argv, command: null, ...extra });
    const recs = [
      r("exec.verdict", ["pytest"], { decision: "allow" }),
      r("exec.verdict", ["sleep", "30"], { decision: "allow" }),
      r("exec.verdict", ["pytest"], { decision: "allow" }),
      r("exec.verdict", ["curl", "x"], { decision: "ask" }),
      r("exec.result", ["pytest"]),
      r("exec.verdict", ["ls"], { decision: "allow" }),
      r("exec.error", ["ls"]),
    ];
    expect(lostVerdicts(recs).map((x) => [x.seq, x.argv])).toEqual([
      [2, ["sleep", "30"]],
      [3, ["pytest"]],
    ]);
    // recorded once: a second restart finds nothing left open
    expect(lostVerdicts([...recs, r("exec.lost", ["sleep", "30"]), r("exec.lost", ["pytest"])])).toEqual([]);
  });
});
