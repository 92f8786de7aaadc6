/**
 * `sandboxd audit export` and `sandboxd audit verify --bundle`: the audit
 * trail as one file an auditor can check on another machine, without the
 * daemon or its state dir.
 *
 * A bundle is JSON lines (docs/AUDIT.md "Export bundle"):
 *
 *   line 1       header  {"bundle":"sandboxd.audit.bundle.v1", createdAt,
 *                         records, lastSeq, lastHash, signingKeys, policies, source}
 *   lines 2…N+1  the records 1…N of audit.jsonl, byte for byte
 *   line N+2     {"anchor":{"hash","key","seq","sig"}}: the chain head, signed
 *
 * Why JSON lines and not a tar: the records already are canonical JSON lines,
 * so they go in unchanged (`sed -n '2,$p' | head -n -1` gives audit.jsonl
 * back) and the recipe that checks audit.jsonl by hand checks them too; a
 * reader needs a line splitter, SHA-256 and ed25519 (`openssl pkeyutl`),
 * no archive format; and both export and verification stream, so a trail of
 * any size needs no memory for it.
 *
 * What is trusted: the anchor's signature covers the chain head, and through
 * the hash chain every record. The header is not signed; its keys, policies,
 * counts and last hash are checked against the records, and `source` and
 * `createdAt` are for the reader only (the export itself is a record of the
 * chain, `audit.export`, with its time).
 */
import { createReadStream } from "node:fs";
import path from "node:path";
import { SandboxdError } from "../errors.js";
import { canonicalJson } from "./canonical.js";
import { JOURNAL_FILE, type AuditJournal, type SignedHead } from "./journal.js";
import { publicKeyFromPem, fingerprintOf, type AnchorSigner } from "./signing.js";
import { ChainChecker, type RecordedKey, type RecordedPolicy, type VerifyFailure } from "./verify.js";

export const BUNDLE_FORMAT = "sandboxd.audit.bundle.v1";

export interface BundleHeader {
  bundle: typeof BUNDLE_FORMAT;
  createdAt: string;
  records: number;
  lastSeq: number;
  lastHash: string;
  signingKeys: RecordedKey[];
  policies: RecordedPolicy[];
  source: Record<string, string | number>;
}

/** Complete lines of a file (or stream), each without its "\n"; a final piece without one is returned as its own line. */
async function* lines(input: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  let carry: Buffer[] = [];
  for await (const chunk of input) {
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(10, start);
      if (nl < 0) {
        if (start < chunk.length) carry.push(chunk.subarray(start));
        break;
      }
      const piece = chunk.subarray(start, nl);
      yield carry.length > 0 ? Buffer.concat([...carry, piece]) : piece;
      carry = [];
      start = nl + 1;
    }
  }
  if (carry.length > 0) yield Buffer.concat(carry);
}

/** The journal's first `count` lines (records 1…count), read again for the second pass. */
async function* journalLines(file: string, count: number): AsyncGenerator<Buffer> {
  if (count === 0) return;
  let n = 0;
  const stream = createReadStream(file, { highWaterMark: 1 << 20 });
  try {
    for await (const line of lines(stream as AsyncIterable<Buffer>)) {
      yield line;
      if (++n === count) return;
    }
  } finally {
    stream.destroy();
  }
  throw new SandboxdError("SBX_ERR_AUDIT_CORRUPT", `${file} ended after ${n} records while it was being exported (${count} expected)`);
}

export interface PreparedExport {
  header: BundleHeader;
  anchor: SignedHead;
  /** the bundle's bytes, line by line */
  body(): AsyncGenerator<Buffer>;
}

/**
 * Records `audit.export` (so the export is itself on the trail, and the
 * bundle ends at it), checks the chain up to that record (a broken chain is
 * not exported: SBX_ERR_AUDIT_CORRUPT names the record), signs its head, and
 * returns the header and the bundle's bytes to stream.
 */
export async function prepareExport(opts: {
  stateDir: string;
  journal: AuditJournal;
  signer: AnchorSigner;
  source: Record<string, string | number>;
  /** the auditor's challenge, recorded in audit.export: the bundle answers this request, it is not an older one */
  nonce?: string | undefined;
}): Promise<PreparedExport> {
  const file = path.join(opts.stateDir, JOURNAL_FILE);
  const rec = await opts.journal.append({ type: "audit.export", format: BUNDLE_FORMAT, key: opts.signer.fingerprint, nonce: opts.nonce });
  const head = { seq: rec.seq, hash: rec.hash };
  const checker = new ChainChecker(head);
  for await (const line of journalLines(file, head.seq)) {
    const bad = checker.line(line);
    if (bad) throw new SandboxdError("SBX_ERR_AUDIT_CORRUPT", `not exported: audit chain broken at seq ${bad.badSeq}: ${bad.reason}`, { details: bad });
  }
  const anchor = { seq: head.seq, hash: head.hash, key: opts.signer.fingerprint, sig: opts.signer.signSync(head) };
  const header: BundleHeader = {
    bundle: BUNDLE_FORMAT,
    createdAt: rec.ts,
    records: head.seq,
    lastSeq: head.seq,
    lastHash: head.hash,
    signingKeys: checker.keys,
    policies: checker.policies,
    source: opts.source,
  };
  return {
    header,
    anchor,
    body: async function* () {
      yield Buffer.from(`${canonicalJson(header as never)}\n`);
      for await (const line of journalLines(file, head.seq)) yield Buffer.concat([line, Buffer.from("\n")]);
      yield Buffer.from(`${canonicalJson({ anchor })}\n`);
    },
  };
}

export type BundleVerifyResult =
  | {
      ok: true;
      records: number;
      lastSeq: number;
      lastHash: string;
      /** fingerprint of the key that signed the bundle's anchor */
      key: string;
      /** every key the trail records was pinned by the caller */
      pinned: boolean;
      keys: RecordedKey[];
      policies: RecordedPolicy[];
      createdAt: string;
      source: Record<string, unknown>;
      /** the nonce the export answered (its audit.export record), or null */
      nonce: string | null;
    }
  | VerifyFailure;

/** A fingerprint (64 hex) or the PEM of a public key: the fingerprint to pin. Null when it is neither. */
export function pinnedFingerprint(text: string): string | null {
  const t = text.trim();
  if (/^[0-9a-f]{64}$/i.test(t)) return t.toLowerCase();
  const key = publicKeyFromPem(t);
  return key ? fingerprintOf(key) : null;
}

function same(a: unknown, b: unknown): boolean {
  return canonicalJson(a as never) === canonicalJson(b as never);
}

/**
 * Checks a bundle on its own: the header's form, every record's chain link,
 * hash and canonical form, the signed anchor at the last record (no record
 * missing at the end, none added after it), its signature by a key the trail
 * records, the header against the records, and with `pinned` that every key
 * the trail records is pinned. The first failure is returned, naming it.
 */
export async function verifyBundle(input: AsyncIterable<Buffer>, opts: { pinned?: readonly string[]; nonce?: string | undefined } = {}): Promise<BundleVerifyResult> {
  const fail = (reason: string, badSeq = 0, verifiedUpTo = 0): VerifyFailure => ({ ok: false, badSeq, reason, verifiedUpTo });
  let header: BundleHeader | null = null;
  let checker: ChainChecker | null = null;
  let pending: Buffer | null = null;
  let lineNo = 0;
  let lastRecord: { type: string; ts: string; nonce?: unknown } | null = null;
  for await (const line of lines(input)) {
    lineNo += 1;
    if (lineNo === 1) {
      let parsed: unknown;
      try {
        parsed = JSON.parse(line.toString("utf8"));
      } catch {
        return fail("line 1 (the header) is not JSON: this is not a sandboxd audit bundle");
      }
      const h = parsed as Partial<BundleHeader> | null;
      if (typeof h !== "object" || h === null || h.bundle !== BUNDLE_FORMAT) {
        return fail(`line 1 is not a bundle header (${BUNDLE_FORMAT}): this is not a sandboxd audit bundle, or one of another version`);
      }
      header = h as BundleHeader;
      continue;
    }
    // a line is a record unless it is the last one, the anchor: each is checked once the next has come
    if (pending) {
      checker ??= new ChainChecker(null, "bundle line");
      const bad = checker.line(pending);
      if (bad) return { ...bad, reason: bad.reason.replace(/^bundle line (\d+)/, (_, n: string) => `bundle line ${Number(n) + 1} (record)`) };
      lastRecord = JSON.parse(pending.toString("utf8")) as { type: string; ts: string; nonce?: unknown }; // checked by checker.line
    }
    pending = line;
  }
  if (!header) return fail("the file is empty: this is not a sandboxd audit bundle");
  if (!pending || !checker) return fail("the bundle holds no records, or no signed anchor after them");
  const c = checker;

  let anchor: SignedHead;
  try {
    const a = (JSON.parse(pending.toString("utf8")) as { anchor?: Partial<SignedHead> } | null)?.anchor;
    if (!a || typeof a.seq !== "number" || typeof a.hash !== "string" || typeof a.key !== "string" || typeof a.sig !== "string") throw new Error("no anchor");
    anchor = { seq: a.seq, hash: a.hash, key: a.key, sig: a.sig };
  } catch {
    return fail(`the last line is not a signed anchor {"anchor":{seq,hash,key,sig}}: the bundle was cut short or its anchor removed`, c.lastSeq + 1, c.lastSeq);
  }
  if (anchor.seq > c.lastSeq) {
    return fail(`the signed anchor names seq ${anchor.seq}, but the bundle's records end at seq ${c.lastSeq}: records were removed from the end`, c.lastSeq + 1, c.lastSeq);
  }
  if (anchor.seq < c.lastSeq) {
    return fail(`records ${anchor.seq + 1}-${c.lastSeq} come after the signed anchor (seq ${anchor.seq}): they were added to the bundle`, anchor.seq + 1, anchor.seq);
  }
  if (anchor.hash !== c.lastHash) {
    return fail(`the signed anchor holds another hash for seq ${anchor.seq} than the records give: the chain was rewritten`, anchor.seq, anchor.seq - 1);
  }
  const sig = c.finishSignature({ seq: anchor.seq, hash: anchor.hash, signed: anchor }, opts.pinned ?? []);
  if ("ok" in sig) return sig;
  // Every export ends at its own audit.export record. Any head the daemon ever signed (an old audit.anchor, say)
  // would otherwise make a valid-looking bundle of a shorter trail.
  const last = lastRecord!;
  if (last.type !== "audit.export") {
    return fail(
      `the bundle's last record (seq ${c.lastSeq}) is a ${last.type}, not the audit.export record every export ends with: the trail was cut back to an earlier signed head, or the bundle was not made by \`sandboxd audit export\``,
      c.lastSeq,
      c.lastSeq,
    );
  }
  const nonce = typeof last.nonce === "string" ? last.nonce : null;
  if (opts.nonce !== undefined && nonce !== opts.nonce) {
    return fail(
      `the bundle answers ${nonce === null ? "no nonce" : `nonce ${JSON.stringify(nonce)}`}, not ${JSON.stringify(opts.nonce)} (its audit.export record, seq ${c.lastSeq}, at ${last.ts}): it is an older export, or one made for another request`,
      c.lastSeq,
      c.lastSeq,
    );
  }
  // the header is not signed: what it says must be what the records say
  const problems: string[] = [];
  if (header.records !== c.lastSeq || header.lastSeq !== c.lastSeq) problems.push(`it counts ${header.records} records up to seq ${header.lastSeq}, the bundle holds ${c.lastSeq}`);
  if (header.lastHash !== c.lastHash) problems.push("its lastHash is not the last record's hash");
  if (header.createdAt !== last.ts) problems.push(`its createdAt ${String(header.createdAt)} is not the time of the export's record (${last.ts})`);
  if (!same(header.signingKeys, c.keys)) problems.push("its signing keys are not those the records hold (audit.signing_key)");
  if (!same(header.policies, c.policies)) problems.push("its policies are not those the records hold (policy.load, policy.reload, policy.reload_refused)");
  if (problems.length > 0) return fail(`the header disagrees with the signed records: ${problems.join("; ")}`, 0, c.lastSeq);
  return {
    ok: true,
    records: c.lastSeq,
    lastSeq: c.lastSeq,
    lastHash: c.lastHash,
    key: anchor.key,
    pinned: sig.pinned,
    keys: c.keys,
    policies: c.policies,
    createdAt: String(header.createdAt),
    source: header.source ?? {},
    nonce,
  };
}

export async function verifyBundleFile(file: string, opts: { pinned?: readonly string[]; nonce?: string | undefined } = {}): Promise<BundleVerifyResult> {
  const stream = createReadStream(file, { highWaterMark: 1 << 20 });
  try {
    return await verifyBundle(stream as AsyncIterable<Buffer>, opts);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code) throw new SandboxdError("SBX_ERR_VALIDATION", `cannot read the bundle ${file}: ${code}`, { cause: e, hint: "name an audit bundle written by `sandboxd audit export`" });
    throw e;
  } finally {
    stream.destroy();
  }
}

/** One paragraph for the CLI. */
export function describeBundleResult(r: BundleVerifyResult, file: string): string {
  if (!r.ok) return `audit bundle ${file} REFUSED: ${r.reason}${r.verifiedUpTo > 0 ? ` (records 1-${r.verifiedUpTo} verify)` : ""}`;
  const lines = [
    `audit bundle ${file} verifies: ${r.records} records, chain intact, anchor at seq ${r.lastSeq} signed with key ${r.key}${r.pinned ? " (pinned)" : ""}`,
    `  exported at ${r.createdAt}${r.nonce !== null ? ` for nonce ${JSON.stringify(r.nonce)}` : " (no nonce: pass one to `audit export --nonce` to know the bundle is not an older one)"}`,
  ];
  if (!r.pinned) {
    lines.push(
      "  the signing key is not pinned: the bundle proves it is unchanged since that key signed it; to prove the key is the daemon's, compare the fingerprint with `sandboxd audit key` on the daemon's machine, or pass --key",
    );
  }
  for (const k of r.keys) lines.push(`  signing key ${k.fingerprint} recorded at seq ${k.seq}${k.previousKey ? ` (after ${k.previousKey})` : ""}${k.stateDir ? ` for state dir ${k.stateDir}` : ""}`);
  for (const p of r.policies) lines.push(`  ${p.type} seq ${p.seq}: ${p.file ?? "?"} sha256 ${p.sha256 ?? "unreadable"} (${p.rules ?? "?"} rules)`);
  return lines.join("\n");
}
