/**
 * `sandboxd audit verify`: walks audit.jsonl line by line (streamed, so a
 * large journal is never held in memory) and checks each line's UTF-8 and
 * JSON, seq continuity, the prev link, the hash and the canonical form, then
 * compares the end of the chain with audit.anchor (a journal shorter than
 * its anchor was truncated) and checks the anchor's signature against the
 * signing keys the trail records (`audit.signing_key`; with `pinned`, every
 * one of them must be pinned). Names the first bad seq, or says the chain is
 * intact up to N. `ChainChecker` is shared with the bundle check (bundle.ts).
 *
 * The anchor is read before the journal, so a daemon appending meanwhile
 * cannot make a healthy journal look truncated; a final line still being
 * written shows up as `tornTailBytes`, not as an error.
 */
import { isUtf8 } from "node:buffer";
import { constants as fsConstants } from "node:fs";
import { open, readFile, type FileHandle } from "node:fs/promises";
import path from "node:path";
import { SandboxdError } from "../errors.js";
import type { KeyObject } from "node:crypto";
import { ANCHOR_FILE, GENESIS_HASH, JOURNAL_FILE, checkRecord, parseAnchor, type Anchor, type AuditRecord } from "./journal.js";
import { fingerprintOf, publicKeyFromPem, verifyAnchorSignature } from "./signing.js";

/** A signing key the trail records (`audit.signing_key`, written by the journal each time it opens with a signer). */
export interface RecordedKey {
  fingerprint: string;
  publicKey: string;
  seq: number;
  previousKey: string | null;
  /** the state dir the key signed this trail in (recorded since trails are checked against a witness) */
  stateDir?: string;
}

/** A policy the trail records: loaded at start, reloaded, or a reload refused. */
export interface RecordedPolicy {
  seq: number;
  type: string;
  file: string | null;
  sha256: string | null;
  bytes: number | null;
  rules: number | null;
}

const POLICY_TYPES = new Set(["policy.load", "policy.reload", "policy.reload_refused"]);

export type VerifyFailure = { ok: false; badSeq: number; reason: string; verifiedUpTo: number };

/**
 * A head known from outside the files being verified — the witness beside
 * the key (./witness.ts), or the running daemon's own memory of what it
 * wrote and signed. The trail must reach it with this hash.
 */
export interface Checkpoint {
  seq: number;
  hash: string;
  /** how it is named in a failure, e.g. "the witness /etc/sandboxd/audit-signing.key.heads/…" */
  source: string;
}

export type VerifyResult =
  | {
      ok: true;
      records: number;
      lastSeq: number;
      lastHash: string;
      /** the anchor's {seq, hash} (and key, sig when signed); null when there is no audit.anchor */
      anchor: Anchor | null;
      /** the anchor's signature, checked: by which key, up to which seq; null when the anchor is not signed */
      signature: { key: string; seq: number } | null;
      /** signing keys the trail records, in order */
      keys: RecordedKey[];
      /** every recorded key was among the keys the caller pinned (false when none were pinned) */
      pinned: boolean;
      /** heads known from outside the state dir that the trail was checked against (witness, daemon memory) */
      checkpoints: Checkpoint[];
      /**
       * records after the signed head (first, last), or null: no signature
       * covers them yet. While the daemon runs that is the last ≤100 ms; after
       * a crash, what was written since the last signature (docs/AUDIT.md
       * "Threat model").
       */
      unsigned: { from: number; to: number } | null;
      /**
       * bytes after the last newline: a record torn by a crash, never
       * acknowledged (it is after the anchor); opening the journal drops it
       */
      tornTailBytes: number;
    }
  | VerifyFailure;

/**
 * Checks audit.jsonl lines one at a time, as they are read (journal or
 * bundle): UTF-8, JSON, seq continuity, prev link, hash, canonical form, and
 * the hash at the anchored seq. Collects the signing keys and policies the
 * trail records; `finishSignature` then checks the anchor's signature.
 */
export class ChainChecker {
  lastSeq = 0;
  lastHash = GENESIS_HASH;
  lineNo = 0;
  readonly keys: RecordedKey[] = [];
  readonly policies: RecordedPolicy[] = [];
  private readonly keyObjects = new Map<string, KeyObject>();

  /**
   * @param anchor the anchor to compare with the record at its seq, if any; @param label how a line is named in reasons
   * @param checkpoints heads known from outside the files: the record at each seq must have its hash
   */
  constructor(
    private readonly anchor: Anchor | null,
    private readonly label = "line",
    readonly checkpoints: readonly Checkpoint[] = [],
  ) {}

  /** A checkpoint the records did not reach: they were cut back before it. */
  unreached(): VerifyFailure | null {
    const cp = this.checkpoints.filter((c) => c.seq > this.lastSeq).sort((a, b) => b.seq - a.seq)[0];
    if (!cp) return null;
    return this.fail(
      `the trail ends at seq ${this.lastSeq}, but ${cp.source} names seq ${cp.seq}: records ${this.lastSeq + 1}-${cp.seq} were removed (the trail was rolled back to an older copy, or cut)`,
    );
  }

  fail(reason: string, seq = this.lastSeq + 1): VerifyFailure {
    return { ok: false, badSeq: seq, reason, verifiedUpTo: this.lastSeq };
  }

  line(line: Buffer): VerifyFailure | null {
    this.lineNo += 1;
    const expected = this.lastSeq + 1;
    const bad = (reason: string) => this.fail(`${this.label} ${this.lineNo}: ${reason}`, expected);
    if (!isUtf8(line)) return bad("not valid UTF-8");
    const text = line.toString("utf8");
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      return bad(text === "" ? "empty line" : "not valid JSON");
    }
    const seq = (parsed as { seq?: unknown } | null)?.seq;
    if (typeof seq === "number" && Number.isSafeInteger(seq) && seq !== expected) {
      return bad(
        seq > expected
          ? `expected seq ${expected}, found seq ${seq}: record ${expected} was deleted or records were reordered`
          : `expected seq ${expected}, found seq ${seq} again: records were duplicated or reordered`,
      );
    }
    const recordProblem = checkRecord(text, parsed);
    if (recordProblem) return bad(recordProblem);
    const rec = parsed as AuditRecord;
    if (rec.prev !== this.lastHash) return bad(`prev does not match the hash of record ${this.lastSeq === 0 ? "0 (genesis)" : this.lastSeq}`);
    if (this.anchor && this.anchor.seq === rec.seq && this.anchor.hash !== rec.hash) {
      return bad(`hash differs from the one ${ANCHOR_FILE} holds for this seq: the chain was rewritten from here`);
    }
    const signed = this.anchor?.signed;
    if (signed && signed.seq === rec.seq && signed.hash !== rec.hash) {
      return bad(`hash differs from the one the anchor's signed head holds for this seq: the chain was rewritten from here`);
    }
    for (const cp of this.checkpoints) {
      if (cp.seq === rec.seq && cp.hash !== rec.hash) {
        return bad(`hash differs from the one ${cp.source} holds for this seq: the trail was rewritten up to here, rolled back, or is another trail`);
      }
    }
    if (rec.type === "audit.anchor_missing" && this.keys.length > 0) {
      const k = this.keys[0]!;
      return bad(
        `audit.anchor_missing: the daemon found no anchor here, but the trail had recorded signing key ${k.fingerprint} at seq ${k.seq}: the signed anchor was removed, and records 1-${rec.seq - 1} could have been rewritten before this start`,
      );
    }
    if (rec.type === "audit.signing_key") {
      const problem = this.addKey(rec);
      if (problem) return bad(`audit.signing_key: ${problem}`);
    } else if (POLICY_TYPES.has(rec.type)) {
      const num = (v: unknown) => (typeof v === "number" ? v : null);
      const str = (v: unknown) => (typeof v === "string" ? v : null);
      this.policies.push({ seq: rec.seq, type: rec.type, file: str(rec.file), sha256: str(rec.sha256), bytes: num(rec.bytes), rules: num(rec.rules) });
    }
    this.lastSeq = rec.seq;
    this.lastHash = rec.hash;
    return null;
  }

  private addKey(rec: AuditRecord): string | null {
    const { fingerprint, publicKey, previousKey } = rec as { fingerprint?: unknown; publicKey?: unknown; previousKey?: unknown };
    if (typeof fingerprint !== "string" || typeof publicKey !== "string") return "no fingerprint or public key";
    const key = publicKeyFromPem(publicKey);
    if (!key) return "its public key is not an ed25519 public key in PEM form";
    if (fingerprintOf(key) !== fingerprint) return `the fingerprint ${fingerprint} is not that of its public key (${fingerprintOf(key)})`;
    const prev = typeof previousKey === "string" ? previousKey : null;
    if (prev !== null && !this.keyObjects.has(prev)) {
      return `it names previous key ${prev}, which the trail never recorded: the anchor was replaced before this start`;
    }
    this.keyObjects.set(fingerprint, key);
    const stateDir = (rec as { stateDir?: unknown }).stateDir;
    this.keys.push({ fingerprint, publicKey, seq: rec.seq, previousKey: prev, ...(typeof stateDir === "string" ? { stateDir } : {}) });
    return null;
  }

  /**
   * The anchor's signature, once every line up to it was checked: made by a
   * key the trail records, and valid over {seq, hash}. An unsigned anchor is
   * accepted only when the trail recorded no key at or before it. With
   * `pinned` (fingerprints), every key the trail records must be one of them.
   */
  finishSignature(anchor: Anchor | null, pinned: readonly string[]): VerifyFailure | { signature: { key: string; seq: number } | null; pinned: boolean } {
    const after = (a: { seq: number }) => a.seq + 1;
    if (pinned.length > 0) {
      const stranger = this.keys.find((k) => !pinned.includes(k.fingerprint));
      if (stranger) {
        return this.fail(`signing key ${stranger.fingerprint} (recorded at seq ${stranger.seq}) is not among the pinned keys (${pinned.join(", ")}): the trail was re-signed with a key that is not the daemon's`, stranger.seq);
      }
    }
    if (!anchor) {
      const k = this.keys[0];
      if (k) return this.fail(`there is no anchor, but the trail records signing key ${k.fingerprint} at seq ${k.seq}: the signed anchor was removed`, this.lastSeq + 1);
      return { signature: null, pinned: false };
    }
    const signed = anchor.signed;
    if (!signed) {
      const signedBefore = this.keys.find((k) => k.seq <= anchor.seq);
      if (signedBefore) {
        return this.fail(`the anchor at seq ${anchor.seq} carries no signature, but the trail records signing key ${signedBefore.fingerprint} at seq ${signedBefore.seq}: the signed anchor was replaced`, after(anchor));
      }
      if (pinned.length > 0) return this.fail(`the anchor at seq ${anchor.seq} is not signed, so it cannot be checked against the pinned keys`, after(anchor));
      return { signature: null, pinned: false };
    }
    const key = this.keyObjects.get(signed.key);
    if (!key) {
      return this.fail(
        `the anchor at seq ${signed.seq} is signed with key ${signed.key}, which the trail does not record (${this.keys.length ? `recorded: ${this.keys.map((k) => k.fingerprint).join(", ")}` : "it records none"}): the anchor was re-signed with another key`,
        after(signed),
      );
    }
    // A rotation retires a key: only the key in force at the signed seq (the last one recorded at or before it) signs
    // there. Else an old key — stolen, the reason to rotate — could sign a rewrite of what came after its successor.
    const inForce = this.keys.filter((k) => k.seq <= signed.seq).at(-1);
    if (inForce && inForce.fingerprint !== signed.key) {
      return this.fail(
        `the anchor at seq ${signed.seq} is signed with key ${signed.key}, but the key in force there is ${inForce.fingerprint} (recorded at seq ${inForce.seq}): a retired key signed records written after it was replaced (was it stolen?)`,
        after(signed),
      );
    }
    if (!verifyAnchorSignature(signed, signed.sig, key)) {
      return this.fail(
        `the anchor's signature over seq ${signed.seq} does not verify with key ${signed.key}: the records up to seq ${signed.seq} (or the anchor) were changed after it was signed`,
        after(signed),
      );
    }
    return { signature: { key: signed.key, seq: signed.seq }, pinned: pinned.length > 0 };
  }
}

/**
 * Verifies the journal in `dir`. `pinned`: fingerprints of the keys the
 * caller trusts (the daemon pins its own); every key the trail records must
 * then be one of them.
 */
export async function verifyJournal(dir: string, opts: { pinned?: readonly string[]; checkpoints?: readonly Checkpoint[] } = {}): Promise<VerifyResult> {
  const file = path.join(dir, JOURNAL_FILE);
  const anchorFile = path.join(dir, ANCHOR_FILE);

  let anchor: Anchor | null = null;
  let anchorProblem: string | null = null;
  // The daemon overwrites the anchor in place; a read racing that write could
  // see a mix, so an unparsable anchor is read again before it is reported.
  for (let attempt = 0; attempt < 3; attempt++) {
    anchorProblem = null;
    try {
      const bytes = await readFile(anchorFile);
      if (bytes.length > 0) anchor = parseAnchor(bytes, anchorFile); // empty: created, never written
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") break;
      anchorProblem = (e as Error).message;
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  const checkpoints = opts.checkpoints ?? [];
  const checker = new ChainChecker(anchor, "line", checkpoints);
  let carry: Buffer[] = [];
  // O_NOFOLLOW: the journal is a file of the state dir, never a link to somewhere else
  let stream: ReturnType<FileHandle["createReadStream"]> | null = null;
  try {
    const fh = await open(file, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW);
    stream = fh.createReadStream({ highWaterMark: 1 << 20 });
    for await (const chunk of stream as AsyncIterable<Buffer>) {
      let start = 0;
      for (;;) {
        const nl = chunk.indexOf(10, start);
        if (nl < 0) {
          if (start < chunk.length) carry.push(chunk.subarray(start));
          break;
        }
        const piece = chunk.subarray(start, nl);
        const line = carry.length > 0 ? Buffer.concat([...carry, piece]) : piece;
        carry = [];
        const res = checker.line(line);
        if (res) return res;
        start = nl + 1;
      }
    }
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ELOOP") return { ok: false, badSeq: 1, reason: `${file} is a symbolic link, not the journal: the state dir was tampered with`, verifiedUpTo: 0 };
    if (code === "ENOENT" && checker.lineNo === 0) {
      if (anchor && anchor.seq > 0) return { ok: false, badSeq: 1, reason: `${file} is missing; truncated: anchor says ${anchor.seq}`, verifiedUpTo: 0 };
      const gone = checker.unreached();
      if (gone) return { ...gone, reason: `${file} is missing; ${gone.reason}` };
      return { ok: true, records: 0, lastSeq: 0, lastHash: GENESIS_HASH, anchor, signature: null, keys: [], pinned: false, checkpoints: [...checkpoints], unsigned: null, tornTailBytes: 0 };
    }
    throw new SandboxdError("SBX_ERR_AUDIT_FAILED", `cannot read ${file}: ${(e as Error).message}`, { cause: e });
  } finally {
    stream?.destroy();
  }
  const tornTailBytes = carry.reduce((n, b) => n + b.length, 0);
  const { lastSeq, lastHash } = checker;

  if (anchor && anchor.seq > lastSeq) {
    return { ok: false, badSeq: lastSeq + 1, reason: `truncated: anchor says ${anchor.seq}, the journal ends at ${lastSeq}`, verifiedUpTo: lastSeq };
  }
  const unreached = checker.unreached();
  if (unreached) return unreached;
  if (anchorProblem) {
    return {
      ok: false,
      badSeq: lastSeq + 1,
      reason: `${anchorProblem}: records 1-${lastSeq} verify, but truncation of the tail cannot be ruled out`,
      verifiedUpTo: lastSeq,
    };
  }
  const sig = checker.finishSignature(anchor, opts.pinned ?? []);
  if ("ok" in sig) return sig;
  const signedUpTo = sig.signature?.seq ?? 0;
  const unsigned = checker.keys.length > 0 && signedUpTo < lastSeq ? { from: signedUpTo + 1, to: lastSeq } : null;
  return { ok: true, records: lastSeq, lastSeq, lastHash, anchor, signature: sig.signature, keys: checker.keys, pinned: sig.pinned, checkpoints: [...checkpoints], unsigned, tornTailBytes };
}

/** One line for the CLI. */
export function describeVerifyResult(r: VerifyResult): string {
  if (!r.ok) {
    return `audit chain broken at seq ${r.badSeq}: ${r.reason} (records 1-${r.verifiedUpTo} verify)`;
  }
  const notes: string[] = [];
  notes.push(r.anchor ? `anchor at ${r.anchor.seq}` : "no anchor file");
  if (r.signature) notes.push(`signed up to ${r.signature.seq} with key ${r.signature.key}${r.pinned ? " (pinned)" : ", key not pinned"}`);
  else if (r.anchor) notes.push("anchor not signed");
  if (r.unsigned) notes.push(`records ${r.unsigned.from}-${r.unsigned.to} after the last signature, covered by the chain alone`);
  for (const cp of r.checkpoints) notes.push(`reaches seq ${cp.seq} of ${cp.source}`);
  if (r.tornTailBytes > 0) notes.push(`${r.tornTailBytes} bytes of an unacknowledged torn record at the end`);
  return `audit chain intact up to ${r.lastSeq} (${r.records} records; ${notes.join("; ")})`;
}

/** For callers that must not go on with a broken chain: throws SBX_ERR_AUDIT_CORRUPT naming the record. */
export async function assertJournalIntact(dir: string): Promise<Extract<VerifyResult, { ok: true }>> {
  const r = await verifyJournal(dir);
  if (!r.ok) throw new SandboxdError("SBX_ERR_AUDIT_CORRUPT", describeVerifyResult(r), { details: r });
  return r;
}
