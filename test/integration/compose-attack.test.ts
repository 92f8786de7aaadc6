/**
 * Attacks on mediated docker-compose (src/phases/compose.ts), performed from
 * inside a real phase as the agent would: the compose file is the
 * operator's and read-only in the sandbox, but compose reads more than that
 * file, and what the agent writes reaches the project through accepted
 * iterations. Each attack's outcome on the host (no container started, or
 * started only as checked) and its audit record are asserted.
 */
import { execFile } from "node:child_process";
import { chown, mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/exec.js";
import type { PhaseView } from "../../src/phases/types.js";
import { OWNER, docker, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, writeScript, type TestDaemon } from "../helpers/sandbox.js";

const run = promisify(execFile);
let t: TestDaemon;
let base: string;
const cleanup: Array<() => Promise<unknown>> = [];

type Rec = Record<string, unknown> & { type: string };

async function start(project: string, name: string): Promise<PhaseView> {
  return (await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: name, mode: "test" })).phase;
}

async function exec(p: PhaseView, argv: string[], env?: Record<string, string>): Promise<ExecResult> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${p.id}/exec`, { argv, ...(env ? { env } : {}) })).result;
}

async function refusal(p: PhaseView, argv: string[]): Promise<SandboxdError> {
  const e = await t.api.request("POST", `/v1/phases/${p.id}/exec`, { argv }).then(
    () => null,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(SandboxdError);
  return e as SandboxdError;
}

async function checkpoint(p: PhaseView, message: string): Promise<void> {
  await t.api.request("POST", `/v1/phases/${p.id}/checkpoint`, { message });
}

async function records(p: PhaseView): Promise<Rec[]> {
  return (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8"))
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Rec)
    .filter((r) => r.phase === p.id);
}

/** every container compose made for a project directory, running or not */
async function containersOf(project: string): Promise<Array<{ name: string; privileged: boolean; binds: string[]; project: string }>> {
  const list = await docker.listContainers({ all: true, filters: { label: [`com.docker.compose.project.working_dir=${project}`] } });
  return Promise.all(
    list.map(async (c) => {
      const info = await docker.getContainer(c.Id).inspect();
      return { name: c.Names[0]!.replace(/^\//, ""), privileged: info.HostConfig.Privileged === true, binds: info.HostConfig.Binds ?? [], project: c.Labels["com.docker.compose.project"] ?? "" };
    }),
  );
}

async function owned(file: string, text: string): Promise<void> {
  await writeFile(file, text);
  await chown(file, OWNER.uid, OWNER.gid);
}

function composeDown(project: string, name?: string): Promise<unknown> {
  return run("docker-compose", ["--project-directory", project, ...(name ? ["-p", name] : []), "-f", path.join(project, "docker-compose.yml"), "down"], { cwd: project }).catch(() => undefined);
}

/** the agent's write, from inside the sandbox: a script run as a command */
async function agentWrites(p: PhaseView, project: string, rel: string, text: string): Promise<ExecResult> {
  const script = await writeScript(project, `import os\np = "/workspace/${rel}"\ntry:\n    os.unlink(p)\nexcept FileNotFoundError:\n    pass\nopen(p, "w").write(${JSON.stringify(text)})\nprint("written")`);
  return exec(p, ["python3", script]);
}

beforeAll(async () => {
  await requireEngineAndImage();
  base = process.env.SANDBOXD_BASE_IMAGE ?? "sandboxd-base:bookworm";
  await docker.getImage(base).inspect();
  t = await startTestDaemon();
}, 120_000);

afterAll(async () => {
  await t?.close();
  for (const c of cleanup.reverse()) await c();
}, 120_000);

describe("docker-compose attacks from inside a phase", () => {
  it("an `extends` file the agent rewrote (privileged, network_mode host, /:/host): refused before anything runs, audited; nothing started", async () => {
    const project = await makeProject();
    cleanup.push(() => removeDir(project), () => composeDown(project));
    await owned(path.join(project, "docker-compose.yml"), `version: "3.8"\nservices:\n  app:\n    extends: {file: common.yml, service: base}\n    command: ["sleep", "600"]\n`);
    await owned(path.join(project, "common.yml"), `version: "3.8"\nservices:\n  base:\n    image: ${base}\n    network_mode: none\n`);
    const p = await start(project, "12.1");
    try {
      const evil = `version: "3.8"\nservices:\n  base:\n    image: ${base}\n    privileged: true\n    network_mode: host\n    pid: host\n    volumes: ["/:/host", "/var/run/docker.sock:/var/run/docker.sock"]\n`;
      expect((await agentWrites(p, project, "common.yml", evil)).stdout).toContain("written");
      await checkpoint(p, "tune the base service");
      // the iteration was accepted by rules: the rewritten file is the project's now, on the host
      expect(await readFile(path.join(project, "common.yml"), "utf8")).toBe(evil);

      const e = await refusal(p, ["docker-compose", "up", "-d"]);
      expect(e.code).toBe("SBX_ERR_POLICY_DENIED");
      expect(e.message).toContain("common.yml");
      expect(await containersOf(project)).toEqual([]);
      const recs = await records(p);
      const verdict = recs.find((r) => r.type === "exec.verdict" && JSON.stringify(r.argv) === '["docker-compose","up","-d"]');
      expect(verdict).toMatchObject({ decision: "forbid", rule: "compose.config" });
      expect(String(verdict!.reason)).toMatch(/extends file common\.yml is read by compose on the host but can be changed from the sandbox/);
      expect(recs.some((r) => r.type === "compose.run")).toBe(false);
      expect(await readFile(p.buildLog, "utf8")).toMatch(/FORBID compose\.config/);
    } finally {
      await t.api.request("DELETE", `/v1/phases/${p.id}`);
    }
  }, 180_000);

  it("an env_file the agent rewrote (a production DSN): refused, audited; the override file and .env cannot be written at all", async () => {
    const project = await makeProject();
    cleanup.push(() => removeDir(project), () => composeDown(project));
    await owned(path.join(project, "docker-compose.yml"), `version: "3.8"\nservices:\n  app:\n    image: ${base}\n    command: ["sleep", "600"]\n    network_mode: none\n    env_file: app.env\n`);
    await owned(path.join(project, "app.env"), "DATABASE_URL=postgresql://test@localhost/trading_test\n");
    const p = await start(project, "12.2");
    try {
      await agentWrites(p, project, "app.env", "DATABASE_URL=postgresql://trader@prod-db.internal/trading\n");
      await checkpoint(p, "point the app at its database");
      expect(await readFile(path.join(project, "app.env"), "utf8")).toContain("prod-db");
      const e = await refusal(p, ["docker-compose", "up", "-d"]);
      expect(e.message).toMatch(/env_file app\.env is read by compose on the host/);
      expect(await containersOf(project)).toEqual([]);
      expect((await records(p)).find((r) => r.type === "exec.verdict" && r.rule === "compose.config")).toMatchObject({ decision: "forbid" });

      // compose's implicit inputs: the override file is read-only, .env is not in the view and cannot be made
      const probe = await writeScript(
        project,
        [
          "for rel in ('docker-compose.override.yml', 'compose.yaml', '.env'):",
          "    try:",
          "        open('/workspace/' + rel, 'w').write('x')",
          "        print(rel, 'written')",
          "    except OSError as e:",
          "        print(rel, e.strerror)",
        ].join("\n"),
      );
      // (neither exists in the project, so the view has no read-only bind there: the writes land in the layer …)
      expect((await exec(p, ["python3", probe])).exitCode).toBe(0);
      await checkpoint(p, "try the implicit inputs").catch(() => undefined);
      // … and the checkpoint refuses them (protected paths): nothing of it reached the project on the host
      const iter = (await records(p)).filter((r) => r.type === "workspace.iteration").pop();
      expect(JSON.stringify(iter)).toMatch(/workspace\.protected\.(compose|credentials)/);
      await expect(readFile(path.join(project, "docker-compose.override.yml"), "utf8")).rejects.toThrow();
      await expect(readFile(path.join(project, ".env"), "utf8")).rejects.toThrow();
      // (compose.yaml would come before docker-compose.yml in compose's order of preference)
      await expect(readFile(path.join(project, "compose.yaml"), "utf8")).rejects.toThrow();
    } finally {
      await t.api.request("DELETE", `/v1/phases/${p.id}`);
    }
  }, 180_000);

  it("the agent's COMPOSE_* environment is not compose's; the call runs the checked config under the pinned project name; a script gets a clear refusal", async () => {
    const project = await makeProject();
    cleanup.push(() => removeDir(project), () => composeDown(project, path.basename(project).toLowerCase().replace(/[^-_a-z0-9]/g, "")));
    await owned(path.join(project, "docker-compose.yml"), `version: "3.8"\nservices:\n  idle:\n    image: ${base}\n    command: ["sleep", "600"]\n    network_mode: none\n    volumes: ["./data:/data"]\n`);
    await mkdir(path.join(project, "data"));
    await chown(path.join(project, "data"), OWNER.uid, OWNER.gid);
    const p = await start(project, "12.3");
    try {
      const up = await exec(p, ["docker-compose", "up", "-d"], { COMPOSE_PROJECT_NAME: "victim", COMPOSE_FILE: "evil.yml" });
      expect(up.exitCode, up.stderr).toBe(0);
      const name = path.basename(project).toLowerCase().replace(/[^-_a-z0-9]/g, "");
      const started = await containersOf(project);
      expect(started.map((c) => c.project)).toEqual([name]);
      expect(started[0]!.privileged).toBe(false);
      expect(started[0]!.binds).toEqual([`${path.join(project, "data")}:/data:rw`]);
      const runRec = (await records(p)).find((r) => r.type === "compose.run");
      expect(runRec!.argv).toEqual(["docker-compose", "--project-directory", project, "-p", name, "-f", path.join(t.stateDir, "phases", p.id, "compose.resolved.yml"), "--ansi", "never", "up", "-d", "--no-build"]);

      // from a script (not the command itself): a clear refusal, not "not found"
      const script = await writeScript(project, "import subprocess\nr = subprocess.run(['docker-compose', 'ps'], capture_output=True, text=True)\nprint(r.returncode)\nprint(r.stderr)");
      const viaScript = await exec(p, ["python3", script]);
      expect(viaScript.stdout.split("\n")[0]).toBe("126");
      expect(viaScript.stdout).toContain("runs on the host through sandboxd, only as a command of its own");
      expect((await exec(p, ["docker-compose", "down"])).exitCode).toBe(0);
      expect(await containersOf(project)).toEqual([]);
    } finally {
      await t.api.request("DELETE", `/v1/phases/${p.id}`);
    }
  }, 180_000);

  it("another directory's stack under the same compose project name: `down` refused, audited; that stack keeps running", async () => {
    const parentA = await tempDir("twinA");
    const parentB = await tempDir("twinB");
    const a = path.join(parentA, "trading");
    const b = path.join(parentB, "trading");
    const src = await makeProject();
    cleanup.push(() => removeDir(src));
    await run("cp", ["-a", src, a]);
    await mkdir(b);
    const file = `version: "3.8"\nservices:\n  idle:\n    image: ${base}\n    command: ["sleep", "600"]\n    network_mode: none\n`;
    await owned(path.join(a, "docker-compose.yml"), file);
    await writeFile(path.join(b, "docker-compose.yml"), file);
    cleanup.push(() => removeDir(parentA), () => removeDir(parentB), () => composeDown(b), () => composeDown(a));
    // the operator's other project, started by hand in its directory
    await run("docker-compose", ["up", "-d"], { cwd: b });
    expect((await containersOf(b)).length).toBe(1);
    const p = await start(a, "12.4");
    try {
      const e = await refusal(p, ["docker-compose", "down"]);
      expect(e.message).toContain(`compose project name trading is taken by containers of ${b}`);
      expect((await docker.getContainer((await containersOf(b))[0]!.name).inspect()).State.Running).toBe(true);
      expect((await records(p)).find((r) => r.type === "exec.verdict" && r.rule === "compose.config")).toMatchObject({ decision: "forbid", argv: ["docker-compose", "down"] });
    } finally {
      await t.api.request("DELETE", `/v1/phases/${p.id}`);
    }
  }, 180_000);

  it("the operator's own file outside the allow-list (privileged, a bind outside the project, an external volume): refused", async () => {
    const project = await makeProject();
    cleanup.push(() => removeDir(project), () => composeDown(project));
    const p = await start(project, "12.5");
    try {
      const cases: Array<[string, RegExp]> = [
        [`    privileged: true\n`, /`privileged` is not accepted/],
        [`    volumes: ["/etc:/host-etc:ro"]\n`, /bind source \/etc is outside the project/],
        [`    volumes: ["/var/run/docker.sock:/s"]\n`, /socket|outside the project/],
        [`    network_mode: host\n`, /`network_mode: host` is not accepted/],
        [`    volumes: ["ext:/d"]\nvolumes:\n  ext: {external: true}\n`, /volumes ext: `external` is not accepted/],
        [`    volumes: ["hostroot:/d"]\nvolumes:\n  hostroot: {driver_opts: {type: none, o: bind, device: /}}\n`, /driver_opts/],
        [`    volumes: ["pg:/d"]\nvolumes:\n  pg: {name: otherproject_pgdata}\n`, /volumes pg: `name: otherproject_pgdata` is not accepted/],
        [`    networks: [n]\nnetworks:\n  n: {name: otherproject_default}\n`, /networks n: `name: otherproject_default` is not accepted/],
      ];
      for (const [extra, why] of cases) {
        // the operator edits the file on the host between calls (it is read-only in the sandbox)
        await owned(path.join(project, "docker-compose.yml"), `version: "3.8"\nservices:\n  idle:\n    image: ${base}\n    command: ["sleep", "600"]\n${extra}`);
        const e = await refusal(p, ["docker-compose", "up", "-d"]);
        expect(e.message, extra).toMatch(why);
      }
      expect(await containersOf(project)).toEqual([]);
      expect((await records(p)).filter((r) => r.type === "exec.verdict" && r.rule === "compose.config").length).toBe(cases.length);
    } finally {
      await t.api.request("DELETE", `/v1/phases/${p.id}`);
    }
  }, 180_000);
});
