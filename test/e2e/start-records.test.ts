/**
 * Every phase that ever existed has its start and its end on record, however
 * its start was cut short (issue 13): the real daemon, SIGKILLed at each
 * point of a phase start (its record made, its start recorded, its
 * container made, its start answered), restarted each time; and a stop that
 * arrives while the phase starts. The trail is read from audit.jsonl and
 * checked with `sandboxd audit verify`.
 */
import type { ChildProcess } from "node:child_process";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ApiClient } from "../../src/cli/client.js";
import { SandboxdError } from "../../src/errors.js";
import type { PhaseView } from "../../src/phases/types.js";
import { cli, containersOf, docker, makeProject, removeDir, requireEngineAndImage, spawnDaemon, tempDir, waitExit } from "../helpers/sandbox.js";

type Rec = Record<string, unknown> & { seq: number; type: string; phase?: string };

const projects: string[] = [];
const dirs: string[] = [];

function records(dir: string): Rec[] {
  const file = path.join(dir, "audit.jsonl");
  if (!existsSync(file)) return [];
  return readFileSync(file, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Rec);
}

/** Polls `f` every millisecond (a start is a few hundred ms; its first steps a few ms each). */
async function soon(what: string, f: () => boolean | Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await f())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** The phase.* records of each phase, in order. */
function phaseTrail(dir: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const r of records(dir)) {
    if (!r.phase || !r.type.startsWith("phase.")) continue;
    out.set(r.phase, [...(out.get(r.phase) ?? []), r.type]);
  }
  return out;
}

const ENDS = new Set(["phase.complete", "phase.failed"]);

beforeAll(async () => {
  await requireEngineAndImage();
}, 120_000);

afterAll(async () => {
  for (const d of dirs) {
    for (const c of await containersOf(d).catch(() => [])) await docker.getContainer(c.Id).remove({ force: true }).catch(() => undefined);
    await removeDir(d);
  }
  for (const p of projects) await removeDir(p);
});

describe("start records across kill -9 at any point of a phase start", () => {
  it("each phase has one phase.start first and one end last (or is re-adopted); audit verify passes", async () => {
    const dir = await tempDir("startrec");
    dirs.push(dir);
    const sock = path.join(dir, "s.sock");
    const project = await makeProject();
    projects.push(project);
    const phasesDir = path.join(dir, "phases");
    const knownIds = () => (existsSync(phasesDir) ? readdirSync(phasesDir) : []);

    // Each kill point: what must have happened before the daemon is killed, given the new phase's id.
    const points: Array<{ name: string; reached: (id: string) => boolean | Promise<boolean> }> = [
      { name: "phase record made", reached: (id) => existsSync(path.join(phasesDir, id, "phase.json")) },
      { name: "start recorded", reached: (id) => records(dir).some((r) => r.phase === id && r.type === "phase.start") },
      { name: "container made", reached: async (id) => (await containersOf(dir)).some((c) => c.Labels["sandboxd.phase"] === id) },
    ];
    let daemon: { child: ChildProcess } = await spawnDaemon(dir, sock);
    const killed: Array<{ point: string; id: string }> = [];
    try {
      for (const point of points) {
        const before = new Set(knownIds());
        const starting = new ApiClient(sock).request("POST", "/v1/phases", { project, phase: point.name, mode: "backtest" }).then(
          () => null,
          (e: unknown) => e,
        );
        let id = "";
        await soon("the phase's state dir", () => {
          id = knownIds().find((x) => !before.has(x)) ?? "";
          return id !== "";
        });
        await soon(point.name, () => point.reached(id));
        daemon.child.kill("SIGKILL");
        await waitExit(daemon.child);
        // the start call died with the daemon: the client never learned the phase started
        expect(await starting).toBeInstanceOf(Error);
        killed.push({ point: point.name, id });
        daemon = await spawnDaemon(dir, sock);
      }
      // and once after the start was answered: the phase is re-adopted
      const { phase: done } = await new ApiClient(sock).request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "answered", mode: "backtest" });
      daemon.child.kill("SIGKILL");
      await waitExit(daemon.child);
      daemon = await spawnDaemon(dir, sock);

      const api = new ApiClient(sock);
      const { phases } = await api.request<{ phases: PhaseView[] }>("GET", "/v1/phases");
      const byId = new Map(phases.map((p) => [p.id, p]));
      const trail = phaseTrail(dir);
      for (const k of killed) {
        const t = trail.get(k.id) ?? [];
        expect({ point: k.point, state: byId.get(k.id)?.state }).toEqual({ point: k.point, state: "failed" });
        expect(t[0], `${k.point}: ${t.join(", ")}`).toBe("phase.start");
        expect(t.filter((x) => x === "phase.start"), k.point).toHaveLength(1);
        expect(t.filter((x) => ENDS.has(x)), k.point).toEqual(["phase.failed"]);
        expect(t.at(-1), k.point).toBe("phase.failed");
      }
      expect(byId.get(done.id)?.state).toBe("running");
      expect(trail.get(done.id)).toEqual(["phase.start", "phase.ready", "phase.readopt"]);
      await api.request("DELETE", `/v1/phases/${done.id}`);
      expect(phaseTrail(dir).get(done.id)).toEqual(["phase.start", "phase.ready", "phase.readopt", "phase.complete"]);
      // nothing of the killed starts is left running
      expect(await containersOf(dir)).toHaveLength(0);
      // the chain is intact across every kill (each restart took the dead daemon's lock)
      const v = await cli(["audit", "verify", "--state-dir", dir, "--json"], { socket: sock });
      expect(JSON.parse(v.stdout)).toMatchObject({ ok: true });
    } finally {
      daemon.child.kill("SIGTERM");
      await waitExit(daemon.child).catch(() => undefined);
    }
  }, 400_000);
});

describe("a stop while the phase starts", () => {
  it("the start is refused, the container made meanwhile is removed, and the trail has phase.start then phase.complete", async () => {
    const dir = await tempDir("stopstart");
    dirs.push(dir);
    const sock = path.join(dir, "s.sock");
    const daemon = await spawnDaemon(dir, sock);
    try {
      const project = await makeProject();
      projects.push(project);
      const api = new ApiClient(sock);
      const starting = api.request("POST", "/v1/phases", { project, phase: "stopped-early", mode: "backtest" }).then(
        () => null,
        (e: unknown) => e,
      );
      let id = "";
      await soon("the phase to be listed as starting", async () => {
        const { phases } = await api.request<{ phases: PhaseView[] }>("GET", "/v1/phases");
        id = phases.find((p) => p.state === "starting")?.id ?? "";
        return id !== "";
      });
      const stopped = await api.request<{ phase: PhaseView }>("DELETE", `/v1/phases/${id}`);
      expect(stopped.phase.state).toBe("stopped");
      const err = (await starting) as SandboxdError;
      expect(err).toBeInstanceOf(SandboxdError);
      expect(err.code).toBe("SBX_ERR_PHASE_NOT_RUNNING");
      expect(phaseTrail(dir).get(id)).toEqual(["phase.start", "phase.complete"]);
      await soon("the container made meanwhile to go", async () => (await containersOf(dir)).length === 0, 30_000);
      const v = await cli(["audit", "verify", "--state-dir", dir, "--json"], { socket: sock });
      expect(JSON.parse(v.stdout)).toMatchObject({ ok: true });
    } finally {
      daemon.child.kill("SIGTERM");
      await waitExit(daemon.child).catch(() => undefined);
    }
  }, 180_000);
});
