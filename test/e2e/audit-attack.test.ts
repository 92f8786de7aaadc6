/**
 * The signed trail attacked end to end: a real daemon process (its own key
 * beside its state dir, never /etc/sandboxd), a real sandbox, the real CLI.
 *
 * - from inside the sandbox, nothing of the state dir's trail, the key or the
 *   witness beside it can be reached;
 * - an auditor's nonce makes an older bundle useless;
 * - the trail extended with a key of the attacker's own while the daemon
 *   runs: `sandboxd audit verify` (through the daemon) refuses it;
 * - the state dir rolled back to an older copy while the daemon is stopped:
 *   the daemon does not start on it, and `audit verify --state-dir` names
 *   the witnessed seq the trail no longer reaches.
 */
import type { ChildProcess } from "node:child_process";
import { cp, readFile, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { canonicalJson } from "../../src/audit/canonical.js";
import { anchorBytes, recordHash } from "../../src/audit/journal.js";
import { AnchorSigner } from "../../src/audit/signing.js";
import { witnessFile } from "../../src/audit/witness.js";
import type { PhaseView } from "../../src/phases/types.js";
import { cli, containersOf, docker, makeProject, removeDir, requireEngineAndImage, spawnDaemon, tempDir, testAuditKey, waitExit, writeScript } from "../helpers/sandbox.js";

let stateDir: string;
let socket: string;
let daemon: { child: ChildProcess; output: () => string };
let project: string;
let elsewhere: string;

type Rec = Record<string, unknown> & { seq: number; hash: string; prev: string; type: string };

const journalOf = () => path.join(stateDir, "audit.jsonl");
const anchorOf = () => path.join(stateDir, "audit.anchor");
async function trail(): Promise<Rec[]> {
  return (await readFile(journalOf(), "utf8")).trimEnd().split("\n").map((l) => JSON.parse(l) as Rec);
}
/** Waits until the anchor's signed head is the journal's last record (the background signature landed). */
async function settled(): Promise<void> {
  for (let i = 0; i < 50; i++) {
    const a = JSON.parse(await readFile(anchorOf(), "utf8")) as { seq: number; signed?: { seq: number } };
    if (a.signed?.seq === a.seq && (await trail()).length === a.seq) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error("the anchor's signature did not catch up");
}

beforeAll(async () => {
  await requireEngineAndImage();
  stateDir = await tempDir("attack");
  socket = path.join(stateDir, "sandboxd.sock");
  elsewhere = await tempDir("attack-auditor");
  daemon = await spawnDaemon(stateDir, socket);
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
  if (stateDir) {
    await removeDir(stateDir);
    await rm(testAuditKey(stateDir), { force: true });
    await rm(`${testAuditKey(stateDir)}.heads`, { recursive: true, force: true });
  }
  if (elsewhere) await removeDir(elsewhere);
});

describe("attacks on the signed audit trail", () => {
  it("from inside a sandbox, the state dir's trail, the signing key and its witness are out of reach; the probe itself is on record", async () => {
    const start = await cli(["phase", "start", project, "--phase", "11.1", "--mode", "test", "--json"], { socket });
    expect(start.code).toBe(0);
    const phase = JSON.parse(start.stdout) as PhaseView;
    const key = testAuditKey(stateDir);
    const targets = [stateDir, journalOf(), anchorOf(), key, `${key}.heads`, witnessFile(key, stateDir), path.dirname(key)];
    const script = await writeScript(
      project,
      `import json, os
targets = ${JSON.stringify(targets)}
seen = {t: os.path.exists(t) for t in targets if t != "/tmp"}
found = []
for root, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev")]
    for f in files + dirs:
        if f in ("audit.jsonl", "audit.anchor", "audit.lock") or f.startswith("audit-signing.key") or f.endswith(".heads"):
            found.append(os.path.join(root, f))
roots = [l.split()[3] for l in open("/proc/self/mountinfo")]
# a control: the probe does see what is mounted for it
control = os.path.exists("/workspace/conftest.py") and any(f.endswith("conftest.py") for _, _, fs in os.walk("/workspace") for f in fs)
print(json.dumps({"seen": seen, "found": found, "roots": roots, "control": control}))`,
    );
    const r = await cli(["exec", phase.id, "--json", "--", "python3", script], { socket });
    expect(r.code).toBe(0);
    const out = JSON.parse((JSON.parse(r.stdout) as { stdout: string }).stdout) as { seen: Record<string, boolean>; found: string[]; roots: string[]; control: boolean };
    expect(out.control).toBe(true);
    expect(out.roots).toContain(path.join(project, "build_audit.log")); // the mount table is read right: the project's log is there, read-only
    // /tmp is the sandbox's own tmpfs: the host paths under it do not exist there
    for (const t of Object.keys(out.seen)) expect([t, out.seen[t]]).toEqual([t, false]);
    expect(out.found).toEqual([]);
    // the mounts from inside the state dir are the phase's own folders (its workspace view, its run dir with the control socket): never the dir itself or above
    const fromState = out.roots.filter((root) => root === stateDir || stateDir.startsWith(`${root}/`) || root.startsWith(`${stateDir}/`));
    expect(fromState.every((root) => root.startsWith(path.join(stateDir, "phases", phase.id)))).toBe(true);
    // and the probe is on the trail, verdict and result
    const recs = (await trail()).filter((x) => x.phase === phase.id);
    expect(recs.some((x) => x.type === "exec.verdict" && JSON.stringify(x.argv).includes(script))).toBe(true);
    expect(recs.some((x) => x.type === "exec.result")).toBe(true);
    expect((await cli(["phase", "stop", phase.id], { socket })).code).toBe(0);
  }, 180_000);

  it("an auditor's nonce: the fresh bundle answers it, an older bundle is refused", async () => {
    const old = path.join(elsewhere, "old.bundle");
    expect((await cli(["audit", "export", "-o", old], { socket })).code).toBe(0);
    const fresh = path.join(elsewhere, "fresh.bundle");
    const ex = await cli(["audit", "export", "-o", fresh, "--nonce", "q4-review.91c2"], { socket });
    expect(ex.code).toBe(0);
    const none = path.join(elsewhere, "no-daemon.sock");
    const ok = await cli(["audit", "verify", "--bundle", fresh, "--nonce", "q4-review.91c2"], { socket: none });
    expect(ok.code).toBe(0);
    expect(ok.stdout).toMatch(/exported at \S+ for nonce "q4-review.91c2"/);
    const replayed = await cli(["audit", "verify", "--bundle", old, "--nonce", "q4-review.91c2"], { socket: none });
    expect(replayed.code).toBe(1);
    expect(replayed.stdout).toMatch(/REFUSED: the bundle answers no nonce, not "q4-review.91c2" \(its audit.export record, seq \d+, at \S+\): it is an older export/);
    // a nonce outside its alphabet is refused at the door
    const bad = await cli(["audit", "export", "--nonce", "a b"], { socket });
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/SBX_ERR_VALIDATION/);
  }, 60_000);

  it("while the daemon runs, the trail extended with a key of the attacker's own: `audit verify` through the daemon refuses it", async () => {
    await settled();
    const journalBefore = await readFile(journalOf());
    const anchorBefore = await readFile(anchorOf());
    const recs = await trail();
    const last = recs.at(-1)!;
    const theirs = AnchorSigner.ephemeral();
    // a consistent extension: their key recorded after the daemon's, naming it as the key before; forged records; their signature
    const added: Rec[] = [];
    let prev = last.hash;
    for (const [i, ev] of [
      { type: "audit.signing_key", fingerprint: theirs.fingerprint, publicKey: theirs.publicKeyPem, keyFile: "/etc/sandboxd/audit-signing.key", created: false, previousKey: recs.filter((x) => x.type === "audit.signing_key").at(-1)!.fingerprint, anchoredSeq: last.seq },
      { type: "policy.reload", file: "/etc/sandboxd/lenient.yaml", sha256: "0".repeat(64), bytes: 1, rules: 0 },
    ].entries()) {
      const body = { ...ev, seq: last.seq + 1 + i, ts: new Date().toISOString(), prev } as Record<string, unknown> & { prev: string };
      const rec = { ...body, hash: recordHash(body) } as Rec;
      added.push(rec);
      prev = rec.hash;
    }
    const head = { seq: added.at(-1)!.seq, hash: prev };
    await writeFile(journalOf(), Buffer.concat([journalBefore, Buffer.from(added.map((x) => canonicalJson(x as never)).join("\n") + "\n")]));
    await writeFile(anchorOf(), anchorBytes({ ...head, signed: { ...head, key: theirs.fingerprint, sig: theirs.signSync(head) } }));
    try {
      // consistent on its own terms: an unpinned check of the files passes (what the daemon's verify did before)
      const files = await cli(["audit", "verify", "--state-dir", stateDir, "--key-file", path.join(elsewhere, "no.key")], { socket: path.join(elsewhere, "none.sock") });
      expect(files.code).toBe(0);
      expect(files.stdout).toMatch(`signed up to ${head.seq} with key ${theirs.fingerprint}, key not pinned`);
      expect(files.stderr).toMatch(/note: no witness of this state dir was read .*a rollback to an older copy of the trail would not be noticed/);
      const r = await cli(["audit", "verify"], { socket });
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(new RegExp(`audit chain broken at seq ${head.seq - 1}: signing key ${theirs.fingerprint} \\(recorded at seq ${head.seq - 1}\\) is not among the pinned keys`));
    } finally {
      await writeFile(journalOf(), journalBefore);
      await writeFile(anchorOf(), anchorBefore);
    }
    expect((await cli(["audit", "verify"], { socket })).code).toBe(0);
  }, 60_000);

  it("the state dir rolled back to an older copy while the daemon is stopped: it does not start on it, and verify names what is missing", async () => {
    await settled();
    const old = path.join(elsewhere, "old-state");
    await cp(journalOf(), path.join(old, "audit.jsonl"));
    await cp(anchorOf(), path.join(old, "audit.anchor"));
    const oldLast = (await trail()).length;
    const phase = JSON.parse((await cli(["phase", "start", project, "--phase", "11.2", "--mode", "test", "--json"], { socket })).stdout) as PhaseView;
    expect((await cli(["exec", phase.id, "--", "rm", "-rf", "/workspace/tests"], { socket })).code).not.toBe(0);
    expect((await cli(["phase", "stop", phase.id], { socket })).code).toBe(0);
    daemon.child.kill("SIGTERM");
    expect(await waitExit(daemon.child)).toBe(0);
    const realJournal = await readFile(journalOf());
    const realAnchor = await readFile(anchorOf());
    const realLast = (await trail()).length;
    expect(realLast).toBeGreaterThan(oldLast);

    // the refused command, the phase: gone, and the older trail still carries a valid signature
    await cp(path.join(old, "audit.jsonl"), journalOf());
    await cp(path.join(old, "audit.anchor"), anchorOf());
    const files = await cli(["audit", "verify", "--state-dir", stateDir, "--key-file", testAuditKey(stateDir)], { socket: path.join(elsewhere, "none.sock") });
    expect(files.code).toBe(1);
    expect(files.stdout).toMatch(new RegExp(`audit chain broken at seq ${oldLast + 1}: the trail ends at seq ${oldLast}, but the witness .*\\.heads/[0-9a-f]{16} names seq ${realLast}: records ${oldLast + 1}-${realLast} were removed`));
    await expect(spawnDaemon(stateDir, socket)).rejects.toThrow(new RegExp(`ends at seq ${oldLast}, but the daemon signed seq ${realLast} of this trail \\(witness .*\\): the trail was rolled back.*SBX_ERR_AUDIT_CORRUPT`, "s"));

    // the real trail put back: the daemon starts, and its verify reaches the witness
    await writeFile(journalOf(), realJournal);
    await writeFile(anchorOf(), realAnchor);
    daemon = await spawnDaemon(stateDir, socket);
    const v = await cli(["audit", "verify"], { socket });
    expect(v.code).toBe(0);
    expect(v.stdout).toMatch(/intact up to \d+ .*\(pinned\).*reaches seq \d+ of the running daemon's last written record/);
  }, 180_000);
});
