import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { constants } from "node:fs";
import { appendFile, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { canonicalJson } from "../../src/audit/canonical.js";
import {
  ANCHOR_BYTES,
  ANCHOR_FILE,
  AuditJournal,
  GENESIS_HASH,
  JOURNAL_FILE,
  LOCK_FILE,
  nodeJournalFs,
  type AuditRecord,
  type JournalFs,
} from "../../src/audit/journal.js";
import { Redactor } from "../../src/audit/redact.js";
import { describeVerifyResult, verifyJournal } from "../../src/audit/verify.js";
import { SandboxdError } from "../../src/errors.js";
import type { Clock } from "../../src/util/clock.js";

function fixedClock(): Clock {
  let ms = Date.UTC(2025, 0, 28, 14, 32, 1, 0);
  let mono = 0;
  return {
    now: () => new Date(ms++),
    monotonicMs: () => (mono += 1),
  };
}

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), "sbx-journal-"));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

const journalPath = () => path.join(dir, JOURNAL_FILE);
const readLines = async () => (await readFile(journalPath(), "utf8")).split("\n").filter((l) => l !== "");
const writeLines = (lines: string[]) => writeFile(journalPath(), lines.map((l) => `${l}\n`).join(""));

async function fill(n: number, opts: { anchor?: boolean } = {}): Promise<AuditRecord[]> {
  const j = await AuditJournal.open(dir, { clock: fixedClock(), ...opts });
  const out: AuditRecord[] = [];
  for (let i = 0; i < n; i++) {
    out.push(await j.append({ type: "shell.exec", phase: "ph_1", rule: "shell.allow.pytest", clause: "§2", argv: ["pytest", `t${i}`] }));
  }
  await j.close();
  return out;
}

/** Real fs, with a hook on every call; `journalFd` is the fd of audit.jsonl. */
function hookedFs(hook: (op: keyof JournalFs, fd: number | string, isJournal: boolean) => void): JournalFs & { journalFd: number } {
  const state = { journalFd: -1 };
  const isJ = (fd: number | string) => fd === state.journalFd;
  return Object.assign(state, {
    ...nodeJournalFs,
    open: async (file: string, flags: number, mode: number) => {
      const fd = await nodeJournalFs.open(file, flags, mode);
      if (file.endsWith(JOURNAL_FILE)) state.journalFd = fd;
      return fd;
    },
    write: async (fd: number, b: Buffer, o: number, l: number) => {
      hook("write", fd, isJ(fd));
      return nodeJournalFs.write(fd, b, o, l);
    },
    fdatasync: async (fd: number) => {
      hook("fdatasync", fd, isJ(fd));
      return nodeJournalFs.fdatasync(fd);
    },
    writeAt: async (fd: number, b: Buffer, o: number, l: number, p: number) => {
      hook("writeAt", fd, isJ(fd));
      return nodeJournalFs.writeAt(fd, b, o, l, p);
    },
  });
}

function errno(code: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`${code}: injected`), { code });
}

describe("audit.jsonl record format", () => {
  it("chains records from 64 zeros with hash = sha256(prev || canonical(record without hash))", async () => {
    const [r1, r2] = await fill(2);
    expect(r1!.seq).toBe(1);
    expect(r1!.prev).toBe(GENESIS_HASH);
    expect(r2!.prev).toBe(r1!.hash);
    const lines = await readLines();
    expect(lines).toHaveLength(2);
    // recompute independently of src/audit: sorted keys, no whitespace (all values here are ASCII)
    for (const line of lines) {
      const rec = JSON.parse(line) as Record<string, unknown>;
      const { hash, ...rest } = rec;
      const sorted = (v: unknown): unknown =>
        Array.isArray(v) ? v.map(sorted) : v && typeof v === "object" ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, sorted((v as Record<string, unknown>)[k])])) : v;
      const canon = JSON.stringify(sorted(rest));
      expect(createHash("sha256").update(`${rec.prev as string}${canon}`).digest("hex")).toBe(hash);
      expect(line).toBe(JSON.stringify(sorted(rec)));
    }
    expect(JSON.parse(lines[0]!)).toMatchObject({ seq: 1, ts: "2025-01-28T14:32:01.000Z", type: "shell.exec", phase: "ph_1", rule: "shell.allow.pytest", clause: "§2" });
    expect((await stat(journalPath())).mode & 0o777).toBe(0o600);
    const anchor = await readFile(path.join(dir, ANCHOR_FILE));
    expect(anchor.length).toBe(ANCHOR_BYTES); // overwritten in place, always the same size
    expect(JSON.parse(anchor.toString())).toEqual({ seq: 2, hash: r2!.hash });
    expect((await stat(path.join(dir, ANCHOR_FILE))).mode & 0o777).toBe(0o600);
  });

  it("continues the chain across close and reopen", async () => {
    const first = await fill(5);
    const more = await fill(5);
    expect(more[0]!.seq).toBe(6);
    expect(more[0]!.prev).toBe(first[4]!.hash);
    const r = await verifyJournal(dir);
    expect(r).toMatchObject({ ok: true, records: 10, lastSeq: 10, lastHash: more[4]!.hash, tornTailBytes: 0 });
    expect(describeVerifyResult(r)).toMatch(/intact up to 10/);
  });

  it("writes hostile command text as exactly one line that parses back identical", async () => {
    const j = await AuditJournal.open(dir, { clock: fixedClock() });
    const hostile = [
      'echo "a"\n{"seq":99,"type":"forged"}',
      "line1\r\nline2\rline3",
      "\u001b[2J\u001b[31mred\u001b[0m",
      'quote " backslash \\ }{ ][',
      "sep\u2028para\u2029nel\u0085del\u007f",
      "nul\u0000bell\u0007",
      "emoji 😀 and 日本語",
    ];
    for (const cmd of hostile) await j.append({ type: "shell.exec", command: cmd, argv: [cmd] });
    const lone = await j.append({ type: "shell.exec", command: "lone \ud800 high, \udc00 low, pair \ud83d\ude00" });
    await j.close();
    const lines = await readLines();
    expect(lines).toHaveLength(hostile.length + 1);
    for (const [i, cmd] of hostile.entries()) {
      const rec = JSON.parse(lines[i]!) as { command: string; argv: string[] };
      expect(rec.command).toBe(cmd);
      expect(rec.argv).toEqual([cmd]);
      expect(lines[i]).not.toMatch(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/);
    }
    // lone surrogates have no UTF-8 form: replaced with U+FFFD before hashing, pairs kept
    expect(lone.command).toBe("lone \uFFFD high, \uFFFD low, pair 😀");
    expect((JSON.parse(lines.at(-1)!) as { command: string }).command).toBe(lone.command);
    // Python's splitlines (which also breaks on U+2028, U+0085) would see the same number of lines
    const raw = await readFile(journalPath(), "utf8");
    expect(raw.split(/\r\n|[\n\r\u000b\u000c\u001c-\u001e\u0085\u2028\u2029]/).filter(Boolean)).toHaveLength(hostile.length + 1);
    expect((await verifyJournal(dir)).ok).toBe(true);
  });

  it("scrubs secrets from every string value before hashing, never a key, the type or an id field", async () => {
    const redactor = new Redactor(["hunter2-secret", "quest"]);
    const j = await AuditJournal.open(dir, { clock: fixedClock(), redactor });
    const rec = await j.append({
      type: "approval.request",
      rule: "quest",
      command: "psql -p hunter2-secret -W quest",
      requestReason: "requests: 3; questdb ok",
      nested: { "key hunter2-secret": ["x hunter2-secret"], decision: "quest" },
    });
    await j.close();
    expect(rec.command).toBe("psql -p [REDACTED] -W [REDACTED]");
    expect(rec.type).toBe("approval.request");
    expect(rec.rule).toBe("quest");
    expect(rec.requestReason).toBe("requests: 3; questdb ok");
    const raw = await readFile(journalPath(), "utf8");
    expect(raw).not.toContain("x hunter2");
    // keys are the daemon's: never rewritten
    expect(raw).toContain('{"decision":"quest","key hunter2-secret":["x [REDACTED]"]}');
    expect((await verifyJournal(dir)).ok).toBe(true);
  });

  it("rejects bad events without taking a seq or failing the journal", async () => {
    const j = await AuditJournal.open(dir, { clock: fixedClock() });
    await expect(j.append({ type: "x", seq: 5 })).rejects.toMatchObject({ code: "SBX_ERR_INTERNAL" });
    await expect(j.append({ type: "x", n: Number.NaN })).rejects.toMatchObject({ code: "SBX_ERR_INTERNAL" });
    await expect(j.append({ type: "x", when: new Date() })).rejects.toMatchObject({ code: "SBX_ERR_INTERNAL" });
    await expect(j.append({ type: "" })).rejects.toMatchObject({ code: "SBX_ERR_INTERNAL" });
    expect(j.failed).toBeNull();
    expect((await j.append({ type: "ok" })).seq).toBe(1);
    await j.close();
    await expect(j.append({ type: "late" })).rejects.toMatchObject({ code: "SBX_ERR_INTERNAL" });
  });
});

describe("one writer per journal", () => {
  it("refuses a second writer while the first is open; takes over the lock of a dead one", async () => {
    const j = await AuditJournal.open(dir, { clock: fixedClock() });
    const err = await AuditJournal.open(dir, { clock: fixedClock() }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "SBX_ERR_AUDIT_FAILED", message: expect.stringContaining(`process ${process.pid}`) });
    expect((err as SandboxdError).hint).toMatch(/state-dir/);
    await j.append({ type: "still.fine" });
    await j.close();
    await expect(stat(path.join(dir, LOCK_FILE))).rejects.toMatchObject({ code: "ENOENT" });
    const dead = spawnSync("true").pid;
    await writeFile(path.join(dir, LOCK_FILE), `${dead}\n`);
    const j2 = await AuditJournal.open(dir, { clock: fixedClock() });
    expect((await readFile(path.join(dir, LOCK_FILE), "utf8")).split(" ")[0]).toBe(String(process.pid));
    await j2.close();
  });
});

describe("audit verify names the first bad record", () => {
  it("(a) a middle record's field edited and re-serialised", async () => {
    await fill(10);
    const lines = await readLines();
    const rec = JSON.parse(lines[4]!) as Record<string, unknown>;
    rec.argv = ["rm", "-rf", "/"];
    lines[4] = canonicalJson(rec);
    await writeLines(lines);
    const r = await verifyJournal(dir);
    expect(r).toMatchObject({ ok: false, badSeq: 5, verifiedUpTo: 4 });
    expect(r.ok === false && r.reason).toMatch(/hash mismatch/);
    expect(describeVerifyResult(r)).toMatch(/broken at seq 5/);
  });

  it("(a') a middle record edited and its own hash recomputed: the next link breaks", async () => {
    await fill(10);
    const lines = await readLines();
    const { hash: _old, ...rest } = JSON.parse(lines[4]!) as Record<string, unknown> & { prev: string };
    rest.argv = ["rm", "-rf", "/"];
    const hash = createHash("sha256").update(rest.prev).update(canonicalJson(rest)).digest("hex");
    lines[4] = canonicalJson({ ...rest, hash });
    await writeLines(lines);
    expect(await verifyJournal(dir)).toMatchObject({ ok: false, badSeq: 6, verifiedUpTo: 5, reason: expect.stringMatching(/prev does not match/) });
  });

  it("(b) a middle record deleted", async () => {
    await fill(10);
    const lines = await readLines();
    lines.splice(4, 1);
    await writeLines(lines);
    expect(await verifyJournal(dir)).toMatchObject({ ok: false, badSeq: 5, verifiedUpTo: 4, reason: expect.stringMatching(/expected seq 5, found seq 6/) });
  });

  it("(c) the tail truncated: the anchor catches it, and open refuses to continue", async () => {
    await fill(10);
    const lines = await readLines();
    await writeLines(lines.slice(0, 7));
    expect(await verifyJournal(dir)).toMatchObject({ ok: false, badSeq: 8, verifiedUpTo: 7, reason: expect.stringMatching(/^truncated: anchor says 10/) });
    await expect(AuditJournal.open(dir, { clock: fixedClock() })).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_CORRUPT", message: expect.stringMatching(/truncated/) });
  });

  it("(c') an acknowledged last record cut short is truncation, not a torn write", async () => {
    await fill(10);
    const raw = await readFile(journalPath());
    await writeFile(journalPath(), raw.subarray(0, raw.length - 20));
    expect(await verifyJournal(dir)).toMatchObject({ ok: false, badSeq: 10, reason: expect.stringMatching(/^truncated: anchor says 10/) });
    await expect(AuditJournal.open(dir, { clock: fixedClock() })).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_CORRUPT" });
  });

  it("(d) a torn final line after the anchor is dropped on open, recorded, and the chain continues", async () => {
    const recs = await fill(5);
    const torn = '{"clause":"§2","hash":"3f2a';
    await appendFile(journalPath(), torn);
    const before = await verifyJournal(dir);
    expect(before).toMatchObject({ ok: true, lastSeq: 5, tornTailBytes: Buffer.byteLength(torn) });
    const j = await AuditJournal.open(dir, { clock: fixedClock() });
    const next = await j.append({ type: "after" });
    await j.close();
    const lines = await readLines();
    expect(lines).toHaveLength(7);
    const dropped = JSON.parse(lines[5]!) as AuditRecord;
    expect(dropped).toMatchObject({
      seq: 6,
      prev: recs[4]!.hash,
      type: "audit.torn_record_dropped",
      bytes: Buffer.byteLength(torn),
      afterSeq: 5,
      sha256: createHash("sha256").update(torn).digest("hex"),
    });
    expect(next).toMatchObject({ seq: 7, prev: dropped.hash });
    expect(await verifyJournal(dir)).toMatchObject({ ok: true, lastSeq: 7, tornTailBytes: 0 });
  });

  it("(e) two records swapped", async () => {
    await fill(10);
    const lines = await readLines();
    [lines[3], lines[4]] = [lines[4]!, lines[3]!];
    await writeLines(lines);
    expect(await verifyJournal(dir)).toMatchObject({ ok: false, badSeq: 4, verifiedUpTo: 3 });
  });

  it("a whitespace-only edit, a duplicate line and a garbage line", async () => {
    await fill(6);
    const lines = await readLines();
    await writeLines(lines.map((l, i) => (i === 2 ? l.replace(/,/, ", ") : l)));
    expect(await verifyJournal(dir)).toMatchObject({ ok: false, badSeq: 3, reason: expect.stringMatching(/canonical form/) });
    await writeLines([...lines.slice(0, 3), lines[2]!, ...lines.slice(3)]);
    expect(await verifyJournal(dir)).toMatchObject({ ok: false, badSeq: 4, reason: expect.stringMatching(/found seq 3 again/) });
    await writeLines([...lines.slice(0, 3), "not json", ...lines.slice(3)]);
    expect(await verifyJournal(dir)).toMatchObject({ ok: false, badSeq: 4, reason: expect.stringMatching(/not valid JSON/) });
  });

  it("the anchor rewritten to a different hash", async () => {
    await fill(4);
    await writeFile(path.join(dir, ANCHOR_FILE), JSON.stringify({ seq: 3, hash: "a".repeat(64) }));
    expect(await verifyJournal(dir)).toMatchObject({ ok: false, badSeq: 3, reason: expect.stringMatching(/audit.anchor/) });
  });

  it("a missing anchor is recorded on open; an empty state dir verifies as 0 records", async () => {
    expect(await verifyJournal(dir)).toMatchObject({ ok: true, records: 0 });
    await fill(3);
    await rm(path.join(dir, ANCHOR_FILE));
    expect(await verifyJournal(dir)).toMatchObject({ ok: true, lastSeq: 3, anchor: null });
    const j = await AuditJournal.open(dir, { clock: fixedClock() });
    await j.close();
    const last = JSON.parse((await readLines()).at(-1)!) as AuditRecord;
    expect(last).toMatchObject({ seq: 4, type: "audit.anchor_missing", afterSeq: 3 });
    expect(await verifyJournal(dir)).toMatchObject({ ok: true, lastSeq: 4, anchor: { seq: 4 } });
  });
});

describe("fail closed", () => {
  it("ENOSPC on the Nth write: that append and every later one reject; nothing after it is acknowledged", async () => {
    let writes = 0;
    const jfs = hookedFs((op, _fd, isJournal) => {
      if (op === "write" && isJournal && ++writes === 4) throw errno("ENOSPC");
    });
    const j = await AuditJournal.open(dir, { clock: fixedClock(), fs: jfs });
    for (let i = 1; i <= 3; i++) expect((await j.append({ type: "ok", i })).seq).toBe(i);
    const err = await j.append({ type: "lost" }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SandboxdError);
    expect(err).toMatchObject({ code: "SBX_ERR_AUDIT_FAILED", status: 503 });
    expect((err as Error).message).toContain("ENOSPC");
    expect((err as Error).message).toContain(journalPath());
    expect(j.failed).toBe(err);
    const later = await Promise.allSettled([j.append({ type: "later1" }), j.append({ type: "later2" })]);
    for (const r of later) expect(r).toMatchObject({ status: "rejected", reason: { code: "SBX_ERR_AUDIT_FAILED" } });
    expect(writes).toBe(4); // nothing was even attempted after the failure
    await j.close();
    expect(await readLines()).toHaveLength(3);
    expect(await verifyJournal(dir)).toMatchObject({ ok: true, lastSeq: 3, anchor: { seq: 3 } });
  });

  it("recovers by itself when space returns: the gap is recorded with its cause, deferred ends follow, the chain goes on", async () => {
    let full = false;
    const jfs = hookedFs((op, _fd, isJournal) => {
      if (full && op === "write" && isJournal) throw errno("ENOSPC");
    });
    const j = await AuditJournal.open(dir, { clock: fixedClock(), fs: jfs, recoverProbeMs: 20 });
    for (let i = 1; i <= 3; i++) await j.append({ type: "ok", i });
    full = true;
    await expect(j.append({ type: "lost" })).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_FAILED" });
    await expect(j.append({ type: "refused" })).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_FAILED" });
    j.deferUntilRecovered({ type: "phase.complete", phase: "ph_1", reason: "stopped while the disk was full" });
    await new Promise((r) => setTimeout(r, 100)); // probes keep failing while the disk is full
    expect(j.failed).not.toBeNull();
    full = false;
    await new Promise<void>((r) => j.onRecovered(r));
    expect(j.failed).toBeNull();
    const next = await j.append({ type: "after" });
    await j.close();
    const recs = (await readLines()).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(recs.map((r) => r.type)).toEqual(["ok", "ok", "ok", "audit.gap", "phase.complete", "after"]);
    expect(recs[3]).toMatchObject({ seq: 4, errno: "ENOSPC", op: "write", afterSeq: 3, refusedAppends: 2 });
    expect(String(recs[3]!.cause)).toMatch(/ENOSPC/);
    expect(next.seq).toBe(6);
    expect(await verifyJournal(dir)).toMatchObject({ ok: true, lastSeq: 6, anchor: { seq: 6 } });
  });

  it("EIO on the durable write (O_DSYNC: where a failed writeback shows) rejects the whole in-flight batch and everything queued behind it", async () => {
    let writes = 0;
    const jfs = hookedFs((op, _fd, isJournal) => {
      if (op === "write" && isJournal && ++writes === 2) throw errno("EIO");
    });
    const j = await AuditJournal.open(dir, { clock: fixedClock(), fs: jfs });
    await j.append({ type: "first" });
    const batch = await Promise.allSettled(Array.from({ length: 20 }, (_, i) => j.append({ type: "b", i })));
    expect(batch.every((r) => r.status === "rejected" && (r.reason as SandboxdError).code === "SBX_ERR_AUDIT_FAILED")).toBe(true);
    expect(j.failed?.message).toMatch(/write failed with EIO/);
    await j.close();
    // the bytes may be in the file (written, not synced), but none was acknowledged and the chain still verifies
    expect((await verifyJournal(dir)).ok).toBe(true);
  });

  it("a failed anchor update fails the journal too", async () => {
    let anchorWrites = 0;
    const jfs = hookedFs((op) => {
      if (op === "writeAt" && ++anchorWrites === 3) throw errno("EIO");
    });
    const j = await AuditJournal.open(dir, { clock: fixedClock(), fs: jfs }); // anchor write 1: the initial anchor
    await j.append({ type: "one" }); // anchor write 2
    await expect(j.append({ type: "two" })).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_FAILED", message: expect.stringMatching(/anchor update failed with EIO/) });
    await expect(j.append({ type: "three" })).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_FAILED" });
    await j.close();
  });

  it("open reports an unwritable state dir as SBX_ERR_AUDIT_FAILED", async () => {
    const jfs: JournalFs = { ...nodeJournalFs, open: () => Promise.reject(errno("EACCES")) };
    await expect(AuditJournal.open(dir, { clock: fixedClock(), fs: jfs })).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_FAILED", message: expect.stringMatching(/EACCES/) });
  });
});

describe("group commit", () => {
  it("1000 concurrent appends share far fewer than 1000 durable writes, in seq order", async () => {
    let syncs = 0;
    let writes = 0;
    const jfs = hookedFs((op, _fd, isJournal) => {
      if (isJournal && op === "fdatasync") syncs++;
      if (isJournal && op === "write") writes++;
    });
    const j = await AuditJournal.open(dir, { clock: fixedClock(), fs: jfs });
    const recs = await Promise.all(Array.from({ length: 1000 }, (_, i) => j.append({ type: "burst", i })));
    expect(recs.map((r) => r.seq)).toEqual(Array.from({ length: 1000 }, (_, i) => i + 1));
    expect(writes).toBeGreaterThan(0);
    expect(writes).toBeLessThan(10);
    expect(syncs).toBe(0); // each write is durable itself: the file is O_DSYNC (next test)
    expect(j.counters).toEqual({ batches: writes, records: 1000 });
    await j.close();
    expect(await verifyJournal(dir)).toMatchObject({ ok: true, lastSeq: 1000 });
  });

  it("the journal is written O_DSYNC: a write returns once it is durable, as write+fdatasync would", async () => {
    const jfs = hookedFs(() => undefined);
    const j = await AuditJournal.open(dir, { clock: fixedClock(), fs: jfs });
    await j.append({ type: "one" });
    // the kernel's own view of the descriptor's flags (octal): O_DSYNC is 010000 on Linux
    const flags = /^flags:\s+([0-7]+)$/m.exec(await readFile(`/proc/self/fdinfo/${jfs.journalFd}`, "utf8"))?.[1];
    expect(flags).toBeDefined();
    expect(Number.parseInt(flags!, 8) & constants.O_DSYNC).toBe(constants.O_DSYNC);
    expect(constants.O_DSYNC).toBe(0o10000);
    await j.close();
  });

  it("appends arriving while a write is in flight go into the next single write", async () => {
    let writes = 0;
    let release: (() => void) | null = null;
    const jfs = hookedFs(() => undefined);
    const gated: JournalFs = {
      ...jfs,
      write: async (fd, b, o, l) => {
        if (fd === jfs.journalFd) {
          writes++;
          if (writes === 1) await new Promise<void>((r) => (release = r));
        }
        return nodeJournalFs.write(fd, b, o, l);
      },
    };
    const j = await AuditJournal.open(dir, { clock: fixedClock(), fs: gated });
    const first = j.append({ type: "first" });
    await new Promise((r) => setTimeout(r, 20));
    expect(writes).toBe(1); // first batch is stuck in its write
    const rest = Array.from({ length: 50 }, (_, i) => j.append({ type: "queued", i }));
    let firstDone = false;
    void first.then(() => (firstDone = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(firstDone).toBe(false); // not acknowledged before its write returns
    release!();
    await first;
    await Promise.all(rest);
    expect(writes).toBe(2);
    await j.close();
  });
});
