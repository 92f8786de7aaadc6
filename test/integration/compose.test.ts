/**
 * docker-compose, mediated (SKILLS.md §2 Infrastructure Management): asked of
 * a real phase, judged by the policy and the daemon's grammar, run on the
 * host against the project's own compose file, output returned and every
 * call audited; no Docker socket in the sandbox. The service is built from
 * the local base image (no registry answers here).
 */
import { execFile } from "node:child_process";
import { chown, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/exec.js";
import type { PhaseView } from "../../src/phases/types.js";
import { OWNER, cli, docker, makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";

const run = promisify(execFile);
let t: TestDaemon;
let project: string;
let phase: PhaseView;
let base: string;

type Rec = Record<string, unknown> & { type: string };

async function exec(argv: string[]): Promise<ExecResult> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv })).result;
}

async function refusal(argv: string[] | { command: string }): Promise<SandboxdError> {
  const body = Array.isArray(argv) ? { argv } : argv;
  const e = await t.api.request("POST", `/v1/phases/${phase.id}/exec`, body).then(
    () => null,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(SandboxdError);
  return e as SandboxdError;
}

async function records(): Promise<Rec[]> {
  return (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8"))
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Rec)
    .filter((r) => r.phase === phase.id);
}

/** containers compose made for the project (by its label), running or not */
async function serviceContainers(): Promise<Array<{ name: string; state: string }>> {
  const list = await docker.listContainers({ all: true, filters: { label: [`com.docker.compose.project.working_dir=${project}`] } });
  return list.map((c) => ({ name: c.Names[0]!.replace(/^\//, ""), state: c.State }));
}

beforeAll(async () => {
  await requireEngineAndImage();
  await run("docker-compose", ["version"]).catch(() => {
    throw new Error("docker-compose is not installed (Debian: apt-get install docker-compose; scripts/ensure-docker.sh does it)");
  });
  // the sandbox image's base: local, no pull
  base = process.env.SANDBOXD_BASE_IMAGE ?? "sandboxd-base:bookworm";
  await docker.getImage(base).inspect();
  t = await startTestDaemon();
  project = await makeProject();
  const file = path.join(project, "docker-compose.yml");
  await writeFile(file, `version: "3.8"\nservices:\n  idle:\n    image: ${base}\n    command: ["sh", "-c", "echo idle-started; exec sleep 3600"]\n    network_mode: none\n`);
  await chown(file, OWNER.uid, OWNER.gid);
  ({ phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "5.1", mode: "test" }));
}, 120_000);

afterAll(async () => {
  await t?.close();
  if (project) {
    await run("docker-compose", ["--project-directory", project, "-f", path.join(project, "docker-compose.yml"), "down"], { cwd: project }).catch(() => undefined);
    await removeDir(project);
  }
}, 60_000);

describe("docker-compose from a phase", () => {
  it("up -d, ps, logs, restart and down run on the host against the project's compose file; output returned; each call audited", async () => {
    const up = await exec(["docker-compose", "up", "-d"]);
    expect(up.exitCode, up.stderr).toBe(0);
    expect((await serviceContainers()).map((c) => c.state)).toEqual(["running"]);

    const ps = await exec(["docker-compose", "ps"]);
    expect(ps.exitCode, ps.stderr).toBe(0);
    expect(ps.stdout).toMatch(/idle_1\s.*Up/);
    expect(ps.rule.id).toBe("shell.compose-allowed");

    const logs = await exec(["docker-compose", "logs", "--tail", "5", "idle"]);
    expect(logs.stdout).toContain("idle-started");
    expect((await exec(["docker-compose", "restart", "idle"])).exitCode).toBe(0);

    const recs = await records();
    const psVerdict = recs.find((r) => r.type === "exec.verdict" && JSON.stringify(r.argv) === '["docker-compose","ps"]');
    expect(psVerdict).toMatchObject({ decision: "allow", rule: "shell.compose-allowed" });
    const runs = recs.filter((r) => r.type === "compose.run");
    expect(runs.map((r) => (r.argv as string[]).slice(9).join(" "))).toEqual(["up -d --no-build", "ps", "logs --tail 5 idle", "restart idle"]);
    // the configuration compose resolved and the daemon checked (./compose-attack.test.ts), under the directory's project name
    const name = path.basename(project).toLowerCase().replace(/[^-_a-z0-9]/g, "");
    expect(runs[0]!.argv).toEqual(["docker-compose", "--project-directory", project, "-p", name, "-f", path.join(t.stateDir, "phases", phase.id, "compose.resolved.yml"), "--ansi", "never", "up", "-d", "--no-build"]);
    const psResult = recs.find((r) => r.type === "exec.result" && JSON.stringify(r.argv) === '["docker-compose","ps"]');
    expect(psResult).toMatchObject({ exitCode: 0 });
    expect(String(psResult!.stdout)).toMatch(/idle_1/);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/SHELL_EXEC: docker-compose ps/);
    expect(log).toMatch(/ALLOW shell.compose-allowed/);

    // the CLI, as a harness runs it
    const viaCli = await cli(["exec", phase.id, "--", "docker-compose", "ps"], { socket: t.socket });
    expect(viaCli.code, viaCli.stderr).toBe(0);
    expect(viaCli.stdout).toMatch(/idle_1/);
  }, 180_000);

  it("down -v, rm, other subcommands, global options, compose inside a shell: refused before anything runs, each refusal audited", async () => {
    const before = await serviceContainers();
    expect(before.map((c) => c.state)).toEqual(["running"]);

    const downV = await refusal(["docker-compose", "down", "-v"]);
    expect(downV.code).toBe("SBX_ERR_POLICY_DENIED");
    expect(downV.message).toContain("shell.forbidden.compose-down-volumes");
    const rm = await refusal(["docker-compose", "rm", "-f"]);
    expect(rm.code).toBe("SBX_ERR_POLICY_DENIED");
    // an approval cannot widen the grammar: what the policy asks about is refused here
    for (const argv of [
      ["docker-compose", "exec", "idle", "sh"],
      ["docker-compose", "-f", "/etc/other.yml", "ps"],
      ["docker-compose", "up"],
      ["docker-compose", "up", "-d", "--build"],
      ["docker-compose", "logs", "-f"],
      ["docker-compose", "down", "--rmi", "all"],
    ]) {
      const e = await refusal(argv);
      expect(e.code, argv.join(" ")).toBe("SBX_ERR_POLICY_DENIED");
    }
    const inShell = await refusal({ command: "docker-compose ps && docker-compose down" });
    expect(inShell.code).toBe("SBX_ERR_POLICY_DENIED");
    expect(inShell.message).toContain("compose.mediated");

    // nothing ran: the service is as it was
    expect(await serviceContainers()).toEqual(before);
    const recs = await records();
    expect(recs.find((r) => r.type === "exec.verdict" && JSON.stringify(r.argv) === '["docker-compose","down","-v"]')).toMatchObject({
      decision: "forbid",
      rule: "shell.forbidden.compose-down-volumes",
    });
    expect(recs.find((r) => r.type === "exec.verdict" && JSON.stringify(r.argv) === '["docker-compose","up"]')).toMatchObject({ decision: "forbid", rule: "compose.mediated" });
    expect(recs.filter((r) => r.type === "compose.run" && (r.argv as string[]).includes("-v"))).toEqual([]);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/SHELL_EXEC: docker-compose down -v/);
    expect(log).toMatch(/FORBID shell.forbidden.compose-down-volumes/);

    // the CLI: exit 126 with the rule
    const viaCli = await cli(["exec", phase.id, "--", "docker-compose", "down", "-v"], { socket: t.socket });
    expect(viaCli.code).toBe(126);
    expect(viaCli.stderr).toContain("shell.forbidden.compose-down-volumes");
  }, 120_000);

  it("no Docker socket or endpoint in the sandbox, and the compose file is read-only there", async () => {
    const probe = await writeScript(
      project,
      [
        "import os, glob",
        "print(sorted(glob.glob('/var/run/docker*') + glob.glob('/run/docker*')), os.environ.get('DOCKER_HOST'))",
        "try:",
        "    open('/workspace/docker-compose.yml', 'a').write('x')",
        "    print('writable')",
        "except OSError as e:",
        "    print(e.strerror)",
      ].join("\n"),
    );
    const r = await exec(["python3", probe]);
    expect(r.stdout.split("\n")[0]).toBe("[] None");
    expect(r.stdout.split("\n")[1]).toBe("Read-only file system");
  }, 60_000);

  it("down stops and removes the service's containers", async () => {
    const down = await exec(["docker-compose", "down"]);
    expect(down.exitCode, down.stderr).toBe(0);
    expect(await serviceContainers()).toEqual([]);
  }, 120_000);
});
