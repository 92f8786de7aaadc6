/**
 * `sandboxd stop --keep-phases`: a planned restart. The daemon (its own
 * process, started by the real CLI) drains its commands, cancels what is
 * left (recorded, answered to its client), leaves its phases running and
 * exits; the next daemon re-adopts them; commands run again; the audit
 * chain verifies. A phase that cannot be kept (paused) makes the request
 * refused, changing nothing.
 */
import { spawn } from "node:child_process";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { PhaseView } from "../../src/phases/types.js";
import { CLI, cli, docker, makeProject, removeDir, requireEngineAndImage, spawnDaemon, tempDir, waitExit, writeScript } from "../helpers/sandbox.js";

let stateDir: string;
let socket: string;
let daemon: Awaited<ReturnType<typeof spawnDaemon>>;
const projects: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
  stateDir = await tempDir("keep");
  socket = path.join(stateDir, "sandboxd.sock");
  daemon = await spawnDaemon(stateDir, socket);
}, 90_000);

afterAll(async () => {
  if (daemon?.child.exitCode === null) {
    daemon.child.kill("SIGTERM");
    await waitExit(daemon.child);
  }
  for (const p of projects) await removeDir(p);
  await removeDir(stateDir);
});

async function startPhase(name: string): Promise<PhaseView & { project: string }> {
  const p = await makeProject();
  projects.push(p);
  const r = await cli(["phase", "start", p, "--phase", name, "--mode", "test", "--json"], { socket });
  expect(r.code, r.stderr).toBe(0);
  return { ...(JSON.parse(r.stdout) as PhaseView), project: p };
}

async function trail(): Promise<Array<Record<string, any>>> {
  return (await readFile(path.join(stateDir, "audit.jsonl"), "utf8"))
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as Record<string, any>);
}

describe("sandboxd stop --keep-phases", () => {
  it("leaves running phases for the next daemon: in-flight commands drain or are cancelled and answered, the phase is re-adopted, exec works, the chain verifies", async () => {
    const keep = await startPhase("keep");
    const paused = await startPhase("paused");

    // a paused phase cannot be carried over: refused, nothing changes
    expect((await cli(["phase", "pause", paused.id], { socket })).code).toBe(0);
    const refused = await cli(["stop", "--keep-phases"], { socket });
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toContain("SBX_ERR_SHUTDOWN_REFUSED");
    expect(refused.stderr).toContain(paused.id);
    expect((await cli(["phase", "resume", paused.id], { socket })).code).toBe(0);
    // a quick command still works: the refusal changed nothing
    const quick = await writeScript(keep.project, "print('before')");
    expect((await cli(["exec", keep.id, "--", "python3", quick], { socket })).stdout).toBe("before\n");

    // in flight at the stop: a streamed command that outlasts the drain, and a background job
    const slow = await writeScript(keep.project, "import time\nprint('started', flush=True)\ntime.sleep(60)\nprint('not reached')");
    const streamed = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, [CLI, "--socket", socket, "exec", keep.id, "--", "python3", slow], { stdio: ["ignore", "pipe", "pipe"] });
      let stdout = "";
      let stderr = "";
      child.stdout.on("data", (c: Buffer) => (stdout += c.toString()));
      child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
      child.on("close", (code) => resolve({ code, stdout, stderr }));
    });
    const job = await cli(["exec", keep.id, "--background", "--", "python3", slow], { socket });
    expect(job.code).toBe(0);
    for (let i = 0; i < 100; i++) {
      const ex = JSON.parse((await cli(["execs", keep.id, "--json"], { socket })).stdout) as Array<{ pid: number | null }>;
      if (ex.length === 2 && ex.every((e) => e.pid !== null)) break;
      await new Promise((r) => setTimeout(r, 100));
    }

    const stop = await cli(["stop", "--keep-phases", "--drain", "1"], { socket });
    expect(stop.code, stop.stderr).toBe(0);
    expect(stop.stdout).toContain(keep.id);
    expect(stop.stdout).toContain(paused.id);
    const exited = await waitExit(daemon.child, 30_000).catch((e: Error) => {
      throw new Error(`${e.message}; daemon output:\n${daemon.output().split("\n").slice(-15).join("\n")}`);
    });
    expect(exited).toBe(0);
    // the streamed client was answered: the command was cancelled (SIGTERM: 143), not cut off
    const s = await streamed;
    expect(s.stdout).toBe("started\n");
    expect(s.code).toBe(143);

    // the containers run on without a daemon
    for (const p of [keep, paused]) expect((await docker.getContainer(p.containerName).inspect()).State.Running).toBe(true);

    daemon = await spawnDaemon(stateDir, socket);
    expect(daemon.output()).toMatch(new RegExp(`re-adopted running phase.*${keep.id}|${keep.id}.*re-adopted running phase`));
    const shown = JSON.parse((await cli(["phase", "show", keep.id, "--json"], { socket })).stdout) as PhaseView;
    expect(shown.state).toBe("running");
    const after = await writeScript(keep.project, "print('after restart')");
    const r = await cli(["exec", keep.id, "--", "python3", after], { socket });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe("after restart\n");

    const recs = (await trail()).filter((x) => x.phase === keep.id);
    const types = recs.map((x) => x.type);
    const detach = types.indexOf("phase.detach");
    const readopt = types.indexOf("phase.readopt");
    expect(detach).toBeGreaterThan(0);
    expect(readopt).toBeGreaterThan(detach);
    // both in-flight commands: cancelled by the daemon, with their results, before the detach; none lost
    const cancels = recs.filter((x) => x.type === "exec.cancel");
    expect(cancels).toHaveLength(2);
    expect(cancels.every((c) => /planned daemon restart/.test(c.note))).toBe(true);
    for (const c of cancels) {
      const res = recs.find((x) => x.type === "exec.result" && x.id === c.id);
      expect(res).toBeDefined();
      expect(recs.indexOf(res!)).toBeLessThan(detach);
    }
    expect(types).not.toContain("exec.lost");
    expect(types).not.toContain("phase.complete");

    const verify = await cli(["audit", "verify"], { socket });
    expect(verify.code, verify.stdout + verify.stderr).toBe(0);
    expect(verify.stdout).toMatch(/intact/);

    // a plain stop still stops every phase
    const plain = await cli(["stop"], { socket });
    expect(plain.code).toBe(0);
    expect(await waitExit(daemon.child, 60_000)).toBe(0);
    for (const p of [keep, paused]) await expect(docker.getContainer(p.containerName).inspect()).rejects.toMatchObject({ statusCode: 404 });
  }, 240_000);
});
