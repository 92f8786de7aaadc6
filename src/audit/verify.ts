/**
 * `sandboxd audit verify`: walks audit.jsonl line by line (streamed, so a
 * large journal is never held in memory) and checks each line's UTF-8 and
 * JSON, seq continuity, the prev link, the hash and the canonical form, then
 * compares the end of the chain with audit.anchor (a journal shorter than
 * its anchor was truncated). Names the first bad seq, or says the chain is
 * intact up to N.
 *
 * The anchor is read before the journal, so a daemon appending meanwhile
 * cannot make a healthy journal look truncated; a final line still being
 * written shows up as `tornTailBytes`, not as an error.
 */
import { isUtf8 } from "node:buffer";
import { createReadStream } from "node:fs";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { SandboxdError } from "../errors.js";
import { ANCHOR_FILE, GENESIS_HASH, JOURNAL_FILE, checkRecord, parseAnchor, type ChainHead } from "./journal.js";

export type VerifyResult =
  | {
      ok: true;
      records: number;
      lastSeq: number;
      lastHash: string;
      /** the anchor's {seq, hash}; null when there is no audit.anchor */
      anchor: ChainHead | null;
      /**
       * bytes after the last newline: a record torn by a crash, never
       * acknowledged (it is after the anchor); opening the journal drops it
       */
      tornTailBytes: number;
    }
  | { ok: false; badSeq: number; reason: string; verifiedUpTo: number };

export async function verifyJournal(dir: string): Promise<VerifyResult> {
  const file = path.join(dir, JOURNAL_FILE);
  const anchorFile = path.join(dir, ANCHOR_FILE);

  let anchor: ChainHead | null = null;
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

  let lastSeq = 0;
  let lastHash = GENESIS_HASH;
  let lineNo = 0;

  const check = (line: Buffer): { ok: false; badSeq: number; reason: string; verifiedUpTo: number } | null => {
    lineNo += 1;
    const expected = lastSeq + 1;
    const bad = (reason: string, seq = expected) => ({ ok: false as const, badSeq: seq, reason: `line ${lineNo}: ${reason}`, verifiedUpTo: lastSeq });
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
    const rec = parsed as { seq: number; prev: string; hash: string };
    if (rec.prev !== lastHash) return bad(`prev does not match the hash of record ${lastSeq === 0 ? "0 (genesis)" : lastSeq}`);
    if (anchor && anchor.seq === rec.seq && anchor.hash !== rec.hash) {
      return bad(`hash differs from the one ${ANCHOR_FILE} holds for this seq: the chain was rewritten from here`);
    }
    lastSeq = rec.seq;
    lastHash = rec.hash;
    return null;
  };

  let carry: Buffer[] = [];
  const stream = createReadStream(file, { highWaterMark: 1 << 20 });
  try {
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
        const res = check(line);
        if (res) return res;
        start = nl + 1;
      }
    }
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ENOENT" && lineNo === 0) {
      if (anchor && anchor.seq > 0) return { ok: false, badSeq: 1, reason: `${file} is missing; truncated: anchor says ${anchor.seq}`, verifiedUpTo: 0 };
      return { ok: true, records: 0, lastSeq: 0, lastHash: GENESIS_HASH, anchor, tornTailBytes: 0 };
    }
    throw new SandboxdError("SBX_ERR_AUDIT_FAILED", `cannot read ${file}: ${(e as Error).message}`, { cause: e });
  } finally {
    stream.destroy();
  }
  const tornTailBytes = carry.reduce((n, b) => n + b.length, 0);

  if (anchor && anchor.seq > lastSeq) {
    return { ok: false, badSeq: lastSeq + 1, reason: `truncated: anchor says ${anchor.seq}, the journal ends at ${lastSeq}`, verifiedUpTo: lastSeq };
  }
  if (anchorProblem) {
    return {
      ok: false,
      badSeq: lastSeq + 1,
      reason: `${anchorProblem}: records 1-${lastSeq} verify, but truncation of the tail cannot be ruled out`,
      verifiedUpTo: lastSeq,
    };
  }
  return { ok: true, records: lastSeq, lastSeq, lastHash, anchor, tornTailBytes };
}

/** One line for the CLI. */
export function describeVerifyResult(r: VerifyResult): string {
  if (!r.ok) {
    return `audit chain broken at seq ${r.badSeq}: ${r.reason} (records 1-${r.verifiedUpTo} verify)`;
  }
  const notes: string[] = [];
  notes.push(r.anchor ? `anchor at ${r.anchor.seq}` : "no anchor file");
  if (r.tornTailBytes > 0) notes.push(`${r.tornTailBytes} bytes of an unacknowledged torn record at the end`);
  return `audit chain intact up to ${r.lastSeq} (${r.records} records; ${notes.join("; ")})`;
}

/** For callers that must not go on with a broken chain: throws SBX_ERR_AUDIT_CORRUPT naming the record. */
export async function assertJournalIntact(dir: string): Promise<Extract<VerifyResult, { ok: true }>> {
  const r = await verifyJournal(dir);
  if (!r.ok) throw new SandboxdError("SBX_ERR_AUDIT_CORRUPT", describeVerifyResult(r), { details: r });
  return r;
}
