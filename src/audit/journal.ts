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
 * only after the record's bytes are written durably (O_APPEND | O_DSYNC: the
 * write returns once the data and the size are on disk, as a write then an
 * fdatasync would, in one call) and after audit.anchor names it; callers
 * await it before acting on the decision it records (ARCHITECTURE.md:
 * "fsync'd before the verdict is acted on"). Appends that arrive while a
 * write is in flight are batched into the next single write (group commit).
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
import { type AnchorSigner, verifyAnchorSignature } from "./signing.js";
import { readWitness, witnessBytes, type Witness } from "./witness.js";
import { removeIfPresent } from "../util/fs.js";

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

/** A chain head with its ed25519 signature (./signing.ts). */
export interface SignedHead extends ChainHead {
  /** fingerprint of the signing key (SHA-256 hex of its DER SubjectPublicKeyInfo) */
  key: string;
  /** base64 ed25519 signature over anchorMessage({seq, hash}) */
  sig: string;
}

/**
 * What audit.anchor holds: the last synced head, and when the journal has a
 * signer, the latest signed head — the same one, or one a signature behind
 * while that signature is being made (appends never wait for it).
 */
export interface Anchor extends ChainHead {
  signed?: SignedHead;
}

/** Anything with a `redact(text)` method (./redact.ts `Redactor`). */
export interface TextRedactor {
  redact(text: string): string;
}

/**
 * The file-system calls the journal makes, so a unit test can inject ENOSPC
 * on the Nth write or count the journal's writes. `nodeJournalFs` is the real one.
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
  /**
   * After a failure, how often (ms) the journal tries to recover by itself:
   * cut the unacknowledged bytes, write an `audit.gap` record, go on with the
   * chain. Default 1000; 0 = never (stay failed until restarted).
   */
  recoverProbeMs?: number;
  /**
   * Signs every anchor (./signing.ts). On open the journal records the key
   * (`audit.signing_key`), checks that an anchor signed with this key
   * verifies, and refuses an unsigned anchor over a trail that was signed.
   */
  signer?: AnchorSigner;
  /**
   * At most one anchor signature per this many ms of the injected clock's
   * monotonic time (default 100; 0 = as soon as the previous one is made).
   * Appends never wait for a signature: the anchor's signed head trails its
   * head by at most this and one signature (≈70 µs). docs/AUDIT.md.
   */
  signIntervalMs?: number;
  /**
   * The witness file (./witness.ts): the latest signed head, kept beside the
   * key, outside the state dir. On open the trail must reach the witnessed
   * head with its hash (else it was rolled back, cut or swapped); every new
   * signature is written to it. Only with a signer.
   */
  witness?: string;
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

const B64SIG = /^[A-Za-z0-9+/]{86}==$/;

export function parseAnchor(bytes: Buffer, file: string): Anchor {
  let parsed: unknown;
  try {
    parsed = JSON.parse(bytes.toString("utf8"));
  } catch {
    throw new SandboxdError("SBX_ERR_AUDIT_CORRUPT", `${file} is not JSON`);
  }
  const a = parsed as Partial<Anchor> | null;
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
  if (a.signed === undefined) return { seq: a.seq, hash: a.hash };
  const s = a.signed as Partial<SignedHead> | null;
  if (
    typeof s !== "object" ||
    s === null ||
    typeof s.seq !== "number" ||
    !Number.isSafeInteger(s.seq) ||
    s.seq < 0 ||
    s.seq > a.seq ||
    typeof s.hash !== "string" ||
    !HEX64.test(s.hash) ||
    typeof s.key !== "string" ||
    !HEX64.test(s.key) ||
    typeof s.sig !== "string" ||
    !B64SIG.test(s.sig)
  ) {
    throw new SandboxdError("SBX_ERR_AUDIT_CORRUPT", `${file} has a malformed signed head (signed: {seq ≤ seq, hash, key: a 64-hex fingerprint, sig: a base64 ed25519 signature})`);
  }
  return { seq: a.seq, hash: a.hash, signed: { seq: s.seq, hash: s.hash, key: s.key, sig: s.sig } };
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

/** A string value longer than the cap: what was dropped, so the whole can still be matched. */
export interface CappedText {
  /** UTF-8 bytes of the whole (scrubbed) text */
  bytes: number;
  /** SHA-256 of the whole scrubbed text (not of the raw text: a hash of text holding a short secret would let anyone test guesses) */
  sha256: string;
}

/** What `append` does to an event's strings besides the journal's own redactor. */
export interface AppendOptions {
  redactor?: TextRedactor;
  /**
   * String values over this many UTF-8 bytes keep their head (cut at a
   * character boundary, then "…"), and the record gets
   * `capped: {"<path>": {bytes, sha256}}` (path like `sql` or `argv.3`).
   */
  capBytes?: number;
  /** field names (at any depth) whose strings are not capped: the caller bounds them itself (command output) */
  uncapped?: ReadonlySet<string>;
  /** told the byte length of the record's line as soon as it is built (before it is durable) */
  onSize?: (bytes: number) => void;
}

/** `text` cut to at most `cap` UTF-8 bytes at a character boundary, or null when it fits. */
export function capUtf8(text: string, cap: number): { head: string; bytes: number } | null {
  if (text.length * 3 <= cap) return null; // fits whatever the characters
  const bytes = Buffer.byteLength(text, "utf8");
  if (bytes <= cap) return null;
  const head = Buffer.from(text, "utf8").subarray(0, cap).toString("utf8").replace(/\uFFFD$/, "");
  return { head, bytes };
}

function sanitizeCapped(
  value: unknown,
  redact: ((s: string) => string) | null,
  cap: number,
  uncapped: ReadonlySet<string> | undefined,
  at: string,
  capped: Record<string, CappedText>,
  capThis: boolean,
): unknown {
  if (typeof value === "string") {
    const w = toWellFormed(value);
    const text = redact ? redact(w) : w;
    if (!capThis) return text;
    const cut = capUtf8(text, cap);
    if (!cut) return text;
    capped[at] = { bytes: cut.bytes, sha256: createHash("sha256").update(text, "utf8").digest("hex") };
    return `${cut.head}…`;
  }
  if (Array.isArray(value)) return value.map((v, i) => sanitizeCapped(v, redact, cap, uncapped, `${at}.${i}`, capped, capThis));
  if (typeof value === "object" && value !== null) {
    const proto: unknown = Object.getPrototypeOf(value);
    if (proto !== Object.prototype && proto !== null) return value; // canonicalJson rejects it
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) {
      if (v === undefined) continue;
      const key = toWellFormed(k);
      out[key] = sanitizeCapped(v, OWN_WORDS.has(k) ? null : redact, cap, uncapped, at ? `${at}.${key}` : key, capped, capThis && !uncapped?.has(k));
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

// O_NOFOLLOW: a symlink planted in the state dir must not make the daemon (root, by default) write through it elsewhere.
// O_DSYNC: each write is durable when it returns (one call to the thread pool per batch, not a write and an fdatasync).
const O_JOURNAL = fs.constants.O_RDWR | fs.constants.O_APPEND | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW | fs.constants.O_DSYNC;
const O_ANCHOR = fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW;
/**
 * The anchor is always this many bytes (JSON padded with spaces, then "\n"),
 * overwritten in place: one sector, so one pwrite(2) (about 250 bytes of
 * JSON with a signature; 128 bytes before anchors were signed).
 */
export const ANCHOR_BYTES = 512;

/** `{"hash":"…","seq":N,"signed":{"hash","key","seq","sig"}}` padded to ANCHOR_BYTES; JSON.parse ignores the padding. */
export function anchorBytes(anchor: Anchor): Buffer {
  const json = canonicalJson(anchor.signed === undefined ? { seq: anchor.seq, hash: anchor.hash } : { seq: anchor.seq, hash: anchor.hash, signed: { ...anchor.signed } });
  return Buffer.from(`${json.padEnd(ANCHOR_BYTES - 1, " ")}\n`, "utf8");
}

/**
 * Who a process is, beyond its pid: the boot it runs in and its start time
 * (field 22 of /proc/<pid>/stat, in clock ticks since boot). A pid is reused
 * after its process dies or the machine reboots; these two are not.
 */
interface ProcessIdentity {
  pid: number;
  bootId: string;
  startTime: string;
}

async function bootId(): Promise<string> {
  return (await readFile("/proc/sys/kernel/random/boot_id", "utf8")).trim();
}

/** The process's state letter and start time, or null when it does not exist. */
async function procStat(pid: number): Promise<{ state: string; startTime: string } | null> {
  let text: string;
  try {
    text = await readFile(`/proc/${pid}/stat`, "utf8");
  } catch (e) {
    if (errnoOf(e) === "ENOENT" || errnoOf(e) === "ESRCH") return null;
    throw e;
  }
  // the command name (field 2) is in parentheses and may hold spaces: fields count from its end
  const rest = text.slice(text.lastIndexOf(")") + 2).split(" ");
  return { state: rest[0] ?? "", startTime: rest[19] ?? "" };
}

async function selfIdentity(): Promise<ProcessIdentity> {
  const st = await procStat(process.pid);
  return { pid: process.pid, bootId: await bootId(), startTime: st?.startTime ?? "" };
}

/**
 * Is the lock's writer still running? Only if a process with its pid exists
 * in this boot, is not a zombie (a `kill -9`ed daemon its parent has not yet
 * reaped still has a pid), and started when the writer did. A lock from
 * before a reboot, from a dead writer, or from a pid now used by another
 * process is stale. A lock written by an older version (a bare pid) falls
 * back to "that pid is alive and not a zombie".
 */
async function lockHeld(content: string): Promise<number | null> {
  const [pidText, boot, startTime] = content.trim().split(/\s+/);
  const pid = Number.parseInt(pidText ?? "", 10);
  if (!Number.isSafeInteger(pid) || pid <= 0) return null;
  if (boot !== undefined && boot !== (await bootId())) return null;
  const st = await procStat(pid);
  if (!st || st.state === "Z" || st.state === "X") return null;
  if (startTime !== undefined && startTime !== st.startTime) return null;
  return pid;
}

/**
 * One writer per journal: two daemons appending to the same file would fork
 * the chain. `audit.lock` holds the writer's pid, boot id and start time,
 * created O_EXCL; a lock whose writer is gone (a crashed daemon, a reboot) is
 * taken over (lockHeld).
 */
async function acquireLock(dir: string): Promise<string> {
  const file = path.join(dir, LOCK_FILE);
  const me = await selfIdentity();
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      await writeFile(file, `${me.pid} ${me.bootId} ${me.startTime}\n`, { flag: "wx", mode: 0o600 });
      return file;
    } catch (e) {
      if (errnoOf(e) !== "EEXIST") throw auditFailed("lock", file, e);
    }
    let content: string;
    try {
      content = await readFile(file, "utf8");
    } catch (e) {
      if (errnoOf(e) === "ENOENT") continue; // its writer just removed it
      throw auditFailed("lock", file, e);
    }
    const pid = await lockHeld(content);
    if (pid !== null) {
      throw new SandboxdError(
        "SBX_ERR_AUDIT_FAILED",
        `${path.join(dir, JOURNAL_FILE)} is already being written by process ${pid} (${file}); one writer per audit journal`,
        { hint: "stop the other sandboxd that uses this state dir, or give this one its own --state-dir" },
      );
    }
    await removeIfPresent(file); // stale: its writer died
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
  private readonly signer: AnchorSigner | null;
  /** the latest signed head (a synced one), written into every anchor */
  private signed: SignedHead | null = null;
  /** the signature being made on the thread pool, if any (one at a time) */
  private signing: Promise<void> | null = null;
  private readonly signIntervalMs: number;
  private lastSignStart = -Infinity;
  private signTimer: NodeJS.Timeout | null = null;
  /** anchor writes, one after another: each writes the state at the time it runs */
  private anchorQueue: Promise<void> = Promise.resolve();
  private readonly fd: number;
  /** fd of audit.anchor, -1 when the anchor is off */
  private readonly afd: number;
  /** fd of the witness beside the key (./witness.ts), -1 without one */
  private readonly wfd: number;
  private readonly witnessPath: string | null;
  /** seq of the signed head last written to the witness */
  private witnessSeq = -1;
  private witnessDirty = false;
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

  /** file offset just after the last synced record: the journal is cut back here before it recovers */
  private syncedEnd: number;
  private readonly recoverProbeMs: number;
  private probeTimer: NodeJS.Timeout | null = null;
  private probing: Promise<void> | null = null;
  /** while failed: when, and how many appends were refused */
  private failedAt: string | null = null;
  private refusedWhileFailed = 0;
  /** records to write first thing on recovery (ends of phases that ended while the journal was failing) */
  private deferred: Array<{ event: AuditEvent; opts: AppendOptions }> = [];
  private recoveredListeners: Array<() => void> = [];

  private constructor(
    dir: string,
    fd: number,
    afd: number,
    lockFile: string,
    anchorSize: number,
    head: ChainHead,
    opts: JournalOptions,
    syncedEnd: number,
    witness: { fd: number; path: string; seq: number } | null,
  ) {
    this.syncedEnd = syncedEnd;
    this.wfd = witness?.fd ?? -1;
    this.witnessPath = witness?.path ?? null;
    this.witnessSeq = witness?.seq ?? -1;
    this.recoverProbeMs = opts.recoverProbeMs ?? 1000;
    this.lockFile = lockFile;
    this.path = path.join(dir, JOURNAL_FILE);
    this.anchorPath = path.join(dir, ANCHOR_FILE);
    this.fs = opts.fs ?? nodeJournalFs;
    this.clock = opts.clock;
    this.anchorSyncMs = opts.anchorSyncMs ?? 1000;
    this.redactor = opts.redactor ?? null;
    this.signer = opts.signer ?? null;
    this.signIntervalMs = opts.signIntervalMs ?? 100;
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
    let wfd = -1;
    let lockFile: string | null = null;
    const closeAll = async () => {
      // undoing a failed open: the open's own error is the one reported
      // eslint-disable-next-line no-restricted-syntax -- see above
      if (fd >= 0) await jfs.close(fd).catch(() => undefined);
      // eslint-disable-next-line no-restricted-syntax -- see above
      if (afd >= 0) await jfs.close(afd).catch(() => undefined);
      // eslint-disable-next-line no-restricted-syntax -- see above
      if (wfd >= 0) await jfs.close(wfd).catch(() => undefined);
      // eslint-disable-next-line no-restricted-syntax -- see above
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
      let anchor: Anchor | null = null;
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
              `${(e as Error).message}; run \`sandboxd audit verify\`. If the anchor was damaged in a power failure and the chain verifies, restore ${anchorFile} from a backup; a signed trail does not go on without its anchor (docs/AUDIT.md "Threat model"): to start a new trail, move the journal, the anchor and the trail's witness aside together`,
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
        if (opts.signer) await checkAnchorAtOpen(jfs, fd, file, anchorFile, anchor, tail.head.seq, opts.signer);
        const signed = anchor?.signed;
        if (opts.signer && signed) {
          // The signature covers {seq, hash}; the journal must hold that very record. The anchor's own {seq, hash}
          // is unsigned: pointed at a re-chained tail, it would let a rewrite under a genuine signature through.
          const at = signed.seq === tail.head.seq ? tail.head.hash : await recordHashAt(jfs, fd, file, tail.completeEnd, signed.seq);
          if (at !== signed.hash) {
            throw new SandboxdError(
              "SBX_ERR_AUDIT_CORRUPT",
              `record ${signed.seq} of ${file} ${at === null ? "is missing or not a record" : `has hash ${at}`}, not the hash ${signed.hash} that ${anchorFile}'s signature covers: the records up to it were rewritten; run \`sandboxd audit verify\``,
            );
          }
        }
      }
      let witness: { fd: number; path: string; seq: number } | null = null;
      if (opts.signer && opts.witness && anchorEnabled) {
        const wpath = opts.witness;
        const w = await readWitness(wpath);
        if (w) await checkWitnessAtOpen(jfs, fd, file, wpath, w, anchor, tail);
        try {
          await jfs.mkdir(path.dirname(wpath));
          wfd = await jfs.open(wpath, O_ANCHOR, 0o600);
        } catch (e) {
          throw auditFailed("witness open", wpath, e);
        }
        witness = { fd: wfd, path: wpath, seq: w?.seq ?? -1 };
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
      const journal = new AuditJournal(dir, fd, afd, lockFile, anchorSize, tail.head, opts, tail.completeEnd, witness);
      // verified by checkAnchorAtOpen: carried on until this journal's own first signature replaces it
      if (opts.signer && anchor?.signed) journal.signed = anchor.signed;
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
      if (opts.signer) {
        // The key is part of the trail: a verifier finds here the public key of every anchor signed from now on.
        appended = true;
        await journal.append({
          type: "audit.signing_key",
          fingerprint: opts.signer.fingerprint,
          publicKey: opts.signer.publicKeyPem,
          keyFile: opts.signer.keyFile,
          created: opts.signer.created,
          previousKey: anchor?.signed?.key ?? null,
          anchoredSeq: anchor?.seq ?? null,
          // which trail this key signs from here: one key may sign several state dirs, and a signature does not name its trail
          stateDir: path.resolve(dir),
        });
      }
      if (anchorEnabled && !appended && (anchor === null || anchor.seq !== journal.synced.seq || anchorSize !== ANCHOR_BYTES)) {
        await journal.writeAnchor(true).catch((e: unknown) => {
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

  /** The latest signed head (what the anchor and the witness carry), or null before the first signature. */
  get signedHead(): SignedHead | null {
    return this.signed ? { ...this.signed } : null;
  }

  /** seq and hash of the last record on disk (written, synced, anchored). */
  get durable(): ChainHead {
    return { ...this.synced };
  }

  /** durable write batches so far, and the records in them */
  get counters(): { batches: number; records: number } {
    return { ...this.stats };
  }

  /**
   * Appends one record. Resolves with the record once its bytes are written
   * durably (and the anchor names it). Rejects with
   * SBX_ERR_AUDIT_FAILED if the journal failed (this append or any before),
   * SBX_ERR_INTERNAL for an event that is not JSON data or sets a reserved
   * field; such an event takes no seq.
   */
  append(event: AuditEvent, opts: AppendOptions = {}): Promise<AuditRecord> {
    if (this.failure) {
      this.refusedWhileFailed += 1;
      return Promise.reject(this.failure);
    }
    if (this.closed) return Promise.reject(new SandboxdError("SBX_ERR_INTERNAL", `audit journal ${this.path} is closed`));
    let pending: Omit<Pending, "resolve" | "reject">;
    try {
      pending = this.build(event, opts.redactor ?? this.redactor, opts);
      opts.onSize?.(pending.line.length);
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

  /**
   * An event to write as soon as the failed journal recovers (before any new
   * record): the end of a phase that ended while it was failing.
   */
  deferUntilRecovered(event: AuditEvent, opts: AppendOptions = {}): void {
    this.deferred.push({ event, opts });
  }

  /** Called each time the journal recovers from a failure. */
  onRecovered(fn: () => void): void {
    this.recoveredListeners.push(fn);
  }

  /** Waits for every accepted append, makes the anchor durable, closes the files. */
  close(): Promise<void> {
    if (this.closing) return this.closing;
    this.closed = true;
    this.closing = (async () => {
      if (this.probeTimer) clearTimeout(this.probeTimer);
      this.probeTimer = null;
      await this.probing;
      await this.idle();
      if (this.signTimer) clearTimeout(this.signTimer);
      this.signTimer = null;
      await this.signing;
      // Closing is best effort by design: every accepted record is already durable
      // (the anchor only speeds up the next verify), and a close that fails
      // changes nothing a reader could see. A lock left behind is stale (lockHeld).
      if (!this.failure && this.afd >= 0) {
        if (this.signer && (this.signed?.seq ?? -1) < this.synced.seq) this.signed = this.signHead(this.synced);
        // eslint-disable-next-line no-restricted-syntax -- see above
        await this.writeAnchor(true).catch(() => undefined);
      }
      // eslint-disable-next-line no-restricted-syntax -- see above
      await this.fs.close(this.fd).catch(() => undefined);
      // eslint-disable-next-line no-restricted-syntax -- see above
      if (this.afd >= 0) await this.fs.close(this.afd).catch(() => undefined);
      // eslint-disable-next-line no-restricted-syntax -- see above
      if (this.wfd >= 0) await this.fs.close(this.wfd).catch(() => undefined);
      // eslint-disable-next-line no-restricted-syntax -- see above
      await unlink(this.lockFile).catch(() => undefined);
    })();
    return this.closing;
  }

  private build(event: AuditEvent, redactor: TextRedactor | null, opts: AppendOptions = {}): Omit<Pending, "resolve" | "reject"> {
    if (typeof event !== "object" || event === null) throw new SandboxdError("SBX_ERR_INTERNAL", "audit event must be an object");
    for (const key of Object.keys(event)) {
      if (RESERVED.has(key) || (opts.capBytes !== undefined && key === "capped")) {
        throw new SandboxdError("SBX_ERR_INTERNAL", `audit event sets the reserved field "${key}"`);
      }
    }
    const redact = redactor ? (s: string) => redactor.redact(s) : null;
    let clean: Record<string, unknown>;
    if (opts.capBytes === undefined) clean = sanitize(event, redact) as Record<string, unknown>;
    else {
      const capped: Record<string, CappedText> = {};
      clean = sanitizeCapped(event, redact, opts.capBytes, opts.uncapped, "", capped, true) as Record<string, unknown>;
      if (Object.keys(capped).length > 0) clean.capped = capped;
    }
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
          // durable once written: the journal is O_DSYNC
          await this.writeFully(data);
          this.synced = { seq: last.seq, hash: last.hash };
          this.syncedEnd += data.length;
          this.stats.batches += 1;
          this.stats.records += batch.length;
          if (this.afd >= 0) {
            op = "anchor update";
            file = this.anchorPath;
            // The very first signature of this journal is waited for: an anchor
            // never goes unsigned over a recorded key (a crash then would look
            // like a stripped signature). After that, appends do not wait for
            // signatures: the anchor carries the latest one made.
            if (this.signer && this.signed === null) this.signed = this.signHead(this.synced);
            const due = this.clock.monotonicMs() - this.lastAnchorSync >= this.anchorSyncMs;
            await this.writeAnchor(due);
            this.kickSigner();
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
    this.failedAt ??= this.clock.now().toISOString();
    const rest = this.queue;
    this.queue = [];
    this.refusedWhileFailed += batch.length + rest.length;
    for (const p of batch) p.reject(err);
    for (const p of rest) p.reject(err);
    this.scheduleProbe();
  }

  private scheduleProbe(): void {
    if (this.recoverProbeMs <= 0 || this.closed || this.probeTimer) return;
    this.probeTimer = setTimeout(() => {
      this.probeTimer = null;
      this.probing = this.tryRecover().finally(() => {
        this.probing = null;
      });
    }, this.recoverProbeMs);
    this.probeTimer.unref();
  }

  /**
   * Re-probes a failed journal: cuts the file back to the last synced record
   * (the bytes after it were never acknowledged), then writes, syncs and
   * anchors an `audit.gap` record — the failure's cause, when it began and
   * ended, how many appends were refused — followed by the deferred records.
   * If that works the chain goes on from there and new work is taken again;
   * if not, it tries again later.
   */
  private async tryRecover(): Promise<void> {
    const failure = this.failure;
    if (!failure || this.closed) return;
    const savedHead = this.head;
    try {
      await this.fs.ftruncate(this.fd, this.syncedEnd);
      await this.fs.fdatasync(this.fd);
      this.head = { ...this.synced };
      const details = (failure.details ?? {}) as { errno?: string; op?: string; path?: string };
      const built = [
        this.build(
          {
            type: "audit.gap",
            cause: failure.message,
            errno: details.errno ?? null,
            op: details.op ?? null,
            failedAt: this.failedAt,
            recoveredAt: this.clock.now().toISOString(),
            refusedAppends: this.refusedWhileFailed,
            afterSeq: this.synced.seq,
            reason: "the journal could not be written; appends in between were refused (nothing was acted on for them) and the chain goes on here",
          },
          this.redactor,
        ),
        ...this.deferred.map((d) => this.build(d.event, d.opts.redactor ?? this.redactor, d.opts)),
      ];
      const data = Buffer.concat(built.map((b) => b.line));
      await this.writeFully(data); // durable: O_DSYNC
      const last = built[built.length - 1]!.record;
      this.synced = { seq: last.seq, hash: last.hash };
      this.syncedEnd += data.length;
      if (this.afd >= 0) {
        if (this.signer) this.signed = this.signHead(this.synced);
        await this.writeAnchor(true);
      }
    } catch {
      this.head = savedHead;
      this.scheduleProbe();
      return;
    }
    this.deferred = [];
    this.failure = null;
    this.failedAt = null;
    this.refusedWhileFailed = 0;
    for (const fn of this.recoveredListeners) fn();
    if (this.queue.length > 0) this.schedule();
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
  private signHead(head: ChainHead): SignedHead {
    const signer = this.signer!;
    return { seq: head.seq, hash: head.hash, key: signer.fingerprint, sig: signer.signSync(head) };
  }

  /**
   * Starts signing the synced head on the thread pool unless a signature is
   * under way or the head is signed already. When it is made it goes into the
   * anchor at once (a quiet journal does not leave its last records
   * unsigned) unless a batch is under way, whose anchor will carry it; then
   * the next head, if the chain moved meanwhile, is signed.
   * One ed25519 signature costs ≈70 µs of CPU; waiting for it on every batch
   * halved throughput with one append outstanding, and even made off the
   * critical path one per batch cost a quarter of it on this shared 2-core
   * machine (BENCHMARKS.md), so appends are acknowledged on the unsigned head,
   * and signatures follow, at most one per signIntervalMs.
   */
  private kickSigner(): void {
    const signer = this.signer;
    if (!signer || this.signing || this.signTimer || this.failure || this.closed || this.afd < 0) return;
    const head = { ...this.synced };
    if ((this.signed?.seq ?? -1) >= head.seq) return;
    const wait = this.lastSignStart + this.signIntervalMs - this.clock.monotonicMs();
    if (wait > 0) {
      this.signTimer = setTimeout(() => {
        this.signTimer = null;
        this.kickSigner();
      }, wait);
      this.signTimer.unref();
      return;
    }
    this.lastSignStart = this.clock.monotonicMs();
    this.signing = signer.sign(head).then(
      async (sig) => {
        if ((this.signed?.seq ?? -1) < head.seq) this.signed = { ...head, key: signer.fingerprint, sig };
        // a batch under way writes the anchor anyway (with this signature): only an idle journal writes it here
        const idle = !this.flushing && !this.scheduled && this.queue.length === 0;
        if (idle && !this.failure && !this.closed) await this.writeAnchor(false).catch((e: unknown) => this.fail(auditFailed("anchor update", this.anchorPath, e), []));
        this.signing = null;
        if (!this.closed) this.kickSigner();
      },
      (e: unknown) => {
        this.signing = null;
        this.fail(auditFailed("anchor signing", this.anchorPath, e), []);
      },
    );
  }

  /** Queues an anchor write of the state at the time it runs: the last synced head and the latest signed one. */
  private writeAnchor(durable: boolean): Promise<void> {
    const run = this.anchorQueue.then(() => this.writeAnchorNow(durable));
    // eslint-disable-next-line no-restricted-syntax -- the queue outlives a failed write; its caller gets the rejection from `run`
    this.anchorQueue = run.catch(() => undefined);
    return run;
  }

  private async writeAnchorNow(durable: boolean): Promise<void> {
    const head = this.synced;
    const data = anchorBytes(this.signed ? { seq: head.seq, hash: head.hash, signed: this.signed } : { seq: head.seq, hash: head.hash });
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
    // the witness after the anchor, and only forward: it names the latest head signed for this trail
    const signed = this.signed;
    if (this.wfd >= 0 && signed && signed.seq > this.witnessSeq) {
      const w = witnessBytes({ ...signed, stateDir: path.dirname(this.path) });
      let woff = 0;
      while (woff < w.length) {
        const n = await this.fs.writeAt(this.wfd, w, woff, w.length - woff, woff);
        if (n <= 0) throw Object.assign(new Error(`write of ${this.witnessPath} returned 0 bytes`), { code: "EIO" });
        woff += n;
      }
      this.witnessSeq = signed.seq;
      this.witnessDirty = true;
    }
    if (durable && this.witnessDirty) {
      await this.fs.fdatasync(this.wfd);
      this.witnessDirty = false;
    }
  }

  private idle(): Promise<void> {
    if (!this.flushing && !this.scheduled && this.queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }
}

/**
 * With a signer, before the chain goes on: an anchor signed in the name of
 * this key must verify (else the anchor was forged, or the chain under it
 * rewritten, and signing on would bless that); an anchor signed with another
 * key is a rotation, recorded by the caller and checked by `audit verify`.
 * An unsigned anchor over records is a trail from before anchors were signed —
 * unless the trail already records a signing key, in which case the anchor
 * was replaced by one without a signature: refused. Finding that out reads
 * the whole journal, which happens only when the anchor is unsigned.
 */
async function checkAnchorAtOpen(jfs: JournalFs, fd: number, file: string, anchorFile: string, anchor: Anchor | null, lastSeq: number, signer: AnchorSigner): Promise<void> {
  if (anchor === null) {
    if (lastSeq === 0) return;
    // A trail that recorded a key had a signed anchor, written and synced before that key's first record was
    // acknowledged: without it nothing says the records were not rewritten. Going on (recording
    // audit.anchor_missing, signing a new head) would bless whatever the file now holds.
    const seq = await findSigningKeyRecord(jfs, fd, file);
    if (seq !== null) {
      throw new SandboxdError(
        "SBX_ERR_AUDIT_CORRUPT",
        `${anchorFile} is missing or empty, but ${file} records a signing key at seq ${seq}: the signed anchor was removed, and the records could have been rewritten since it was signed; the daemon does not sign over them`,
        {
          hint: `restore ${anchorFile} from a backup; check with \`sandboxd audit verify --state-dir DIR --key <the key you trust>\`. To start a new trail instead, move ${file} and ${anchorFile} aside together (keep them as evidence), and the trail's witness (<key file>.heads/…, or in SANDBOXD_AUDIT_WITNESS_DIR) with them`,
        },
      );
    }
    return; // an unsigned trail: recorded as audit.anchor_missing
  }
  const signed = anchor.signed;
  if (signed) {
    const key = signed.key === signer.fingerprint ? signer.publicKey : signer.previous.get(signed.key);
    if (!key) {
      throw new SandboxdError(
        "SBX_ERR_AUDIT_KEY",
        `${anchorFile} is signed with key ${signed.key}, which is neither this daemon's key ${signer.fingerprint} (${signer.keyFile}) nor one it was rotated from (${signer.keyFile}.previous): the trail was re-signed elsewhere, or the key file was swapped`,
        {
          hint: `check the trail with \`sandboxd audit verify --state-dir DIR --key <the key you trust>\`; if you replaced the key yourself, append the old key's public key to ${signer.keyFile}.previous (\`sandboxd audit key --rotate\` does that) and start again`,
        },
      );
    }
    if (!verifyAnchorSignature(signed, signed.sig, key)) {
      throw new SandboxdError(
        "SBX_ERR_AUDIT_CORRUPT",
        `${anchorFile} names signing key ${signed.key} but its signature does not verify: the anchor was forged or the chain under it rewritten; run \`sandboxd audit verify\``,
      );
    }
    if (signed.key !== signer.fingerprint) {
      // signed by a key this one replaced: it must still have been the key in force at that seq (a retired key, perhaps
      // stolen, signs nothing written after its successor was recorded). Read only on the first start after a rotation.
      const inForce = await lastSigningKeyUpTo(jfs, fd, file, signed.seq);
      if (inForce !== null && inForce.fingerprint !== signed.key) {
        throw new SandboxdError(
          "SBX_ERR_AUDIT_CORRUPT",
          `${anchorFile} is signed at seq ${signed.seq} with retired key ${signed.key}, but the key in force there is ${inForce.fingerprint} (recorded at seq ${inForce.seq}): records written after the rotation were signed with the old key; run \`sandboxd audit verify\``,
        );
      }
    }
    return;
  }
  if (lastSeq === 0) return;
  // a key recorded after the anchor is fine: the crash came before that record's anchor
  const seq = await findSigningKeyRecord(jfs, fd, file);
  if (seq !== null && seq <= anchor.seq) {
    throw new SandboxdError(
      "SBX_ERR_AUDIT_CORRUPT",
      `${anchorFile} carries no signature, but ${file} records a signing key at seq ${seq}: the signed anchor was replaced; run \`sandboxd audit verify\``,
    );
  }
}

/**
 * The trail must reach the head the daemon last signed for it (the witness,
 * kept beside the key) with the same hash: a trail that ends before it was
 * cut or rolled back to an older copy; one with another hash there was
 * rewritten, or is another state dir's trail signed by the same key. The
 * record at the witnessed seq is read unless the anchor's signed head is that
 * very head (a clean stop leaves both equal; after a crash or power loss the
 * anchor may be behind or ahead of the witness by a signature).
 */
async function checkWitnessAtOpen(jfs: JournalFs, fd: number, file: string, wfile: string, w: Witness, anchor: Anchor | null, tail: Tail): Promise<void> {
  const lastSeq = tail.head.seq;
  const rolledBack = (what: string) =>
    new SandboxdError("SBX_ERR_AUDIT_CORRUPT", `${what}, but the daemon signed seq ${w.seq} of this trail (witness ${wfile}): the trail was rolled back to an older copy, cut, or replaced; the daemon does not sign over it`, {
      hint: `restore the state dir's audit.jsonl and audit.anchor from a backup that reaches seq ${w.seq}; check with \`sandboxd audit verify --state-dir DIR --key <the key you trust>\`. To start a new trail instead, move both aside (keep them as evidence) and ${wfile} with them`,
    });
  if (lastSeq < w.seq) throw rolledBack(`${file} ends at seq ${lastSeq}`);
  // the anchor's signed head was checked against the journal's record at its seq just before
  const s = anchor?.signed;
  if (s && s.seq === w.seq && s.hash === w.hash) return;
  const hash = w.seq === lastSeq ? tail.head.hash : await recordHashAt(jfs, fd, file, tail.completeEnd, w.seq);
  if (hash !== w.hash) throw rolledBack(`record ${w.seq} of ${file} has ${hash === null ? "no valid hash" : `hash ${hash}`}, not ${w.hash}`);
}

/**
 * The `hash` of the record with this seq, read backwards from `end` (just
 * after the last complete line): the heads checked at open (the signed one,
 * the witnessed one) lie near the end, so a large journal is not read whole.
 * Null when no line holds that seq (or a line on the way is not a record:
 * `audit verify` says which).
 */
async function recordHashAt(jfs: JournalFs, fd: number, file: string, end: number, seq: number): Promise<string | null> {
  const STEP = 1 << 20;
  try {
    let lo = end;
    let buf = Buffer.alloc(0);
    let j = 0; // buf[0, j) is unprocessed; buf[j-1] is a line's "\n"
    while (lo > 0 || j > 0) {
      const i = j >= 2 ? buf.lastIndexOf(10, j - 2) : -1;
      if (i < 0 && lo > 0) {
        const from = Math.max(0, lo - STEP);
        buf = Buffer.concat([await readExactly(jfs, fd, from, lo - from), buf.subarray(0, j)]);
        j += lo - from;
        lo = from;
        continue;
      }
      const line = buf.subarray(i + 1, j - 1);
      j = i + 1;
      let rec: { seq?: unknown; hash?: unknown };
      try {
        rec = JSON.parse(line.toString("utf8")) as { seq?: unknown; hash?: unknown };
      } catch {
        return null;
      }
      if (typeof rec.seq !== "number" || rec.seq < seq) return null;
      if (rec.seq === seq) return typeof rec.hash === "string" ? rec.hash : null;
    }
  } catch (e) {
    throw auditFailed("read", file, e);
  }
  return null;
}

/** Calls `visit` with each complete line of the journal until it returns false. */
async function scanLines(jfs: JournalFs, fd: number, file: string, visit: (line: Buffer) => boolean): Promise<void> {
  const STEP = 1 << 20;
  try {
    const size = await jfs.size(fd);
    let carry = Buffer.alloc(0);
    for (let pos = 0; pos < size; pos += STEP) {
      const chunk = Buffer.concat([carry, await readExactly(jfs, fd, pos, Math.min(STEP, size - pos))]);
      let lineStart = 0;
      for (;;) {
        const nl = chunk.indexOf(10, lineStart);
        if (nl < 0) break;
        if (!visit(chunk.subarray(lineStart, nl))) return;
        lineStart = nl + 1;
      }
      carry = chunk.subarray(lineStart);
    }
  } catch (e) {
    throw auditFailed("read", file, e);
  }
}

/** The last `audit.signing_key` record at or before `seq`, or null. */
async function lastSigningKeyUpTo(jfs: JournalFs, fd: number, file: string, seq: number): Promise<{ seq: number; fingerprint: string } | null> {
  const needle = Buffer.from('"type":"audit.signing_key"');
  let found: { seq: number; fingerprint: string } | null = null;
  let line = 0;
  await scanLines(jfs, fd, file, (bytes) => {
    line += 1;
    if (line > seq) return false;
    if (bytes.includes(needle)) {
      try {
        const rec = JSON.parse(bytes.toString("utf8")) as { type?: unknown; seq?: unknown; fingerprint?: unknown };
        if (rec.type === "audit.signing_key" && typeof rec.seq === "number" && typeof rec.fingerprint === "string") found = { seq: rec.seq, fingerprint: rec.fingerprint };
      } catch {
        /* a bad line is `audit verify`'s to report */
      }
    }
    return true;
  });
  return found;
}

/** seq of the first `audit.signing_key` record in the journal, or null. */
async function findSigningKeyRecord(jfs: JournalFs, fd: number, file: string): Promise<number | null> {
  const needle = Buffer.from('"type":"audit.signing_key"');
  const STEP = 1 << 20;
  try {
    const size = await jfs.size(fd);
    let carry = Buffer.alloc(0);
    for (let pos = 0; pos < size; pos += STEP) {
      const chunk = Buffer.concat([carry, await readExactly(jfs, fd, pos, Math.min(STEP, size - pos))]);
      let lineStart = 0;
      for (;;) {
        const nl = chunk.indexOf(10, lineStart);
        if (nl < 0) break;
        const line = chunk.subarray(lineStart, nl);
        if (line.includes(needle)) {
          try {
            const rec = JSON.parse(line.toString("utf8")) as { type?: unknown; seq?: unknown };
            if (rec.type === "audit.signing_key" && typeof rec.seq === "number") return rec.seq;
          } catch {
            /* a bad line is `audit verify`'s to report */
          }
        }
        lineStart = nl + 1;
      }
      carry = chunk.subarray(lineStart);
    }
  } catch (e) {
    throw auditFailed("read", file, e);
  }
  return null;
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
