/**
 * Offline anchoring end to end: a real daemon process (its signing key made
 * on first start, outside the state dir), a real phase and command, a policy
 * reload, then `sandboxd audit export`; the bundle is copied elsewhere and
 * checked by `sandboxd audit verify --bundle` with the daemon stopped and its
 * state dir and key gone. Then the attacks on the copy: a record changed, a
 * record removed (inside, at the end), the anchor re-signed with another key,
 * the chain rewritten consistently without the key, and rewritten with a key
 * of the attacker's own — each refused, the message naming what failed.
 */
import type { ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFile, readFile, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { canonicalJson } from "../../src/audit/canonical.js";
import { DEFAULT_POLICY_FILE } from "../../src/config/settings.js";
import { recordHash } from "../../src/audit/journal.js";
import { AnchorSigner } from "../../src/audit/signing.js";
import type { PhaseView } from "../../src/phases/types.js";
import {
  cli,
  containersOf,
  docker,
  makeProject,
  removeDir,
  requireEngineAndImage,
  spawnDaemon,
  tempDir,
  testAuditKey,
  waitExit,
  writeScript,
} from "../helpers/sandbox.js";

let stateDir: string;
let socket: string;
let daemon: { child: ChildProcess; output: () => string };
let project: string;
let elsewhere: string;
let bundle: string;
let pubKey: string;
let fingerprint: string;

type Rec = Record<string, unknown> & { seq: number; hash: string; prev: string; type: string };

async function bundleParts(file = bundle): Promise<{ header: Record<string, unknown>; records: Rec[]; anchor: { seq: number; hash: string; key: string; sig: string } }> {
  const lines = (await readFile(file, "utf8")).trimEnd().split("\n");
  return {
    header: JSON.parse(lines[0]!) as Record<string, unknown>,
    records: lines.slice(1, -1).map((l) => JSON.parse(l) as Rec),
    anchor: (JSON.parse(lines.at(-1)!) as { anchor: { seq: number; hash: string; key: string; sig: string } }).anchor,
  };
}

async function writeBundle(name: string, header: unknown, lines: string[], anchor: unknown): Promise<string> {
  const file = path.join(elsewhere, name);
  await writeFile(file, [canonicalJson(header as never), ...lines, canonicalJson({ anchor } as never)].join("\n") + "\n");
  return file;
}

/** Re-chains records from index `from` on (prev and hash recomputed): what a writer of the files can do without the key. */
function rechain(records: Rec[], from: number): Rec[] {
  const out = records.map((r) => ({ ...r }));
  for (let i = from; i < out.length; i++) {
    const { hash: _h, ...rest } = out[i]!;
    rest.prev = i === 0 ? "0".repeat(64) : out[i - 1]!.hash;
    out[i] = { ...rest, hash: recordHash(rest as Rec) } as Rec;
  }
  return out;
}

/** `sandboxd audit verify --bundle` with no daemon to talk to. */
function verify(file: string, ...extra: string[]) {
  return cli(["audit", "verify", "--bundle", file, ...extra], { socket: path.join(elsewhere, "no-daemon.sock") });
}

beforeAll(async () => {
  await requireEngineAndImage();
  stateDir = await tempDir("bundle");
  socket = path.join(stateDir, "sandboxd.sock");
  elsewhere = await tempDir("auditor");
  // the default policy file itself: its path and SHA-256 are checked in the bundle's header
  daemon = await spawnDaemon(stateDir, socket, { policy: DEFAULT_POLICY_FILE });
  project = await makeProject();
}, 120_000);

afterAll(async () => {
  if (daemon?.child.exitCode === null) {
    daemon.child.kill("SIGTERM");
    await waitExit(daemon.child).catch(() => undefined);
  }
  for (const c of stateDir ? await containersOf(stateDir).catch(() => []) : []) {
    await docker.getContainer(c.Id).remove({ force: true }).catch(() => undefined);
  }
  if (project) await removeDir(project);
  if (stateDir) await removeDir(stateDir);
  if (elsewhere) await removeDir(elsewhere);
});

describe("sandboxd audit export / verify --bundle", () => {
  it("the key is made 0600 outside the state dir on first start, recorded in the trail and printed by `audit key`", async () => {
    const keyFile = testAuditKey(stateDir);
    expect((await stat(keyFile)).mode & 0o777).toBe(0o600);
    expect(daemon.output()).toMatch(/created the audit signing key/);
    const r = await cli(["audit", "key", "--json"], { socket });
    expect(r.code).toBe(0);
    const key = JSON.parse(r.stdout) as { fingerprint: string; publicKey: string; keyFile: string };
    expect(key.keyFile).toBe(keyFile);
    fingerprint = key.fingerprint;
    pubKey = path.join(elsewhere, "daemon.pub");
    await writeFile(pubKey, key.publicKey);
    const trail = (await readFile(path.join(stateDir, "audit.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l) as Rec);
    expect(trail.find((x) => x.type === "audit.signing_key")).toMatchObject({ fingerprint, publicKey: key.publicKey, created: true });
    const anchor = JSON.parse(await readFile(path.join(stateDir, "audit.anchor"), "utf8")) as { signed: { key: string } };
    expect(anchor.signed.key).toBe(fingerprint);
    expect((await cli(["audit", "verify"], { socket })).stdout).toMatch(new RegExp(`intact up to \\d+ .*signed up to \\d+ with key ${fingerprint}`));
  });

  it("a bundle exported, copied to another place, verifies there with no daemon and no state dir", async () => {
    const start = await cli(["phase", "start", project, "--phase", "7.1", "--mode", "test", "--json"], { socket });
    expect(start.code).toBe(0);
    const phase = JSON.parse(start.stdout) as PhaseView;
    const script = await writeScript(project, "print('bundle me')");
    expect((await cli(["exec", phase.id, "--", "python3", script], { socket })).stdout).toBe("bundle me\n");
    expect((await cli(["phase", "stop", phase.id], { socket })).code).toBe(0);
    daemon.child.kill("SIGHUP");
    for (let i = 0; i < 100 && !(await readFile(path.join(stateDir, "audit.jsonl"), "utf8")).includes('"type":"policy.reload"'); i++) {
      await new Promise((r) => setTimeout(r, 100));
    }

    const exported = path.join(stateDir, "..", `${path.basename(stateDir)}-export.jsonl`);
    const ex = await cli(["audit", "export", "-o", exported], { socket });
    expect(ex.stderr).toMatch(new RegExp(`wrote .* (\\d+) records, anchor signed with key ${fingerprint}`));
    expect(ex.code).toBe(0);
    bundle = path.join(elsewhere, "trail.bundle.jsonl");
    await copyFile(exported, bundle);
    await removeDir(exported);

    // the daemon's machine goes away: no daemon, no state dir, no key
    daemon.child.kill("SIGTERM");
    expect(await waitExit(daemon.child)).toBe(0);
    await removeDir(stateDir);

    const { header, records, anchor } = await bundleParts();
    expect(records.length).toBe(header.records);
    expect(anchor).toMatchObject({ seq: records.at(-1)!.seq, hash: records.at(-1)!.hash, key: fingerprint });
    expect(records.at(-1)!.type).toBe("audit.export");
    expect(records.map((r) => r.type)).toEqual(expect.arrayContaining(["audit.signing_key", "policy.load", "phase.start", "exec.verdict", "exec.result", "policy.reload"]));
    const policySha = createHash("sha256").update(await readFile(DEFAULT_POLICY_FILE)).digest("hex");
    expect(header.policies).toEqual([
      expect.objectContaining({ type: "policy.load", file: DEFAULT_POLICY_FILE, sha256: policySha }),
      expect.objectContaining({ type: "policy.reload", file: DEFAULT_POLICY_FILE, sha256: policySha }),
    ]);

    const ok = await verify(bundle);
    expect(ok.stderr).toBe("");
    expect(ok.code).toBe(0);
    expect(ok.stdout).toMatch(new RegExp(`verifies: ${records.length} records, chain intact, anchor at seq ${anchor.seq} signed with key ${fingerprint}\\n`));
    expect(ok.stdout).toMatch(/not pinned/);
    expect(ok.stdout).toMatch(new RegExp(`policy.load seq \\d+: .*default.yaml sha256 ${policySha}`));
    const pinned = await verify(bundle, "--key", pubKey);
    expect(pinned.code).toBe(0);
    expect(pinned.stdout).toMatch(new RegExp(`signed with key ${fingerprint} \\(pinned\\)`));
    expect((await verify(bundle, "--key", fingerprint)).code).toBe(0);
  }, 180_000);

  it("a record changed: refused, naming the record", async () => {
    const { header, records, anchor } = await bundleParts();
    const i = records.findIndex((r) => r.type === "exec.result");
    const lines = records.map((r) => canonicalJson(r as never));
    lines[i] = lines[i]!.replace("bundle me", "bundle ME");
    const r = await verify(await writeBundle("changed.jsonl", header, lines, anchor), "--key", pubKey);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`REFUSED: bundle line ${i + 2} \\(record\\): hash mismatch: the record's content was changed after it was written`));
  });

  it("a record removed, inside or at the end: refused, naming which", async () => {
    const { header, records, anchor } = await bundleParts();
    const lines = records.map((r) => canonicalJson(r as never));
    const k = 5;
    const inside = await verify(await writeBundle("removed.jsonl", header, lines.filter((_, i) => i !== k - 1), anchor));
    expect(inside.code).toBe(1);
    expect(inside.stdout).toMatch(new RegExp(`REFUSED: .*expected seq ${k}, found seq ${k + 1}: record ${k} was deleted`));
    const atEnd = await verify(await writeBundle("cut.jsonl", { ...header, records: records.length - 1, lastSeq: records.length - 1 }, lines.slice(0, -1), anchor));
    expect(atEnd.code).toBe(1);
    expect(atEnd.stdout).toMatch(new RegExp(`REFUSED: the signed anchor names seq ${anchor.seq}, but the bundle's records end at seq ${anchor.seq - 1}: records were removed from the end`));
  });

  it("the anchor re-signed with another key: refused, that key is not the trail's", async () => {
    const { header, records, anchor } = await bundleParts();
    const other = AnchorSigner.ephemeral();
    const forged = { ...anchor, key: other.fingerprint, sig: other.signSync(anchor) };
    const r = await verify(await writeBundle("resigned.jsonl", header, records.map((x) => canonicalJson(x as never)), forged));
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`REFUSED: the anchor at seq ${anchor.seq} is signed with key ${other.fingerprint}, which the trail does not record \\(recorded: ${fingerprint}\\)`));
  });

  it("the chain rewritten consistently without the key (every later hash and the anchor's): refused, the signature does not verify", async () => {
    const { header, records, anchor } = await bundleParts();
    const i = records.findIndex((r) => r.type === "exec.verdict");
    const edited = records.map((r) => ({ ...r }));
    edited[i] = { ...edited[i]!, argv: ["python3", "innocent.py"] };
    const chain = rechain(edited, i);
    const head = chain.at(-1)!;
    const r = await verify(
      await writeBundle("rewritten.jsonl", { ...header, lastHash: head.hash }, chain.map((x) => canonicalJson(x as never)), { ...anchor, hash: head.hash }),
    );
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`REFUSED: the anchor's signature over seq ${anchor.seq} does not verify with key ${fingerprint}: the records up to seq ${anchor.seq} \\(or the anchor\\) were changed after it was signed`));
  });

  it("the chain rewritten with the attacker's own key recorded in it: consistent, but refused once the daemon's key is pinned", async () => {
    const { header, records } = await bundleParts();
    const theirs = AnchorSigner.ephemeral();
    const k = records.findIndex((r) => r.type === "audit.signing_key");
    const edited = records.map((r) => ({ ...r }));
    edited[k] = { ...edited[k]!, fingerprint: theirs.fingerprint, publicKey: theirs.publicKeyPem };
    const chain = rechain(edited, k);
    const head = chain.at(-1)!;
    const forgedHeader = {
      ...header,
      lastHash: head.hash,
      signingKeys: [{ fingerprint: theirs.fingerprint, publicKey: theirs.publicKeyPem, seq: chain[k]!.seq, previousKey: null, stateDir: chain[k]!.stateDir }],
    };
    const file = await writeBundle("theirs.jsonl", forgedHeader, chain.map((x) => canonicalJson(x as never)), {
      seq: head.seq,
      hash: head.hash,
      key: theirs.fingerprint,
      sig: theirs.signSync(head),
    });
    const unpinned = await verify(file);
    expect(unpinned.code).toBe(0);
    expect(unpinned.stdout).toMatch(/not pinned/);
    const r = await verify(file, "--key", pubKey);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`REFUSED: signing key ${theirs.fingerprint} \\(recorded at seq ${chain[k]!.seq}\\) is not among the pinned keys \\(${fingerprint}\\)`));
  });

  it("the daemon does not start with its key missing under a signed trail, or open to others: a coded error, never an unsigned anchor", async () => {
    const dir = await tempDir("keyless");
    const sock = path.join(dir, "s.sock");
    const keyFile = testAuditKey(dir);
    try {
      const d = await spawnDaemon(dir, sock);
      d.child.kill("SIGTERM");
      expect(await waitExit(d.child)).toBe(0);
      const anchorBefore = await readFile(path.join(dir, "audit.anchor"), "utf8");
      await rm(keyFile);
      await expect(spawnDaemon(dir, sock)).rejects.toThrow(/the audit signing key .* is missing, but the trail's anchor is signed with key [0-9a-f]{64}.*\[SBX_ERR_AUDIT_KEY\]/s);
      await expect(stat(keyFile)).rejects.toMatchObject({ code: "ENOENT" });
      await writeFile(keyFile, "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIP7e6q3ZQ4c0p1n0m3o4Vq3w1E6x9k2cQe1N0bV8yRr0\n-----END PRIVATE KEY-----\n", { mode: 0o644 });
      await expect(spawnDaemon(dir, sock)).rejects.toThrow(/is open to group or others \(mode 0644\).*\[SBX_ERR_AUDIT_KEY\]/s);
      // nothing was written meanwhile: the anchor is the one the last daemon signed
      expect(await readFile(path.join(dir, "audit.anchor"), "utf8")).toBe(anchorBefore);
    } finally {
      await removeDir(dir);
    }
  }, 120_000);
});
