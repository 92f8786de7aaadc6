/**
 * A planned restart (`stop --keep-phases`) while a phase start is in its
 * first steps: past the gate that refuses new work, but not yet listed as a
 * phase, so the restart's check of what it keeps cannot see it. The start
 * is held there for real — its policy file is a FIFO, whose read waits for a
 * writer — and released after the stop began. The stop must wait for it:
 * the start ends (refused, SBX_ERR_SHUTTING_DOWN) and cleans up after itself
 * while the daemon still serves, and nothing of it is left running.
 */
import { execFile } from "node:child_process";
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import { DEFAULT_POLICY, auditEvents, containersOf, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, type TestDaemon } from "../helpers/sandbox.js";

let d: TestDaemon | undefined;
const dirs: string[] = [];

afterAll(async () => {
  await d?.close();
  for (const dir of dirs) await removeDir(dir);
});

describe("stop --keep-phases with a start in flight", () => {
  it("waits for the start, which is refused and leaves nothing behind", async () => {
    await requireEngineAndImage();
    d = await startTestDaemon();
    const project = await makeProject();
    const fifoDir = await tempDir("fifo");
    dirs.push(project, fifoDir);
    const fifo = path.join(fifoDir, "phase-policy.yaml");
    await promisify(execFile)("mkfifo", [fifo]);

    const order: string[] = [];
    const started = d.api.request("POST", "/v1/phases", { project, phase: "14.3", mode: "test", policy: fifo }).then(
      () => {
        order.push("start answered: started");
        return null;
      },
      (err: unknown) => {
        order.push(`start answered: ${err instanceof SandboxdError ? err.code : String(err)}`);
        return err;
      },
    );
    // the start is now waiting in its policy file's read
    await new Promise((r) => setTimeout(r, 300));
    expect(order).toEqual([]);
    const stopped = d.daemon.close({ keepPhases: true }).then(() => order.push("stopped"));
    await new Promise((r) => setTimeout(r, 300));
    // released: the start goes on, and must meet the shutdown
    await writeFile(fifo, await readFile(DEFAULT_POLICY, "utf8"));
    await stopped;
    await started;

    expect(order).toEqual(["start answered: SBX_ERR_SHUTTING_DOWN", "stopped"]);
    // nothing of it runs: no container of this daemon, and its trail says how it ended
    expect(await containersOf(d.stateDir)).toEqual([]);
    const events = await auditEvents<{ type: string; phase?: string }>(d.stateDir);
    const starts = events.filter((e) => e.type === "phase.start");
    for (const s of starts) expect(events.some((e) => e.phase === s.phase && (e.type === "phase.end" || e.type === "phase.failed"))).toBe(true);
  }, 120_000);
});
