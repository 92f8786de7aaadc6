/**
 * A warm pool slot that waited SANDBOXD_POOL_MAX_AGE seconds for a claim is
 * replaced (src/phases/pool.ts): its container goes, the discard is on
 * record with how long it waited, a new slot is made, and a phase started
 * after that is served by the new one. Real engine, real image.
 */
import { readFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readRecords } from "../../src/audit/read.js";
import type { PoolStatus } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { docker, makeProject, removeDir, requireEngineAndImage, startTestDaemon, type TestDaemon } from "../helpers/sandbox.js";

const MAX_AGE_S = 3;

async function poolOf(t: TestDaemon): Promise<PoolStatus> {
  return (await t.api.request<{ pool: PoolStatus }>("GET", "/v1/phases")).pool;
}

/** This daemon's unclaimed and claimed pool containers. */
async function poolContainers(instance: string): Promise<string[]> {
  const found = await docker.listContainers({ all: true, filters: { label: [`sandboxd.instance=${instance}`, "sandboxd.pool=1"] } });
  return found.map((c) => c.Id);
}

async function until<T>(what: string, probe: () => Promise<T | null | undefined | false>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe("warm pool slot age", () => {
  let t: TestDaemon;
  let instance: string;
  let project: string;

  beforeAll(async () => {
    await requireEngineAndImage();
    t = await startTestDaemon({ env: { SANDBOXD_POOL_SIZE: "1", SANDBOXD_POOL_MAX_AGE: String(MAX_AGE_S) } });
    instance = (await readFile(path.join(t.stateDir, "instance"), "utf8")).trim();
    project = await makeProject();
  }, 120_000);

  afterAll(async () => {
    await t?.close();
    if (project) await removeDir(project);
  });

  it("a slot that waited longer than SANDBOXD_POOL_MAX_AGE is replaced, on record; the next phase gets the new one", async () => {
    await until("a ready slot", async () => (await poolOf(t)).ready >= 1);
    const [first] = await poolContainers(instance);
    expect(first).toBeTruthy();
    // its discard, recorded with how long it waited, and a new slot ready in its place
    const discard = await until("the first slot's discard", async () =>
      (await readRecords(t.stateDir, {})).find((r) => r.type === "pool.discard" && r.container === first),
    );
    expect(discard.reason).toMatch(new RegExp(`waited \\d+ s for a claim, the pool's limit is ${MAX_AGE_S} s \\(SANDBOXD_POOL_MAX_AGE\\)`));
    const fill = (await readRecords(t.stateDir, {})).find((r) => r.type === "pool.fill" && r.container === first)!;
    expect(Date.parse(discard.ts) - Date.parse(fill.ts)).toBeGreaterThanOrEqual(MAX_AGE_S * 1000 - 50);
    await until("the first slot's container gone", async () => !(await poolContainers(instance)).includes(first!));
    await until("a new ready slot", async () => (await poolOf(t)).ready >= 1);
    // claimed before its own limit: a pooled phase in a container that is not the first
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "aged", mode: "backtest" });
    expect(phase.pooled?.filledAt).toBeTruthy();
    expect(phase.containerId).not.toBe(first);
    const fills = (await readRecords(t.stateDir, {})).filter((r) => r.type === "pool.fill").map((r) => r.container);
    expect(fills).toContain(phase.containerId);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  }, 120_000);
});
