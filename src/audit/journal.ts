/**
 * audit.jsonl: the daemon's hash-chained, fsync'ed audit journal.
 *
 * One line per event, each line the canonical JSON (./canonical.ts) of
 *   {seq, ts, prev, hash, type, phase?, rule?, clause?, ...fields}
 * with hash = sha256_hex( prev_hex || canonical(record without "hash") ),
 * seq from 1, and prev of record 1 = 64 zeros. docs/AUDIT.md has the details
 * and the guarantees.
 *
 * Durability: every append goes through this one writer. `append` resolves
 * only after the record's bytes are written (O_APPEND) and fdatasync'ed, and
 * after audit.anchor names it; callers await it before acting on the decision
 * it records (ARCHITECTURE.md: "fsync'd before the verdict is acted on").
 * Appends that arrive while a write+sync is in flight are batched into the
 * next single write+fdatasync (group commit).
 *
 * Fail closed: the first failed write, sync or anchor update (ENOSPC, EIO,
 * anything) puts the journal in a failed state; that append and every later
 * one reject with SBX_ERR_AUDIT_FAILED naming the errno and the path, so
 * nothing is acted on without a record (SKILLS.md "Audit Trail").
 */
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import { mkdir as mkdirP, readFile, unlink, writeFile } from "node:fs/promises";
import path from "node:path";
import { SandboxdError } from "../errors.js";
import type { Clock } from "../util/clock.js";
import { canonicalJson, canonicalMembers, toWellFormed, withMember } from "./canonical.js";

export const JOURNAL_FILE = "audit.jsonl";
export const ANCHOR_FILE = "audit.anchor";
export const LOCK_FILE = "audit.lock";
export const GENESIS_HASH = "0".repeat(64);

/** What a caller records. `seq`, `ts`, `prev` and `hash` are set by the journal. */
export interface AuditEvent {
  type: string;
  phase?: string;
  /** id of the policy rule that decided, e.g. "shell.forbidden.rm-recursive" */
  rule?: string;
  /** the SKILLS.md clause behind the rule, e.g. "§2 Forbidden" */
  clause?: string;
  [field: string]: unknown;
}

export interface AuditRecord extends AuditEvent {
  seq: number;
  ts: string;
  prev: string;
  hash: string;
}

export interface ChainHead {
  seq: number;
  hash: string;
}

/** Anything with a `redact(text)` method (./redact.ts `Redactor`). */
export interface TextRedactor {
  redact(text: string): string;
}

/**
 * The file-system calls the journal makes, so a unit test can inject ENOSPC
 * on the Nth write or count fdatasync calls. `nodeJournalFs` is the real one.
 */
export interface JournalFs {
  mkdir(dir: string): Promise<void>;
  open(file: string, flags: number, mode: number): Promise<number>;
  close(fd: number): Promise<void>;
  size(fd: number): Promise<number>;
  read(fd: number, buffer: Buffer, offset: number, length: number, position: number): Promise<number>;
  write(fd: number, buffer: Buffer, offset: number, length: number): Promise<number>;
  /** pwrite(2): write at `position`, ignoring the file offset */
  writeAt(fd: number, buffer: Buffer, offset: number, length: number, position: number): Promise<number>;
  fdatasync(fd: number): Promise<void>;
  fsync(fd: number): Promise<void>;
  ftruncate(fd: number, length: number): Promise<void>;
}

function cb<T>(fn: (done: (err: NodeJS.ErrnoException | null, value: T) => void) => void): Promise<T> {
  return new Promise((resolve, reject) => fn((err, value) => (err ? reject(err) : resolve(value))));
}

export const nodeJournalFs: JournalFs = {
  mkdir: async (dir) => {
    await mkdirP(dir, { recursive: true, mode: 0o700 });
  },
  open: (file, flags, mode) => cb<number>((d) => fs.open(file, flags, mode, d)),
  close: (fd) => cb<void>((d) => fs.close(fd, (e) => d(e, undefined))),
  size: (fd) => cb<number>((d) => fs.fstat(fd, (e, st) => d(e, e ? 0 : st.size))),
  read: (fd, buffer, offset, length, position) =>
    cb<number>((d) => fs.read(fd, buffer, offset, length, position, (e, n) => d(e, n))),
  write: (fd, buffer, offset, length) => cb<number>((d) => fs.write(fd, buffer, offset, length, null, (e, n) => d(e, n))),
  fdatasync: (fd) => cb<void>((d) => fs.fdatasync(fd, (e) => d(e, undefined))),
  fsync: (fd) => cb<void>((d) => fs.fsync(fd, (e) => d(e, undefined))),
  ftruncate: (fd, length) => cb<void>((d) => fs.ftruncate(fd, length, (e) => d(e, undefined))),
  writeAt: (fd, buffer, offset, length, position) =>
    cb<number>((d) => fs.write(fd, buffer, offset, length, position, (e, n) => d(e, n))),
};

export interface JournalOptions {
  clock: Clock;
  /** keep audit.anchor up to date (default true) */
  anchor?: boolean;
  fs?: JournalFs;
  /** applied to every string value of every event before it is hashed (not to keys nor OWN_WORDS fields) */
  redactor?: TextRedactor;
  /**
   * How often the anchor is made durable against power loss (fdatasync of
   * audit.anchor), in ms of the injected clock's monotonic time. Default
   * 1000; 0 = after every batch. The anchor is *written* after every batch
   * regardless, before the batch is acknowledged.
   */
  anchorSyncMs?: number;
}

const RESERVED = new Set(["seq", "ts", "prev", "hash"]);
const HEX64 = /^[0-9a-f]{64}$/;

/** hash = sha256_hex(prev || canonical(record without hash)), prev as its 64 ASCII hex characters. */
export function recordHash(withoutHash: Record<string, unknown> & { prev: string }): string {
  return createHash("sha256").update(withoutHash.prev, "utf8").update(canonicalJson(withoutHash), "utf8").digest("hex");
}

/**
 * Checks one parsed line on its own: shape, hash, canonical form. Returns a
 * reason when it is bad, null when it is good. (Chain links are the caller's.)
 */
export function checkRecord(line: string, parsed: unknown): string | null {
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) return "not a JSON object";
  const rec = parsed as Record<string, unknown>;
  if (typeof rec.seq !== "number" || !Number.isSafeInteger(rec.seq) || rec.seq < 1) return "seq is not a positive integer";
  if (typeof rec.prev !== "string" || !HEX64.test(rec.prev)) return "prev is not a sha256 hex digest";
  if (typeof rec.hash !== "string" || !HEX64.test(rec.hash)) return "hash is not a sha256 hex digest";
  if (typeof rec.ts !== "string") return "ts is not a string";
  if (typeof rec.type !== "string" || rec.type === "") return "type is not a non-empty string";
  const { hash, ...rest } = rec;
  let want: string;
  let canon: string;
  try {
    want = recordHash(rest as Record<string, unknown> & { prev: string });
    canon = canonicalJson(rec);
  } catch (e) {
    return `not canonical JSON data (${(e as Error).message})`;
  }
  if (want !== hash) return "hash mismatch: the record's content was changed after it was written";
  if (canon !== line) return "not in canonical form (whitespace, key order or escaping was changed)";
  return null;
}

export function parseAnchor(bytes: Buffer, file: string): ChainHead {
  let parsed: unknown;
  try {
    parsed = JSON.parse(bytes.toString("utf8"));
  } catch {
    throw new SandboxdError("SBX_ERR_AUDIT_CORRUPT", `${file} is not JSON`);
  }
  const a = parsed as Partial<ChainHead> | null;
  if (
    typeof a !== "object" ||
    a === null ||
    typeof a.seq !== "number" ||
    !Number.isSafeInteger(a.seq) ||
    a.seq < 0 ||
    typeof a.hash !== "string" ||
    !HEX64.test(a.hash)
  ) {
    throw new SandboxdError("SBX_ERR_AUDIT_CORRUPT", `${file} does not hold {seq, hash}`);
  }
  return { seq: a.seq, hash: a.hash };
}

function errnoOf(e: unknown): string {
  const code = (e as NodeJS.ErrnoException | null)?.code;
  return typeof code === "string" ? code : "EUNKNOWN";
}

function auditFailed(op: string, file: string, e: unknown): SandboxdError {
  const code = errnoOf(e);
  return new SandboxdError(
    "SBX_ERR_AUDIT_FAILED",
    `audit trail ${op} failed with ${code} on ${file}: ${(e as Error)?.message ?? String(e)}; ` +
      "sandboxd refuses all new work, because nothing may run without a record",
    { cause: e, details: { errno: code, path: file, op } },
  );
}

/**
 * Fields whose values are the daemon's own words — record types, phase,
 * rule and approval ids, verdict words — at any depth. The redactor never
 * touches them, nor any key: a scrubbed `type` or field name breaks every
 * reader that filters on it, and its pattern of damage shows the secret.
 * Every other string value is scanned (token-bounded for short secrets,
 * ./redact.ts), so a caller that puts sandbox text in a new field is safe
 * by default.
 */
export const OWN_WORDS: ReadonlySet<string> = new Set(["type", "phase", "rule", "clause", "decision", "mode", "engine", "approval", "sqlstate"]);

function sanitize(value: unknown, redact: ((s: string) => string) | null): unknown {
  if (typeof value === "string") {
    const w = toWellFormed(value);
    return redact ? redact(w) : w;
  }
  if (Array.isArray(value)) return value.map((v) => sanitize(v, redact));
  if (typeof value === "object" && value !== null) {
    const proto: unknown = Object.getPrototypeOf(value);
    if (proto !== Object.prototype && proto !== null) return value; // canonicalJson rejects it
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) {
      if (v === undefined) continue;
      out[toWellFormed(k)] = sanitize(v, OWN_WORDS.has(k) ? null : redact);
    }
    return out;
  }
  return value;
}

interface Pending {
  line: Buffer;
  record: AuditRecord;
  resolve: (r: AuditRecord) => void;
  reject: (e: unknown) => void;
}

const O_JOURNAL = fs.constants.O_RDWR | fs.constants.O_APPEND | fs.constants.O_CREAT;
const O_ANCHOR = fs.constants.O_RDWR | fs.constants.O_CREAT;
/** The anchor is always this many bytes (JSON padded with spaces, then "\n"), overwritten in place. */
export const ANCHOR_BYTES = 128;

/** `{"hash":"…","seq":N}` padded to ANCHOR_BYTES; JSON.parse ignores the padding. */
export function anchorBytes(head: ChainHead): Buffer {
  const json = canonicalJson({ seq: head.seq, hash: head.hash });
  return Buffer.from(`${json.padEnd(ANCHOR_BYTES - 1, " ")}\n`, "utf8");
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return errnoOf(e) === "EPERM";
  }
}

/**
 * One writer per journal: two daemons appending to the same file would fork
 * the chain. `audit.lock` holds the writer's pid, created O_EXCL; a lock whose
 * process is gone (a crashed daemon) is taken over.
 */
async function acquireLock(dir: string): Promise<string> {
  const file = path.join(dir, LOCK_FILE);
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      await writeFile(file, `${process.pid}\n`, { flag: "wx", mode: 0o600 });
      return file;
    } catch (e) {
      if (errnoOf(e) !== "EEXIST") throw auditFailed("lock", file, e);
    }
    const pid = Number.parseInt(await readFile(file, "utf8").catch(() => ""), 10);
    if (Number.isSafeInteger(pid) && pid > 0 && pidAlive(pid)) {
      throw new SandboxdError(
        "SBX_ERR_AUDIT_FAILED",
        `${path.join(dir, JOURNAL_FILE)} is already being written by process ${pid} (${file}); one writer per audit journal`,
        { hint: "stop the other sandboxd that uses this state dir, or give this one its own --state-dir" },
      );
    }
    await unlink(file).catch(() => undefined); // stale: its writer died
  }
  throw new SandboxdError("SBX_ERR_AUDIT_FAILED", `could not take ${file}: other processes keep creating it`);
}

export class AuditJournal {
  readonly path: string;
  readonly anchorPath: string;
  private readonly fs: JournalFs;
  private readonly clock: Clock;
  private readonly anchorSyncMs: number;
  private readonly redactor: TextRedactor | null;
  private readonly fd: number;
  /** fd of audit.anchor, -1 when the anchor is off */
  private readonly afd: number;
  private readonly lockFile: string;
  /** the anchor file is longer than ANCHOR_BYTES (written by something else): cut it on the next write */
  private anchorOversize: boolean;
  /** last seq/hash handed out (records may still be in flight) */
  private head: ChainHead;
  /** last seq/hash written and synced */
  private synced: ChainHead;
  private queue: Pending[] = [];
  private scheduled = false;
  private flushing = false;
  private failure: SandboxdError | null = null;
  private closed = false;
  private closing: Promise<void> | null = null;
  private idleWaiters: Array<() => void> = [];
  private lastAnchorSync = -Infinity;
  private stats = { batches: 0, records: 0 };

  private constructor(dir: string, fd: number, afd: number, lockFile: string, anchorSize: number, head: ChainHead, opts: JournalOptions) {
    this.lockFile = lockFile;
    this.path = path.join(dir, JOURNAL_FILE);
    this.anchorPath = path.join(dir, ANCHOR_FILE);
    this.fs = opts.fs ?? nodeJournalFs;
    this.clock = opts.clock;
    this.anchorSyncMs = opts.anchorSyncMs ?? 1000;
    this.redactor = opts.redactor ?? null;
    this.fd = fd;
    this.afd = afd;
    this.anchorOversize = anchorSize > ANCHOR_BYTES;
    this.head = { ...head };
    this.synced = { ...head };
  }

  /**
   * Opens (creating if absent) `dir/audit.jsonl` and `dir/audit.anchor` and
   * continues the chain from the last complete line. A torn final line (no
   * trailing newline: a crash mid-write) is cut off when it lies after the
   * anchored seq — it was never acknowledged — and an
   * `audit.torn_record_dropped` record says so. A journal shorter than its
   * anchor, or whose record at the anchored seq has another hash, is refused
   * with SBX_ERR_AUDIT_CORRUPT. Only the tail is checked here; `verifyJournal`
   * checks the whole chain.
   */
  static async open(dir: string, opts: JournalOptions): Promise<AuditJournal> {
    const jfs = opts.fs ?? nodeJournalFs;
    const file = path.join(dir, JOURNAL_FILE);
    const anchorFile = path.join(dir, ANCHOR_FILE);
    const anchorEnabled = opts.anchor ?? true;
    let fd = -1;
    let afd = -1;
    let lockFile: string | null = null;
    const closeAll = async () => {
      if (fd >= 0) await jfs.close(fd).catch(() => undefined);
      if (afd >= 0) await jfs.close(afd).catch(() => undefined);
      if (lockFile) await unlink(lockFile).catch(() => undefined);
    };
    let step = "open";
    let stepFile = file;
    try {
      await jfs.mkdir(dir);
    } catch (e) {
      throw auditFailed("mkdir", dir, e);
    }
    lockFile = await acquireLock(dir);
    try {
      fd = await jfs.open(file, O_JOURNAL, 0o600);
      if (anchorEnabled) {
        stepFile = anchorFile;
        afd = await jfs.open(anchorFile, O_ANCHOR, 0o600);
      }
      // make the two directory entries durable (once per open)
      step = "fsync of the directory";
      stepFile = dir;
      const dfd = await jfs.open(dir, fs.constants.O_RDONLY, 0);
      try {
        await jfs.fsync(dfd);
      } finally {
        await jfs.close(dfd);
      }
    } catch (e) {
      await closeAll();
      throw auditFailed(step, stepFile, e);
    }
    try {
      const tail = await readTail(jfs, fd, file);
      let anchor: ChainHead | null = null;
      let anchorSize = 0;
      if (anchorEnabled) {
        let bytes: Buffer;
        try {
          anchorSize = await jfs.size(afd);
          bytes = await readExactly(jfs, afd, 0, anchorSize);
        } catch (e) {
          throw auditFailed("anchor read", anchorFile, e);
        }
        if (anchorSize > 0) {
          try {
            anchor = parseAnchor(bytes, anchorFile);
          } catch (e) {
            throw new SandboxdError(
              "SBX_ERR_AUDIT_CORRUPT",
              `${(e as Error).message}; run \`sandboxd audit verify\`. If the anchor was damaged in a power failure and the chain verifies, move ${anchorFile} aside and start again`,
            );
          }
        }
        if (anchor && anchor.seq > tail.head.seq) {
          throw new SandboxdError(
            "SBX_ERR_AUDIT_CORRUPT",
            `${file} ends at seq ${tail.head.seq} but ${anchorFile} says ${anchor.seq} records were acknowledged: the journal was truncated`,
          );
        }
        if (anchor && anchor.seq === tail.head.seq && anchor.hash !== tail.head.hash) {
          throw new SandboxdError(
            "SBX_ERR_AUDIT_CORRUPT",
            `record ${anchor.seq} in ${file} does not have the hash ${anchorFile} holds: the journal's tail was rewritten`,
          );
        }
      }
      if (tail.tornBytes > 0) {
        // The torn record's seq is tail.head.seq + 1 > anchor.seq: never acknowledged.
        try {
          await jfs.ftruncate(fd, tail.completeEnd);
          await jfs.fsync(fd);
        } catch (e) {
          throw auditFailed("truncate of a torn final line", file, e);
        }
      }
      const journal = new AuditJournal(dir, fd, afd, lockFile, anchorSize, tail.head, opts);
      let appended = false;
      if (tail.tornBytes > 0) {
        appended = true;
        await journal.append({
          type: "audit.torn_record_dropped",
          bytes: tail.tornBytes,
          sha256: tail.tornSha256,
          afterSeq: tail.head.seq,
          reason: "the final line had no newline (a crash mid-write); it was never acknowledged",
        });
      }
      if (anchorEnabled && anchor === null && tail.head.seq > 0) {
        appended = true;
        await journal.append({
          type: "audit.anchor_missing",
          afterSeq: tail.head.seq,
          reason: `${ANCHOR_FILE} was absent or empty; truncation of the journal before this record cannot be ruled out`,
        });
      }
      if (anchorEnabled && !appended && (anchor === null || anchor.seq !== journal.synced.seq || anchorSize !== ANCHOR_BYTES)) {
        await journal.writeAnchor(journal.synced, true).catch((e: unknown) => {
          throw auditFailed("anchor update", anchorFile, e);
        });
      }
      return journal;
    } catch (e) {
      await closeAll();
      throw e;
    }
  }

  /** The error that put the journal in its failed state, or null. */
  get failed(): SandboxdError | null {
    return this.failure;
  }

  /** seq and hash of the last record on disk (written, synced, anchored). */
  get durable(): ChainHead {
    return { ...this.synced };
  }

  /** write+fdatasync batches so far, and the records in them */
  get counters(): { batches: number; records: number } {
    return { ...this.stats };
  }

  /**
   * Appends one record. Resolves with the record once its bytes are written
   * and fdatasync'ed (and the anchor names it). Rejects with
   * SBX_ERR_AUDIT_FAILED if the journal failed (this append or any before),
   * SBX_ERR_INTERNAL for an event that is not JSON data or sets a reserved
   * field; such an event takes no seq.
   */
  append(event: AuditEvent, opts: { redactor?: TextRedactor } = {}): Promise<AuditRecord> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(new SandboxdError("SBX_ERR_INTERNAL", `audit journal ${this.path} is closed`));
    let pending: Omit<Pending, "resolve" | "reject">;
    try {
      pending = this.build(event, opts.redactor ?? this.redactor);
    } catch (e) {
      return Promise.reject(
        e instanceof SandboxdError
          ? e
          : new SandboxdError("SBX_ERR_INTERNAL", `audit event of type ${JSON.stringify(String(event?.type))} rejected: ${(e as Error).message}`, {
              cause: e,
            }),
      );
    }
    return new Promise<AuditRecord>((resolve, reject) => {
      this.queue.push({ ...pending, resolve, reject });
      this.schedule();
    });
  }

  /** Waits for every accepted append, makes the anchor durable, closes the files. */
  close(): Promise<void> {
    if (this.closing) return this.closing;
    this.closed = true;
    this.closing = (async () => {
      await this.idle();
      if (!this.failure && this.afd >= 0) await this.writeAnchor(this.synced, true).catch(() => undefined);
      await this.fs.close(this.fd).catch(() => undefined);
      if (this.afd >= 0) await this.fs.close(this.afd).catch(() => undefined);
      await unlink(this.lockFile).catch(() => undefined);
    })();
    return this.closing;
  }

  private build(event: AuditEvent, redactor: TextRedactor | null): Omit<Pending, "resolve" | "reject"> {
    if (typeof event !== "object" || event === null) throw new SandboxdError("SBX_ERR_INTERNAL", "audit event must be an object");
    for (const key of Object.keys(event)) {
      if (RESERVED.has(key)) throw new SandboxdError("SBX_ERR_INTERNAL", `audit event sets the reserved field "${key}"`);
    }
    const clean = sanitize(event, redactor ? (s) => redactor.redact(s) : null) as Record<string, unknown>;
    const { type, phase, rule, clause, ...fields } = clean;
    if (typeof type !== "string" || type === "") throw new SandboxdError("SBX_ERR_INTERNAL", "audit event needs a non-empty string type");
    for (const [k, v] of [
      ["phase", phase],
      ["rule", rule],
      ["clause", clause],
    ] as const) {
      if (v !== undefined && typeof v !== "string") throw new SandboxdError("SBX_ERR_INTERNAL", `audit event field "${k}" must be a string`);
    }
    const seq = this.head.seq + 1;
    const prev = this.head.hash;
    const ts = this.clock.now().toISOString();
    const withoutHash: Record<string, unknown> & { prev: string } = { seq, ts, prev, type, phase, rule, clause, ...fields };
    // serialise once: the hashed bytes, and the line = the same members plus "hash"
    const members = canonicalMembers(withoutHash); // throws on non-JSON data before the seq is taken
    const hashed = `{${members.map((m) => m[1]).join(",")}}`;
    const hash = createHash("sha256").update(prev, "utf8").update(hashed, "utf8").digest("hex");
    const record = { seq, ts, prev, hash, type, phase, rule, clause, ...fields } as AuditRecord;
    for (const k of ["phase", "rule", "clause"] as const) if (record[k] === undefined) delete record[k];
    const line = Buffer.from(`${withMember(members, "hash", hash)}\n`, "utf8");
    this.head = { seq, hash };
    return { line, record };
  }

  private schedule(): void {
    if (this.flushing || this.scheduled) return;
    this.scheduled = true;
    // A microtask, so that appends made in the same tick share the first batch.
    queueMicrotask(() => {
      this.scheduled = false;
      void this.flushLoop();
    });
  }

  private async flushLoop(): Promise<void> {
    if (this.flushing) return;
    this.flushing = true;
    try {
      while (this.queue.length > 0 && !this.failure) {
        const batch = this.queue;
        this.queue = [];
        const first = batch[0]!;
        const data = batch.length === 1 ? first.line : Buffer.concat(batch.map((p) => p.line));
        const last = batch[batch.length - 1]!.record;
        let op = "write";
        let file = this.path;
        try {
          await this.writeFully(data);
          op = "fdatasync";
          await this.fs.fdatasync(this.fd);
          this.synced = { seq: last.seq, hash: last.hash };
          this.stats.batches += 1;
          this.stats.records += batch.length;
          if (this.afd >= 0) {
            op = "anchor update";
            file = this.anchorPath;
            const due = this.clock.monotonicMs() - this.lastAnchorSync >= this.anchorSyncMs;
            await this.writeAnchor(this.synced, due);
          }
        } catch (e) {
          this.fail(auditFailed(op, file, e), batch);
          break;
        }
        for (const p of batch) p.resolve(p.record);
      }
    } finally {
      this.flushing = false;
      if (this.queue.length > 0 && !this.failure) this.schedule();
      else {
        const waiters = this.idleWaiters;
        this.idleWaiters = [];
        for (const w of waiters) w();
      }
    }
  }

  private fail(err: SandboxdError, batch: Pending[]): void {
    this.failure = err;
    const rest = this.queue;
    this.queue = [];
    for (const p of batch) p.reject(err);
    for (const p of rest) p.reject(err);
  }

  private async writeFully(data: Buffer): Promise<void> {
    let off = 0;
    while (off < data.length) {
      const n = await this.fs.write(this.fd, data, off, data.length - off);
      if (n <= 0) throw Object.assign(new Error("write returned 0 bytes"), { code: "EIO" });
      off += n;
    }
  }

  /**
   * The anchor is one fixed-size pwrite(2) over the same 128 bytes: a process
   * crash cannot leave half of it (one syscall within one page), and it costs
   * one syscall per batch instead of the four of temp file + rename (measured:
   * ~3 µs against ~130 µs, which halved throughput at one outstanding append).
   * With `durable` it is fdatasync'ed too, so it survives a power failure;
   * that relies on a 128-byte overwrite at offset 0 being atomic on the disk
   * (it lies within one 512-byte sector). See docs/AUDIT.md.
   */
  private async writeAnchor(head: ChainHead, durable: boolean): Promise<void> {
    const data = anchorBytes(head);
    let off = 0;
    while (off < data.length) {
      const n = await this.fs.writeAt(this.afd, data, off, data.length - off, off);
      if (n <= 0) throw Object.assign(new Error("write returned 0 bytes"), { code: "EIO" });
      off += n;
    }
    if (this.anchorOversize) {
      await this.fs.ftruncate(this.afd, ANCHOR_BYTES);
      this.anchorOversize = false;
    }
    if (durable) {
      await this.fs.fdatasync(this.afd);
      this.lastAnchorSync = this.clock.monotonicMs();
    }
  }

  private idle(): Promise<void> {
    if (!this.flushing && !this.scheduled && this.queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }
}

interface Tail {
  head: ChainHead;
  /** offset just after the last complete line */
  completeEnd: number;
  tornBytes: number;
  tornSha256: string | null;
}

async function readExactly(jfs: JournalFs, fd: number, position: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  let off = 0;
  while (off < length) {
    const n = await jfs.read(fd, buf, off, length - off, position + off);
    if (n <= 0) throw Object.assign(new Error("unexpected end of file"), { code: "EIO" });
    off += n;
  }
  return buf;
}

/** Position of the last "\n" before `end`, or -1. Reads backwards in 64 KiB steps. */
async function lastNewlineBefore(jfs: JournalFs, fd: number, end: number): Promise<number> {
  const STEP = 64 * 1024;
  let hi = end;
  while (hi > 0) {
    const lo = Math.max(0, hi - STEP);
    const chunk = await readExactly(jfs, fd, lo, hi - lo);
    const i = chunk.lastIndexOf(10);
    if (i >= 0) return lo + i;
    hi = lo;
  }
  return -1;
}

async function readTail(jfs: JournalFs, fd: number, file: string): Promise<Tail> {
  let size: number;
  try {
    size = await jfs.size(fd);
  } catch (e) {
    throw auditFailed("stat", file, e);
  }
  const empty: Tail = { head: { seq: 0, hash: GENESIS_HASH }, completeEnd: 0, tornBytes: 0, tornSha256: null };
  if (size === 0) return empty;
  let lastNl: number;
  let line: Buffer;
  let torn: Buffer | null = null;
  try {
    lastNl = await lastNewlineBefore(jfs, fd, size);
    const completeEnd = lastNl + 1;
    if (completeEnd < size) torn = await readExactly(jfs, fd, completeEnd, size - completeEnd);
    if (completeEnd === 0) {
      return { ...empty, tornBytes: size, tornSha256: createHash("sha256").update(torn!).digest("hex") };
    }
    const start = (await lastNewlineBefore(jfs, fd, lastNl)) + 1;
    line = await readExactly(jfs, fd, start, lastNl - start);
  } catch (e) {
    throw auditFailed("read of the tail", file, e);
  }
  const text = line.toString("utf8");
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  const bad = parsed === undefined ? "not JSON" : checkRecord(text, parsed);
  if (bad) {
    throw new SandboxdError("SBX_ERR_AUDIT_CORRUPT", `the last complete record of ${file} is bad (${bad}); run \`sandboxd audit verify\``);
  }
  const rec = parsed as AuditRecord;
  return {
    head: { seq: rec.seq, hash: rec.hash },
    completeEnd: lastNl + 1,
    tornBytes: torn ? torn.length : 0,
    tornSha256: torn ? createHash("sha256").update(torn).digest("hex") : null,
  };
}
