/**
 * Durability proven from outside (STYLE.md 9): a child process appends 10k
 * records with group commit and prints each acknowledged seq; we SIGKILL it
 * mid-burst, then check the chain verifies and holds every acknowledged
 * record. Three kills at different points on the same journal, so each run
 * also reopens a journal left by a killed writer (torn tail included).
 */
import { spawn } from "node:child_process";
import { createReadStream } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuditJournal, JOURNAL_FILE } from "../../src/audit/journal.js";
import { verifyJournal } from "../../src/audit/verify.js";
import { createSigningKey, readSigningKey } from "../../src/audit/signing.js";
import { systemClock } from "../../src/util/clock.js";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const CHILD = path.join(ROOT, "test", "helpers", "audit-writer-child.mjs");
const COUNT = 10_000;

let tmp: string;
let journalModule: string;

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), "sbx-audit-dur-"));
  // Compile the journal (and what it imports) to one ES module the child can load: no dist/ staleness.
  journalModule = path.join(tmp, "journal.mjs");
  await build({
    stdin: {
      contents: 'export * from "./journal.ts"; export { readSigningKey } from "./signing.ts";',
      resolveDir: path.join(ROOT, "src", "audit"),
      loader: "ts",
    },
    bundle: true,
    platform: "node",
    format: "esm",
    target: "node20",
    outfile: journalModule,
    logLevel: "silent",
  });
});

afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

interface RunResult {
  acked: number[];
  startSeq: number;
  done: boolean;
  signal: NodeJS.Signals | null;
}

/** Runs the writer, SIGKILLs it once it has acknowledged `killAfter` records. */
function runAndKill(dir: string, killAfter: number, keyFile?: string): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CHILD, journalModule, dir, String(COUNT), "64", ...(keyFile ? [keyFile] : [])], { stdio: ["ignore", "pipe", "pipe"] });
    const acked: number[] = [];
    let startSeq = -1;
    let done = false;
    let stderr = "";
    let killed = false;
    child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
    const rl = createInterface({ input: child.stdout });
    rl.on("line", (line) => {
      if (line.startsWith("ready ")) startSeq = Number(line.slice(6));
      else if (line === "done") done = true;
      else acked.push(Number(line));
      if (!killed && acked.length >= killAfter) {
        killed = true;
        child.kill("SIGKILL");
      }
      if (done && !killed) {
        killed = true;
        child.kill("SIGKILL");
      }
    });
    const watchdog = setTimeout(() => child.kill("SIGKILL"), 60_000);
    child.on("error", reject);
    // "close" fires after stdout is drained: every ack the child wrote before dying has been read.
    child.on("close", (code, signal) => {
      clearTimeout(watchdog);
      if (startSeq < 0) reject(new Error(`writer never became ready (exit ${code}): ${stderr}`));
      else resolve({ acked, startSeq, done, signal });
    });
  });
}

async function seqsOnDisk(dir: string): Promise<Set<number>> {
  const seqs = new Set<number>();
  const rl = createInterface({ input: createReadStream(path.join(dir, JOURNAL_FILE)) });
  for await (const line of rl) {
    try {
      seqs.add((JSON.parse(line) as { seq: number }).seq);
    } catch {
      // a torn final line: checked by verifyJournal, not here
    }
  }
  return seqs;
}

describe("audit journal under SIGKILL", () => {
  it("keeps every acknowledged record in a chain that verifies, across three kills mid-burst", async () => {
    await killThreeTimes(path.join(tmp, "state"));
  });

  it("signing its anchors: the same, and each crash leaves an anchor whose signature verifies with the daemon's key pinned", async () => {
    const keyFile = path.join(tmp, "audit-signing.key");
    const signer = await createSigningKey(keyFile);
    await killThreeTimes(path.join(tmp, "signed-state"), { keyFile, fingerprint: signer.fingerprint });
  });
});

async function killThreeTimes(dir: string, signing?: { keyFile: string; fingerprint: string }): Promise<void> {
  {
    const allAcked: number[] = [];
    const killPoints = [2000 + Math.floor(Math.random() * 1000), 4000 + Math.floor(Math.random() * 2000), 6500 + Math.floor(Math.random() * 2000)];
    let tornSeen = 0;
    for (const killAfter of killPoints) {
      const run = await runAndKill(dir, killAfter, signing?.keyFile);
      expect(run.signal).toBe("SIGKILL");
      expect(run.done, `the writer finished all ${COUNT} before the kill at ${killAfter}`).toBe(false);
      expect(run.acked.length).toBeGreaterThanOrEqual(killAfter);
      allAcked.push(...run.acked);

      const result = await verifyJournal(dir, signing ? { pinned: [signing.fingerprint] } : {});
      expect(result, JSON.stringify(result)).toMatchObject({ ok: true });
      // signed: the crash left a signature (it may trail the anchor's head by up to signIntervalMs of records)
      if (signing && result.ok) expect(result.signature).toMatchObject({ key: signing.fingerprint });
      if (!result.ok) return;
      if (result.tornTailBytes > 0) tornSeen++;
      const maxAcked = Math.max(...run.acked);
      expect(result.lastSeq).toBeGreaterThanOrEqual(maxAcked);
      // the anchor never runs ahead of the file, and (SIGKILL, not power loss) is not behind any ack
      expect(result.anchor!.seq).toBeGreaterThanOrEqual(maxAcked);
      expect(result.anchor!.seq).toBeLessThanOrEqual(result.lastSeq);
      const onDisk = await seqsOnDisk(dir);
      const missing = allAcked.filter((s) => !onDisk.has(s));
      expect(missing).toEqual([]);
      console.log(
        `kill after ${killAfter} acks: ${run.acked.length} acknowledged (seq ${run.startSeq + 1}..${maxAcked}), ` +
          `${result.lastSeq} records on disk, anchor ${result.anchor!.seq}, torn tail ${result.tornTailBytes} bytes`,
      );
    }
    // the writer's journal is reopened cleanly after the last kill too
    const j = await AuditJournal.open(dir, { clock: systemClock, ...(signing ? { signer: await readSigningKey(signing.keyFile) } : {}) });
    const rec = await j.append({ type: "after.crash" });
    await j.close();
    const final = await verifyJournal(dir, signing ? { pinned: [signing.fingerprint] } : {});
    expect(final).toMatchObject({ ok: true, lastSeq: rec.seq, tornTailBytes: 0 });
    if (signing) expect(final).toMatchObject({ signature: { key: signing.fingerprint, seq: rec.seq }, pinned: true });
    console.log(`torn tails seen after a kill: ${tornSeen} of ${killPoints.length}`);
  }
}
