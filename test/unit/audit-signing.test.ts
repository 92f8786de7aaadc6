/**
 * Signed anchors (src/audit/signing.ts, journal.ts, verify.ts): the key file's
 * life (made 0600, never overwritten, refused when open to others, unreadable
 * or of another kind, and not made anew under a signed trail), the journal
 * signing every anchor and recording its key, and verify refusing what a
 * writer of the state dir without the key can do.
 */
import { execFileSync } from "node:child_process";
import { createHash, generateKeyPairSync } from "node:crypto";
import { chmod, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { canonicalJson } from "../../src/audit/canonical.js";
import { ANCHOR_BYTES, ANCHOR_FILE, AuditJournal, JOURNAL_FILE, anchorBytes, recordHash, type Anchor, type AuditRecord } from "../../src/audit/journal.js";
import { AnchorSigner, anchorMessage, createSigningKey, loadOrCreateSigningKey, readSigningKey, rotateSigningKey } from "../../src/audit/signing.js";
import { verifyJournal } from "../../src/audit/verify.js";
import { resolveSettings } from "../../src/config/settings.js";
import type { Clock } from "../../src/util/clock.js";

const clock: Clock = { now: () => new Date("2026-12-04T12:00:00.000Z"), monotonicMs: () => performance.now() };

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), "sbx-sign-"));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function records(state: string): Promise<AuditRecord[]> {
  return (await readFile(path.join(state, JOURNAL_FILE), "utf8"))
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as AuditRecord);
}

async function anchorOf(state: string): Promise<Anchor> {
  return JSON.parse(await readFile(path.join(state, ANCHOR_FILE), "utf8")) as Anchor;
}

/** A trail of n events written by a journal signing with `signer`. */
async function signedTrail(state: string, signer: AnchorSigner, n = 6): Promise<void> {
  const j = await AuditJournal.open(state, { clock, signer });
  for (let i = 0; i < n; i++) await j.append({ type: "shell.exec", argv: ["pytest", `t${i}`] });
  await j.close();
}

/** What someone who can write the state dir but has no key can do: change a record and re-chain everything after it. */
async function rewriteFrom(state: string, seq: number, change: (r: Record<string, unknown>) => void): Promise<string> {
  const recs = (await records(state)) as Array<Record<string, unknown>>;
  let prev = recs[seq - 2]?.hash as string | undefined;
  const out: string[] = [];
  for (const r of recs) {
    if ((r.seq as number) >= seq) {
      if (r.seq === seq) change(r);
      const { hash: _h, ...rest } = r;
      rest.prev = prev ?? "0".repeat(64);
      r.prev = rest.prev;
      r.hash = recordHash(rest as Record<string, unknown> & { prev: string });
    }
    prev = r.hash as string;
    out.push(canonicalJson(r as never));
  }
  await writeFile(path.join(state, JOURNAL_FILE), out.join("\n") + "\n");
  return prev!;
}

describe("the signing key file", () => {
  it("is made 0600 in a 0700 folder on first start, and read back as the same key", async () => {
    const file = path.join(dir, "etc", "sandboxd", "audit-signing.key");
    const made = await loadOrCreateSigningKey(file, null);
    expect(made.created).toBe(true);
    expect((await stat(file)).mode & 0o777).toBe(0o600);
    expect((await stat(path.dirname(file))).mode & 0o777).toBe(0o700);
    const again = await loadOrCreateSigningKey(file, made.fingerprint);
    expect(again.created).toBe(false);
    expect(again.fingerprint).toBe(made.fingerprint);
    // the fingerprint is what openssl computes from the public key: SHA-256 of the DER SubjectPublicKeyInfo
    const der = execFileSync("openssl", ["pkey", "-in", file, "-pubout", "-outform", "DER"]);
    expect(made.fingerprint).toBe(createHash("sha256").update(der).digest("hex"));
  });

  it("is never overwritten", async () => {
    const file = path.join(dir, "k.key");
    const first = await createSigningKey(file);
    await expect(createSigningKey(file)).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_KEY", message: expect.stringMatching(/already exists/) });
    expect((await readSigningKey(file)).fingerprint).toBe(first.fingerprint);
  });

  it("missing under a trail already signed: a coded error, not a new key", async () => {
    const file = path.join(dir, "gone.key");
    await expect(loadOrCreateSigningKey(file, "ab".repeat(32))).rejects.toMatchObject({
      code: "SBX_ERR_AUDIT_KEY",
      message: expect.stringMatching(/is missing, but the trail's anchor is signed with key abab/),
      hint: expect.stringMatching(/restore .*gone\.key.*audit key --new/),
    });
    await expect(stat(file)).rejects.toMatchObject({ code: "ENOENT" });
  });

  it("open to group or others, unreadable, not PEM, or not ed25519: each refused with SBX_ERR_AUDIT_KEY naming why", async () => {
    const file = path.join(dir, "k.key");
    await createSigningKey(file);
    await chmod(file, 0o644);
    await expect(readSigningKey(file)).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_KEY", message: expect.stringMatching(/open to group or others \(mode 0644\)/) });
    await expect(readSigningKey(dir)).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_KEY", message: expect.stringMatching(/cannot read .*EISDIR|open to group/) });
    const junk = path.join(dir, "junk.key");
    await writeFile(junk, "not a key\n", { mode: 0o600 });
    await expect(readSigningKey(junk)).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_KEY", message: expect.stringMatching(/not a private key in PEM/) });
    const rsa = path.join(dir, "rsa.key");
    await writeFile(rsa, generateKeyPairSync("rsa", { modulusLength: 1024 }).privateKey.export({ type: "pkcs8", format: "pem" }), { mode: 0o600 });
    await expect(readSigningKey(rsa)).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_KEY", message: expect.stringMatching(/holds a rsa key/) });
  });

  it("settings refuse a key inside the state dir and default outside it", () => {
    expect(() => resolveSettings({ stateDir: "/tmp/st", auditKey: "/tmp/st/keys/a.key" }, {})).toThrow(/outside the state dir/);
    expect(resolveSettings({ stateDir: "/tmp/st" }, { SANDBOXD_AUDIT_KEY: "/tmp/k/a.key" }).auditKey).toBe("/tmp/k/a.key");
    expect(resolveSettings({ stateDir: "/tmp/st" }, {}).auditKey).toBe(process.getuid?.() === 0 ? "/etc/sandboxd/audit-signing.key" : expect.stringMatching(/sandboxd\/audit-signing\.key$/));
  });
});

describe("signed anchors", () => {
  it("every anchor is signed and the key is recorded in the trail; verify checks the signature", async () => {
    const signer = AnchorSigner.ephemeral();
    await signedTrail(dir, signer);
    const recs = await records(dir);
    expect(recs[0]).toMatchObject({ type: "audit.signing_key", fingerprint: signer.fingerprint, publicKey: signer.publicKeyPem, previousKey: null });
    const raw = await readFile(path.join(dir, ANCHOR_FILE));
    expect(raw.length).toBe(ANCHOR_BYTES);
    const a = await anchorOf(dir);
    // closed: the signature covers the last record
    expect(a).toMatchObject({ seq: 7, hash: recs.at(-1)!.hash, signed: { seq: 7, hash: recs.at(-1)!.hash, key: signer.fingerprint } });
    // the signed bytes are documented: openssl checks the signature without sandboxd
    const msgFile = path.join(dir, "msg");
    const sigFile = path.join(dir, "sig");
    const pubFile = path.join(dir, "pub.pem");
    await writeFile(msgFile, `{"ctx":"sandboxd.audit.anchor.v1","hash":"${a.hash}","seq":${a.seq}}`);
    expect(anchorMessage(a).toString()).toBe(await readFile(msgFile, "utf8"));
    await writeFile(sigFile, Buffer.from(a.signed!.sig, "base64"));
    await writeFile(pubFile, signer.publicKeyPem);
    expect(execFileSync("openssl", ["pkeyutl", "-verify", "-pubin", "-inkey", pubFile, "-rawin", "-in", msgFile, "-sigfile", sigFile]).toString()).toMatch(/Signature Verified Successfully/);

    const v = await verifyJournal(dir, { pinned: [signer.fingerprint] });
    expect(v).toMatchObject({ ok: true, lastSeq: 7, signature: { key: signer.fingerprint, seq: 7 }, pinned: true });
  });

  it("appends do not wait for signatures; the signature follows, also on a quiet journal, and a crash leaves a signed anchor", async () => {
    class SlowSigner extends AnchorSigner {
      override sign(head: { seq: number; hash: string }): Promise<string> {
        return new Promise((r) => setTimeout(() => r(this.signSync(head)), 300));
      }
    }
    const signer = new SlowSigner(generateKeyPairSync("ed25519").privateKey, "(slow)");
    const j = await AuditJournal.open(dir, { clock, signer });
    // the journal's first anchor is signed before open returns (the key record is under it)
    expect((await anchorOf(dir)).signed).toMatchObject({ seq: 1 });
    const t0 = performance.now();
    await j.append({ type: "a" });
    await j.append({ type: "b" });
    expect(performance.now() - t0).toBeLessThan(250);
    const lagging = await anchorOf(dir);
    expect(lagging).toMatchObject({ seq: 3, signed: { seq: 1 } });
    // a crash now: what is on disk verifies, signed up to 1
    expect(await verifyJournal(dir)).toMatchObject({ ok: true, lastSeq: 3, signature: { seq: 1 } });
    await new Promise((r) => setTimeout(r, 800));
    // quiet journal: the latest head got its signature without another append
    expect((await anchorOf(dir)).signed).toMatchObject({ seq: 3, key: signer.fingerprint });
    expect(await verifyJournal(dir)).toMatchObject({ ok: true, lastSeq: 3, signature: { seq: 3 } });
    await j.close();
  });

  it("a key rotation is on record: the new key names the one before it", async () => {
    const a = AnchorSigner.ephemeral();
    const b = AnchorSigner.ephemeral([a]);
    await signedTrail(dir, a, 2);
    await signedTrail(dir, b, 2);
    const keys = (await records(dir)).filter((r) => r.type === "audit.signing_key");
    expect(keys.map((k) => [k.fingerprint, k.previousKey])).toEqual([
      [a.fingerprint, null],
      [b.fingerprint, a.fingerprint],
    ]);
    expect(await verifyJournal(dir, { pinned: [a.fingerprint, b.fingerprint] })).toMatchObject({ ok: true, signature: { key: b.fingerprint } });
    expect(await verifyJournal(dir, { pinned: [b.fingerprint] })).toMatchObject({ ok: false, reason: expect.stringMatching(`signing key ${a.fingerprint} \\(recorded at seq 1\\) is not among the pinned keys`) });
  });

  it("rotation on disk: the new key replaces the old, whose public key goes to <key>.previous", async () => {
    const file = path.join(dir, "k.key");
    const old = await createSigningKey(file);
    const { signer, replaced } = await rotateSigningKey(file);
    expect(replaced).toBe(old.fingerprint);
    expect(signer.fingerprint).not.toBe(old.fingerprint);
    expect([...signer.previous.keys()]).toEqual([old.fingerprint]);
    expect(await readFile(`${file}.previous`, "utf8")).toBe(old.publicKeyPem);
    expect((await stat(file)).mode & 0o777).toBe(0o600);
  });

  it("a trail re-signed by a stranger's key (recorded in the rewritten trail): the daemon's next open refuses to sign over it; a pinned verify refuses it", async () => {
    const mine = AnchorSigner.ephemeral();
    await signedTrail(dir, mine);
    const theirs = AnchorSigner.ephemeral();
    const head = await rewriteFrom(dir, 1, (r) => {
      r.fingerprint = theirs.fingerprint;
      r.publicKey = theirs.publicKeyPem;
    });
    await writeFile(path.join(dir, ANCHOR_FILE), anchorBytes({ seq: 7, hash: head, signed: { seq: 7, hash: head, key: theirs.fingerprint, sig: theirs.signSync({ seq: 7, hash: head }) } }));
    // consistent on its own terms…
    expect(await verifyJournal(dir)).toMatchObject({ ok: true, signature: { key: theirs.fingerprint } });
    // …but not the daemon's key
    expect(await verifyJournal(dir, { pinned: [mine.fingerprint] })).toMatchObject({ ok: false, reason: expect.stringMatching(`signing key ${theirs.fingerprint} \\(recorded at seq 1\\) is not among the pinned keys`) });
    await expect(AuditJournal.open(dir, { clock, signer: mine })).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_KEY", message: expect.stringMatching(/neither this daemon's key .* nor one it was rotated from/) });
  });

  it("the chain rewritten consistently, anchor hash and all, without the key: verify and the next open refuse it", async () => {
    const signer = AnchorSigner.ephemeral();
    await signedTrail(dir, signer);
    const a = await anchorOf(dir);
    const head = await rewriteFrom(dir, 3, (r) => ((r.argv as string[])[1] = "rewritten"));
    await writeFile(path.join(dir, ANCHOR_FILE), anchorBytes({ seq: 7, hash: head, signed: { ...a.signed!, hash: head } }));
    expect(await verifyJournal(dir)).toMatchObject({ ok: false, reason: expect.stringMatching(/signature over seq 7 does not verify with key .*changed after it was signed/) });
    await expect(AuditJournal.open(dir, { clock, signer })).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_CORRUPT", message: expect.stringMatching(/signature does not verify/) });
  });

  it("the anchor re-signed with another key: refused, the trail does not record that key", async () => {
    const signer = AnchorSigner.ephemeral();
    await signedTrail(dir, signer);
    const other = AnchorSigner.ephemeral();
    const head = await rewriteFrom(dir, 3, (r) => ((r.argv as string[])[1] = "rewritten"));
    await writeFile(path.join(dir, ANCHOR_FILE), anchorBytes({ seq: 7, hash: head, signed: { seq: 7, hash: head, key: other.fingerprint, sig: other.signSync({ seq: 7, hash: head }) } }));
    expect(await verifyJournal(dir)).toMatchObject({ ok: false, reason: expect.stringMatching(`signed with key ${other.fingerprint}, which the trail does not record`) });
  });

  it("the signature stripped from the anchor: verify refuses, and so does the next open", async () => {
    const signer = AnchorSigner.ephemeral();
    await signedTrail(dir, signer);
    const a = await anchorOf(dir);
    await writeFile(path.join(dir, ANCHOR_FILE), anchorBytes({ seq: a.seq, hash: a.hash }));
    expect(await verifyJournal(dir)).toMatchObject({ ok: false, reason: expect.stringMatching(/carries no signature, but the trail records signing key/) });
    await expect(AuditJournal.open(dir, { clock, signer })).rejects.toMatchObject({ code: "SBX_ERR_AUDIT_CORRUPT", message: expect.stringMatching(/carries no signature.*records a signing key at seq 1/) });
  });

  it("a trail from before anchors were signed is taken over: its next records are signed", async () => {
    const j = await AuditJournal.open(dir, { clock });
    await j.append({ type: "old" });
    await j.close();
    expect((await anchorOf(dir)).signed).toBeUndefined();
    const signer = AnchorSigner.ephemeral();
    await signedTrail(dir, signer, 1);
    expect(await verifyJournal(dir)).toMatchObject({ ok: true, lastSeq: 3, signature: { key: signer.fingerprint, seq: 3 } });
  });
});
