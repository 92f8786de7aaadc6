/**
 * PhaseRecorder.recordMany: several events recorded in order, durable
 * together — one journal batch (one durable write) and one build-log
 * append — with secrets scrubbed as `record` does.
 */
import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { BuildLog } from "../../src/audit/buildlog.js";
import { AuditJournal, JOURNAL_FILE } from "../../src/audit/journal.js";
import { Redactor } from "../../src/audit/redact.js";
import { PhaseRecorder } from "../../src/phases/recorder.js";
import { systemClock } from "../../src/util/clock.js";

const dirs: string[] = [];
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

describe("PhaseRecorder.recordMany", () => {
  it("records every event in order with one journal batch and one build-log append", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-recmany-"));
    dirs.push(dir);
    const journal = await AuditJournal.open(dir, { clock: systemClock });
    const build = new BuildLog(path.join(dir, "build_audit.log"));
    const rec = new PhaseRecorder("ph1", journal, build, new Redactor(["s3cr3t-value"]));
    try {
      const before = journal.counters;
      const records = await rec.recordMany([
        { event: { type: "db.query", sql: "SELECT 1" }, lines: ["[t] DB_QUERY [PostgreSQL]: SELECT 1"] },
        { event: { type: "db.query", sql: "SELECT 's3cr3t-value'" }, lines: ["[t] DB_QUERY [PostgreSQL]: SELECT 's3cr3t-value'"] },
        { event: { type: "db.result", rows: 1 }, lines: ["[t] DB_RESULT: 1 rows returned"] },
      ]);
      expect(records.map((r) => r.type)).toEqual(["db.query", "db.query", "db.result"]);
      expect(records.map((r) => r.seq)).toEqual([records[0]!.seq, records[0]!.seq + 1, records[0]!.seq + 2]);
      expect(journal.counters.batches - before.batches).toBe(1);
      expect(journal.counters.records - before.records).toBe(3);
      expect(await rec.recordMany([])).toEqual([]);
    } finally {
      await journal.close();
      await build.close();
    }
    const lines = (await readFile(path.join(dir, JOURNAL_FILE), "utf8")).trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.map((l) => [l.type, l.phase])).toEqual([
      ["db.query", "ph1"],
      ["db.query", "ph1"],
      ["db.result", "ph1"],
    ]);
    expect(JSON.stringify(lines)).not.toContain("s3cr3t-value");
    const log = await readFile(path.join(dir, "build_audit.log"), "utf8");
    expect(log.split("\n").filter(Boolean)).toHaveLength(3);
    expect(log).not.toContain("s3cr3t-value");
    expect(log.indexOf("SELECT 1")).toBeLessThan(log.indexOf("DB_RESULT"));
  });

  it("groups the build-log lines of concurrent calls into shared appends, each call resolving once its lines are durable", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-recmany-"));
    dirs.push(dir);
    const journal = await AuditJournal.open(dir, { clock: systemClock });
    const build = new BuildLog(path.join(dir, "build_audit.log"));
    const appends: number[] = [];
    const real = build.append.bind(build);
    build.append = (lines) => {
      appends.push(lines.length);
      return real(lines);
    };
    const rec = new PhaseRecorder("ph1", journal, build, new Redactor([]));
    try {
      const one = (i: number) => rec.recordMany([{ event: { type: "db.query", n: i }, lines: [`line ${i}`] }]);
      // three in the same tick: one append; then two while that one is in flight: one more
      const first = [one(1), one(2), one(3)];
      await Promise.resolve();
      const later = [one(4), one(5)];
      await Promise.all([...first, ...later]);
      expect(appends).toEqual([3, 2]);
    } finally {
      await journal.close();
      await build.close();
    }
    const log = (await readFile(path.join(dir, "build_audit.log"), "utf8")).trim().split("\n");
    expect(log).toEqual(["line 1", "line 2", "line 3", "line 4", "line 5"]);
  });
});
