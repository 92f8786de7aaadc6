/**
 * The audit journal's one-writer lock (issue 13 item 7): a lock is held only
 * by a live process of this boot that started when the writer did. A lock
 * left by a kill -9'd daemon not yet reaped (a zombie), by a previous boot,
 * or naming a pid now used by another process does not block a start; a
 * live writer does.
 */
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { AuditJournal, LOCK_FILE } from "../../src/audit/journal.js";
import { systemClock } from "../../src/util/clock.js";

const dirs: string[] = [];
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

async function dirWithLock(content: string): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-lock-"));
  dirs.push(dir);
  await writeFile(path.join(dir, LOCK_FILE), content);
  return dir;
}

const boot = async () => (await readFile("/proc/sys/kernel/random/boot_id", "utf8")).trim();
const startTime = async (pid: number) => {
  const t = await readFile(`/proc/${pid}/stat`, "utf8");
  return t.slice(t.lastIndexOf(")") + 2).split(" ")[19]!;
};

async function opens(dir: string): Promise<boolean> {
  try {
    const j = await AuditJournal.open(dir, { clock: systemClock });
    await j.close();
    return true;
  } catch (e) {
    expect((e as { code?: string }).code).toBe("SBX_ERR_AUDIT_FAILED");
    return false;
  }
}

describe("audit.lock", () => {
  it("a lock from another boot does not block (a stale lock after a reboot)", async () => {
    expect(await opens(await dirWithLock(`${process.pid} 00000000-0000-0000-0000-000000000000 1\n`))).toBe(true);
  });

  it("a lock whose pid now belongs to another process (another start time) does not block", async () => {
    expect(await opens(await dirWithLock(`${process.pid} ${await boot()} 1\n`))).toBe(true);
  });

  it("a lock of a killed writer its parent has not reaped yet (a zombie) does not block", async () => {
    // sh starts a short child, then becomes a sleep that never waits for it
    const sh = spawn("sh", ["-c", "sleep 0.05 & echo $!; exec sleep 10"], { stdio: ["ignore", "pipe", "ignore"] });
    try {
      const pid = Number((await new Promise<Buffer>((r) => sh.stdout.once("data", r))).toString().trim());
      const start = await startTime(pid);
      await new Promise((r) => setTimeout(r, 300));
      expect((await readFile(`/proc/${pid}/stat`, "utf8")).split(") ")[1]![0]).toBe("Z");
      expect(await opens(await dirWithLock(`${pid} ${await boot()} ${start}\n`))).toBe(true);
    } finally {
      sh.kill("SIGKILL");
    }
  });

  it("a live writer blocks, in the new format and the old (bare pid)", async () => {
    expect(await opens(await dirWithLock(`${process.pid} ${await boot()} ${await startTime(process.pid)}\n`))).toBe(false);
    expect(await opens(await dirWithLock(`${process.pid}\n`))).toBe(false);
  });

  it("the journal writes its identity into the lock and removes it on close", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-lock-"));
    dirs.push(dir);
    const j = await AuditJournal.open(dir, { clock: systemClock });
    expect((await readFile(path.join(dir, LOCK_FILE), "utf8")).trim()).toBe(`${process.pid} ${await boot()} ${await startTime(process.pid)}`);
    expect(await opens(dir)).toBe(false);
    await j.close();
    expect(await opens(dir)).toBe(true);
  });
});
