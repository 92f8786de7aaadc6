/**
 * Attacks on the signed trail by someone who can write the state dir (and an
 * exported bundle) but not the signing key, nor the folder the key lives in
 * (docs/AUDIT.md "Threat model"). Each test performs the attack on real files
 * and asserts that the next open refuses to sign over it and that `verify`
 * fails naming where — or, for what is documented as undetectable, exactly
 * what verify reports instead.
 */
import { generateKeyPairSync } from "node:crypto";
import { copyFile, cp, mkdir, mkdtemp, readFile, rm, symlink, unlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { canonicalJson } from "../../src/audit/canonical.js";
import { ANCHOR_FILE, AuditJournal, JOURNAL_FILE, anchorBytes, recordHash, type Anchor, type AuditRecord } from "../../src/audit/journal.js";
import { AnchorSigner } from "../../src/audit/signing.js";
import { verifyJournal, type Checkpoint } from "../../src/audit/verify.js";
import { verifyBundle } from "../../src/audit/bundle.js";
import { readWitness, witnessFile } from "../../src/audit/witness.js";
import type { Clock } from "../../src/util/clock.js";

const clock: Clock = { now: () => new Date("2026-12-05T01:00:00.000Z"), monotonicMs: () => performance.now() };

let root: string;
let state: string;
let keyFile: string;
let wfile: string;
beforeEach(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), "sbx-attack-"));
  state = path.join(root, "state");
  // the key's folder: out of the attacker's reach; the witness lives there
  keyFile = path.join(root, "etc", "audit-signing.key");
  wfile = witnessFile(keyFile, state);
});
afterEach(async () => {
  await rm(root, { recursive: true, force: true });
});

const signer = AnchorSigner.ephemeral();

function open(dir = state, s: AnchorSigner = signer, witness: string | undefined = witnessFile(keyFile, dir)) {
  return AuditJournal.open(dir, { clock, signer: s, ...(witness ? { witness } : {}) });
}

async function trail(n: number, dir = state): Promise<void> {
  const j = await open(dir);
  for (let i = 0; i < n; i++) await j.append({ type: "shell.exec", argv: ["pytest", `t${i}`] });
  await j.close();
}

async function lines(dir = state): Promise<string[]> {
  return (await readFile(path.join(dir, JOURNAL_FILE), "utf8")).trimEnd().split("\n");
}

async function anchorOf(dir = state): Promise<Anchor> {
  return JSON.parse(await readFile(path.join(dir, ANCHOR_FILE), "utf8")) as Anchor;
}

/** What the CLI and the daemon pass to verify: the witness, when there is one. */
async function witnessCheckpoint(dir = state): Promise<Checkpoint[]> {
  const w = await readWitness(witnessFile(keyFile, dir));
  return w ? [{ seq: w.seq, hash: w.hash, source: `the witness ${witnessFile(keyFile, dir)}` }] : [];
}

/** Re-chains records from line index `from` on: what a writer of the state dir can do without the key. */
function rechain(recs: Array<Record<string, unknown>>, from: number): Array<Record<string, unknown>> {
  for (let i = from; i < recs.length; i++) {
    const { hash: _h, ...rest } = recs[i]!;
    rest.prev = i === 0 ? "0".repeat(64) : (recs[i - 1]!.hash as string);
    recs[i] = { ...rest, hash: recordHash(rest as Record<string, unknown> & { prev: string }) };
  }
  return recs;
}

describe("rollback and truncation to an earlier signed head", () => {
  it("the journal and anchor put back from an older copy: the next open refuses (the witness beside the key), verify names the lost records", async () => {
    await trail(3);
    const old = path.join(root, "old-copy");
    await cp(state, old, { recursive: true });
    const oldLast = (await lines(old)).length;
    await trail(4); // more records, signed: the witness moves on
    const w = (await readWitness(wfile))!;
    expect(w.seq).toBe((await lines()).length);
    await copyFile(path.join(old, JOURNAL_FILE), path.join(state, JOURNAL_FILE));
    await copyFile(path.join(old, ANCHOR_FILE), path.join(state, ANCHOR_FILE));

    // before the witness, this verified: an older trail was genuinely signed
    expect(await verifyJournal(state, { pinned: [signer.fingerprint] })).toMatchObject({ ok: true, lastSeq: oldLast });
    await expect(open()).rejects.toMatchObject({
      code: "SBX_ERR_AUDIT_CORRUPT",
      message: expect.stringMatching(new RegExp(`ends at seq ${oldLast}, but the daemon signed seq ${w.seq} of this trail \\(witness ${wfile}\\): the trail was rolled back`)),
    });
    expect(await verifyJournal(state, { pinned: [signer.fingerprint], checkpoints: await witnessCheckpoint() })).toMatchObject({
      ok: false,
      badSeq: oldLast + 1,
      reason: expect.stringMatching(new RegExp(`the trail ends at seq ${oldLast}, but the witness .* names seq ${w.seq}: records ${oldLast + 1}-${w.seq} were removed`)),
    });
  });

  it("only an old anchor kept, the journal cut back to its signed seq and forged on from there: refused at the witnessed seq", async () => {
    await trail(2);
    const oldAnchor = await readFile(path.join(state, ANCHOR_FILE));
    const signedAt = (await anchorOf()).signed!.seq;
    await trail(3);
    const w = (await readWitness(wfile))!;
    // cut back to the old signed head, then records of the attacker's choosing after it, as long as the real ones
    const recs = (await lines()).map((l) => JSON.parse(l) as Record<string, unknown>);
    for (let i = signedAt; i < recs.length; i++) recs[i] = { ...recs[i]!, type: "shell.exec", argv: ["echo", "nothing happened"] };
    rechain(recs, signedAt);
    await writeFile(path.join(state, JOURNAL_FILE), recs.map((r) => canonicalJson(r as never)).join("\n") + "\n");
    await writeFile(path.join(state, ANCHOR_FILE), oldAnchor);

    await expect(open()).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_CORRUPT", message: expect.stringMatching(new RegExp(`record ${w.seq} of .* has hash [0-9a-f]{64}, not ${w.hash}`)) });
    expect(await verifyJournal(state, { checkpoints: await witnessCheckpoint() })).toMatchObject({
      ok: false,
      badSeq: w.seq,
      reason: expect.stringMatching(/hash differs from the one the witness .* holds for this seq: the trail was rewritten up to here, rolled back, or is another trail/),
    });
  });

  it("the whole trail deleted (journal and anchor): the next open does not start a fresh one", async () => {
    await trail(2);
    await unlink(path.join(state, JOURNAL_FILE));
    await unlink(path.join(state, ANCHOR_FILE));
    await expect(open()).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_CORRUPT", message: expect.stringMatching(/ends at seq 0, but the daemon signed seq 3/) });
    expect(await verifyJournal(state, { checkpoints: await witnessCheckpoint() })).toMatchObject({ ok: false, reason: expect.stringMatching(/the trail ends at seq 0, but the witness .* names seq 3: records 1-3 were removed/) });
  });

  it("another state dir's trail, signed by the same key, put in its place: refused, its hash at the witnessed seq is not this trail's", async () => {
    const other = path.join(root, "other-state");
    await trail(5, other);
    await trail(2);
    await copyFile(path.join(other, JOURNAL_FILE), path.join(state, JOURNAL_FILE));
    await copyFile(path.join(other, ANCHOR_FILE), path.join(state, ANCHOR_FILE));
    // every signature is the shared key's: only the witness tells the trails apart
    expect(await verifyJournal(state, { pinned: [signer.fingerprint] })).toMatchObject({ ok: true });
    await expect(open()).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_CORRUPT", message: expect.stringMatching(/record 3 of .* has hash/) });
    expect(await verifyJournal(state, { checkpoints: await witnessCheckpoint() })).toMatchObject({ ok: false, badSeq: 3 });
    // and the key record says which state dir it signed
    expect(JSON.parse((await lines(other))[0]!)).toMatchObject({ type: "audit.signing_key", stateDir: path.resolve(other) });
  });

  it("a crash: the witness never runs ahead of the trail, and the next open goes on from it", async () => {
    const j = await open();
    for (let i = 0; i < 20; i++) await j.append({ type: "x", i });
    await new Promise((r) => setTimeout(r, 250)); // the background signature lands
    // no close: a SIGKILL. The lock's writer is this (live) process, so take it over as a restart would
    await unlink(path.join(state, "audit.lock"));
    const w = (await readWitness(wfile))!;
    expect(w.seq).toBeLessThanOrEqual((await lines()).length);
    const again = await open();
    await again.append({ type: "after restart" });
    await again.close();
    expect(await verifyJournal(state, { pinned: [signer.fingerprint], checkpoints: await witnessCheckpoint() })).toMatchObject({ ok: true, unsigned: null });
    await j.close().catch(() => undefined);
  });
});

describe("the anchor's unsigned head", () => {
  it("pointed at a re-chained journal while the genuine signed head is kept: the next open refuses to sign over the rewrite", async () => {
    const j = await open(state, signer, undefined);
    for (let i = 0; i < 4; i++) await j.append({ type: "shell.exec", argv: ["pytest", `t${i}`] });
    await j.close();
    const a = await anchorOf();
    // everything from record 2 rewritten; the anchor's {seq, hash} follow the forgery, its signed head stays the genuine one
    const recs = (await lines()).map((l) => JSON.parse(l) as Record<string, unknown>);
    recs[1] = { ...recs[1]!, argv: ["echo", "rewritten"] };
    rechain(recs, 1);
    recs.push({ type: "shell.exec", argv: ["one", "more"], seq: recs.length + 1, ts: a.signed!.seq.toString(), prev: "", hash: "" });
    rechain(recs, recs.length - 1);
    await writeFile(path.join(state, JOURNAL_FILE), recs.map((r) => canonicalJson(r as never)).join("\n") + "\n");
    const tail = recs.at(-1)!;
    await writeFile(path.join(state, ANCHOR_FILE), anchorBytes({ seq: tail.seq as number, hash: tail.hash as string, signed: a.signed! }));
    await expect(open(state, signer, undefined)).rejects.toMatchObject({
      code: "SBX_ERR_AUDIT_CORRUPT",
      message: expect.stringMatching(`record ${a.signed!.seq} of .* has hash [0-9a-f]{64}, not the hash ${a.signed!.hash} that .*audit.anchor's signature covers: the records up to it were rewritten`),
    });
    expect(await verifyJournal(state)).toMatchObject({ ok: false, badSeq: a.signed!.seq, reason: expect.stringMatching(/hash differs from the one the anchor's signed head holds/) });
  });
});

describe("heads checked at open, read backwards across a large journal", () => {
  it("a signed head far behind the tail (a crash after a long unsigned run) is found and matched; a forged one is not", async () => {
    const j = await open(state, signer, undefined);
    const pad = "x".repeat(3000);
    for (let i = 0; i < 800; i++) void j.append({ type: "bulk", i, pad });
    await j.append({ type: "last" });
    await j.close();
    const recs = (await lines()).map((l) => JSON.parse(l) as AuditRecord);
    const tail = recs.at(-1)!;
    const early = recs[9]!; // ~2.4 MB before the end: more than one 1 MiB step back
    const signedEarly = { seq: early.seq, hash: early.hash, key: signer.fingerprint, sig: signer.signSync(early) };
    await writeFile(path.join(state, ANCHOR_FILE), anchorBytes({ seq: tail.seq, hash: tail.hash, signed: signedEarly }));
    const again = await open(state, signer, undefined);
    await again.close();
    // the same, with the signed head over a hash the journal does not hold at that seq
    const other = { seq: early.seq, hash: "ab".repeat(32) };
    const recs2 = (await lines()).map((l) => JSON.parse(l) as AuditRecord);
    await writeFile(path.join(state, ANCHOR_FILE), anchorBytes({ seq: recs2.at(-1)!.seq, hash: recs2.at(-1)!.hash, signed: { ...other, key: signer.fingerprint, sig: signer.signSync(other) } }));
    await expect(open(state, signer, undefined)).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_CORRUPT", message: expect.stringMatching(`record ${early.seq} of .* has hash ${early.hash}, not the hash ${other.hash}`) });
  });
});

describe("the anchor removed", () => {
  it("with the trail rewritten under it (same keys recorded): the next open refuses instead of recording audit.anchor_missing and signing over the forgery", async () => {
    await trail(4);
    const recs = (await lines()).map((l) => JSON.parse(l) as Record<string, unknown>);
    recs[2] = { ...recs[2]!, argv: ["rm", "-rf", "/"].reverse() };
    rechain(recs, 2);
    await writeFile(path.join(state, JOURNAL_FILE), recs.map((r) => canonicalJson(r as never)).join("\n") + "\n");
    await unlink(path.join(state, ANCHOR_FILE));
    // without the witness: the anchor check alone
    await expect(open(state, signer, undefined)).rejects.toMatchObject({
      code: "SBX_ERR_AUDIT_CORRUPT",
      message: expect.stringMatching(/audit.anchor is missing or empty, but .* records a signing key at seq 1: the signed anchor was removed/),
    });
    // emptied rather than removed: the same
    await writeFile(path.join(state, ANCHOR_FILE), "");
    await expect(open(state, signer, undefined)).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_CORRUPT", message: expect.stringMatching(/missing or empty/) });
  });

  it("verify refuses a trail on which an older daemon recorded audit.anchor_missing after a key: what came before may have been rewritten", async () => {
    await trail(2);
    await unlink(path.join(state, ANCHOR_FILE));
    // a journal without a signer (as a daemon before this check did) records the missing anchor and goes on
    const j = await AuditJournal.open(state, { clock });
    await j.close();
    expect(JSON.parse((await lines()).at(-1)!)).toMatchObject({ type: "audit.anchor_missing", seq: 4 });
    expect(await verifyJournal(state)).toMatchObject({
      ok: false,
      badSeq: 4,
      reason: expect.stringMatching(`line 4: audit.anchor_missing: the daemon found no anchor here, but the trail had recorded signing key ${signer.fingerprint} at seq 1: the signed anchor was removed`),
    });
  });
});

describe("key rotation abused", () => {
  it("a retired key (stolen: the reason to rotate) signs a rewrite of what came after its successor: verify and the next open refuse", async () => {
    const oldKey = AnchorSigner.ephemeral();
    const newKey = AnchorSigner.ephemeral([oldKey]);
    const j1 = await open(state, oldKey, undefined);
    await j1.append({ type: "before rotation" });
    await j1.close();
    const j2 = await open(state, newKey, undefined);
    await j2.append({ type: "shell.exec", argv: ["pytest"] });
    await j2.close();
    const recs = (await lines()).map((l) => JSON.parse(l) as Record<string, unknown>);
    const newKeyAt = recs.find((r) => r.fingerprint === newKey.fingerprint)!.seq as number;
    // the thief rewrites a record after the rotation and signs the head with the old key, which the trail does record
    const i = recs.length - 1;
    recs[i] = { ...recs[i]!, argv: ["echo", "nothing to see"] };
    rechain(recs, i);
    await writeFile(path.join(state, JOURNAL_FILE), recs.map((r) => canonicalJson(r as never)).join("\n") + "\n");
    const head = { seq: recs[i]!.seq as number, hash: recs[i]!.hash as string };
    await writeFile(path.join(state, ANCHOR_FILE), anchorBytes({ ...head, signed: { ...head, key: oldKey.fingerprint, sig: oldKey.signSync(head) } }));
    expect(await verifyJournal(state, { pinned: [oldKey.fingerprint, newKey.fingerprint] })).toMatchObject({
      ok: false,
      reason: expect.stringMatching(`the anchor at seq ${head.seq} is signed with key ${oldKey.fingerprint}, but the key in force there is ${newKey.fingerprint} \\(recorded at seq ${newKeyAt}\\): a retired key signed records written after it was replaced`),
    });
    await expect(open(state, newKey, undefined)).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_CORRUPT", message: expect.stringMatching(`signed at seq ${head.seq} with retired key ${oldKey.fingerprint}, but the key in force there is ${newKey.fingerprint}`) });
  });

  it("the first start after a genuine rotation still opens: the anchor signed by the old key is before the new key's record", async () => {
    const oldKey = AnchorSigner.ephemeral();
    const newKey = AnchorSigner.ephemeral([oldKey]);
    const j1 = await open(state, oldKey);
    await j1.append({ type: "x" });
    await j1.close();
    const j2 = await open(state, newKey);
    await j2.close();
    expect(await verifyJournal(state, { pinned: [oldKey.fingerprint, newKey.fingerprint], checkpoints: await witnessCheckpoint() })).toMatchObject({ ok: true, signature: { key: newKey.fingerprint } });
  });
});

describe("symlinks in the state dir", () => {
  it("audit.anchor as a link to a file elsewhere: the daemon refuses to open it and writes nothing through it", async () => {
    await trail(1);
    const victim = path.join(root, "victim");
    await writeFile(victim, "");
    await unlink(path.join(state, ANCHOR_FILE));
    await symlink(victim, path.join(state, ANCHOR_FILE));
    await expect(open(state, signer, undefined)).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_FAILED", message: expect.stringMatching(/open failed with ELOOP/) });
    expect(await readFile(victim, "utf8")).toBe("");
  });

  it("audit.jsonl as a link: open refuses, verify names it", async () => {
    await trail(1);
    const elsewhere = path.join(root, "elsewhere.jsonl");
    await copyFile(path.join(state, JOURNAL_FILE), elsewhere);
    await unlink(path.join(state, JOURNAL_FILE));
    await symlink(elsewhere, path.join(state, JOURNAL_FILE));
    await expect(open()).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_FAILED", message: expect.stringMatching(/ELOOP/) });
    expect(await verifyJournal(state)).toMatchObject({ ok: false, badSeq: 1, reason: expect.stringMatching(/audit.jsonl is a symbolic link, not the journal/) });
  });
});

describe("canonical form: one record, one byte string", () => {
  // each edit keeps the parsed record — and so its hash — the same; only the canonical check can see it
  const edits: Array<[string, (line: string) => string]> = [
    ["a duplicate key (JSON.parse keeps the last)", (l) => l.replace('"type":"shell.exec"', '"type":"policy.deny","type":"shell.exec"')],
    ["a unicode escape for a plain letter", (l) => l.replace('"pytest"', '"\\u0070ytest"')],
    ["another number form", (l) => l.replace(/"seq":(\d+)/, '"seq":$1.0')],
    ["an exponent", (l) => l.replace(/"seq":(\d+)/, '"seq":$1e0')],
    ["whitespace between members", (l) => l.replace(",", ", ")],
    ["trailing whitespace", (l) => `${l} `],
    ["a CRLF line end", (l) => `${l}\r`],
    ["an escaped slash", (l) => l.replace("pytest", "py\\/test")],
  ];
  for (const [what, edit] of edits) {
    it(`${what}: refused, naming the line`, async () => {
      await trail(3);
      const ls = await lines();
      const edited = edit(ls[2]!);
      expect(edited).not.toBe(ls[2]);
      ls[2] = edited;
      await writeFile(path.join(state, JOURNAL_FILE), ls.join("\n") + "\n");
      expect(await verifyJournal(state)).toMatchObject({ ok: false, badSeq: 3, reason: expect.stringMatching(/^line 3: (not in canonical form|hash mismatch)/) });
    });
  }
});

describe("the unsigned tail (documented as undetectable)", () => {
  it("records after the last signature are named by verify; rewriting them after a crash is not detected", async () => {
    const slow = new AnchorSigner(generateKeyPairSync("ed25519").privateKey, "(slow)");
    const j = await AuditJournal.open(state, { clock, signer: slow, signIntervalMs: 60_000 });
    await j.append({ type: "a" });
    await j.append({ type: "b" }); // the first background signature is made now; the next not for a minute
    await new Promise((r) => setTimeout(r, 50));
    await j.append({ type: "c" });
    await j.append({ type: "d" });
    const signedAt = (await anchorOf()).signed!.seq;
    expect(signedAt).toBeLessThan(5);
    const v = await verifyJournal(state);
    expect(v).toMatchObject({ ok: true, lastSeq: 5, unsigned: { from: signedAt + 1, to: 5 } });
    if (v.ok) expect(v.unsigned).not.toBeNull();
    // the crash: the tail is rewritten before the restart — the chain alone cannot tell
    const recs = (await lines()).map((l) => JSON.parse(l) as Record<string, unknown>);
    recs[4] = { ...recs[4]!, type: "forged" };
    rechain(recs, 4);
    await writeFile(path.join(state, JOURNAL_FILE), recs.map((r) => canonicalJson(r as never)).join("\n") + "\n");
    const a = await anchorOf();
    await writeFile(path.join(state, ANCHOR_FILE), anchorBytes({ ...a, hash: recs[4]!.hash as string }));
    expect(await verifyJournal(state)).toMatchObject({ ok: true, unsigned: { from: signedAt + 1, to: 5 } });
    await j.close().catch(() => undefined);
  });
});

describe("bundles", () => {
  async function exportOf(dir: string, nonce?: string): Promise<Buffer> {
    const { prepareExport } = await import("../../src/audit/bundle.js");
    const j = await open(dir);
    await j.append({ type: "x" });
    const p = await prepareExport({ stateDir: dir, journal: j, signer, source: { test: 1 }, nonce });
    const parts: Buffer[] = [];
    for await (const b of p.body()) parts.push(b);
    await j.close();
    return Buffer.concat(parts);
  }
  async function* once(b: Buffer): AsyncGenerator<Buffer> {
    yield b;
  }

  it("made from the state dir's files, ending at an earlier signed head: refused, it does not end at an audit.export record", async () => {
    const real = await exportOf(state);
    const [header] = real.toString().split("\n");
    // the attacker's bundle: audit.jsonl up to the anchor's signed head, that signature, a header to match
    await trail(1);
    const a = await anchorOf();
    const recs = (await lines()).slice(0, a.signed!.seq);
    const h = JSON.parse(header!) as Record<string, unknown>;
    const last = JSON.parse(recs.at(-1)!) as AuditRecord;
    const forged = [canonicalJson({ ...h, records: last.seq, lastSeq: last.seq, lastHash: last.hash, createdAt: last.ts } as never), ...recs, canonicalJson({ anchor: a.signed } as never)].join("\n") + "\n";
    const r = await verifyBundle(once(Buffer.from(forged)), { pinned: [signer.fingerprint] });
    expect(r).toMatchObject({ ok: false, reason: expect.stringMatching(`the bundle's last record \\(seq ${last.seq}\\) is a ${last.type}, not the audit.export record every export ends with`) });
  });

  it("an older bundle replayed: accepted on its own, refused against the auditor's nonce", async () => {
    const old = await exportOf(state);
    const fresh = await exportOf(state, "audit-2026-12-05.7f3a");
    expect(await verifyBundle(once(fresh), { pinned: [signer.fingerprint], nonce: "audit-2026-12-05.7f3a" })).toMatchObject({ ok: true, nonce: "audit-2026-12-05.7f3a" });
    expect(await verifyBundle(once(old), { pinned: [signer.fingerprint] })).toMatchObject({ ok: true, nonce: null });
    expect(await verifyBundle(once(old), { pinned: [signer.fingerprint], nonce: "audit-2026-12-05.7f3a" })).toMatchObject({
      ok: false,
      reason: expect.stringMatching(/the bundle answers no nonce, not "audit-2026-12-05.7f3a" .*: it is an older export, or one made for another request/),
    });
  });

  it("the header's export time changed: refused, it is not the export record's", async () => {
    const b = (await exportOf(state)).toString().split("\n");
    const h = JSON.parse(b[0]!) as Record<string, unknown>;
    b[0] = canonicalJson({ ...h, createdAt: "2027-01-01T00:00:00.000Z" } as never);
    expect(await verifyBundle(once(Buffer.from(b.join("\n"))))).toMatchObject({ ok: false, reason: expect.stringMatching(/its createdAt 2027-01-01T00:00:00.000Z is not the time of the export's record/) });
  });
});

describe("the witness file", () => {
  it("lives beside the key, one per state dir, and moves only forward", async () => {
    await mkdir(path.dirname(keyFile), { recursive: true });
    await trail(2);
    const w1 = (await readWitness(wfile))!;
    expect(path.dirname(wfile)).toBe(`${keyFile}.heads`);
    expect(w1).toMatchObject({ seq: 3, key: signer.fingerprint, stateDir: state });
    expect(witnessFile(keyFile, path.join(root, "other"))).not.toBe(wfile);
    await trail(1);
    expect((await readWitness(wfile))!.seq).toBe(5);
  });

  it("settings: beside the key by default, in SANDBOXD_AUDIT_WITNESS_DIR when the key's folder is read-only, never inside the state dir", async () => {
    const { resolveSettings } = await import("../../src/config/settings.js");
    expect(resolveSettings({ stateDir: "/tmp/st" }, { SANDBOXD_AUDIT_KEY: "/tmp/k/a.key" }).auditWitness).toMatch(/^\/tmp\/k\/a\.key\.heads\/[0-9a-f]{16}$/);
    expect(resolveSettings({ stateDir: "/tmp/st" }, { SANDBOXD_AUDIT_KEY: "/tmp/k/a.key", SANDBOXD_AUDIT_WITNESS_DIR: "/var/lib/w" }).auditWitness).toBe(witnessFile("/tmp/k/a.key", "/tmp/st", "/var/lib/w"));
    expect(() => resolveSettings({ stateDir: "/tmp/st" }, { SANDBOXD_AUDIT_KEY: "/tmp/k/a.key", SANDBOXD_AUDIT_WITNESS_DIR: "/tmp/st/w" })).toThrow(/SANDBOXD_AUDIT_WITNESS_DIR must be outside the state dir/);
  });
});
