/**
 * Attacks on the warm pool (src/phases/pool.ts) from inside real sandboxes,
 * as an agent makes them: commands through exec, files in /workspace. Each
 * checks that a phase claimed from the pool keeps every wall of a cold
 * start — protected paths read-only and credential files hidden, the
 * network confined from its first command, no shim secret in reach, no
 * other container or slot in sight, the limits of its own policy — and the
 * audit record that says so.
 */
import { mkdir, readFile, readlink, writeFile } from "node:fs/promises";
import path from "node:path";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readRecords } from "../../src/audit/read.js";
import type { ExecResult, PoolStatus } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { ROOT, TEST_IMAGE, docker, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, writeScript, type TestDaemon } from "../helpers/sandbox.js";

const sh = promisify(execFile);

async function poolUntil(t: TestDaemon, done: (p: PoolStatus) => boolean, timeoutMs = 90_000): Promise<PoolStatus> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const p = (await t.api.request<{ pool: PoolStatus }>("GET", "/v1/phases")).pool;
    if (done(p)) return p;
    if (Date.now() > deadline) throw new Error(`the pool did not get there in time: ${JSON.stringify(p)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function startPhase(t: TestDaemon, project: string, name: string, policy?: string): Promise<PhaseView> {
  const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: name, mode: "backtest", ...(policy ? { policy } : {}) });
  return phase;
}

async function py(t: TestDaemon, id: string, project: string, code: string): Promise<ExecResult> {
  const script = await writeScript(project, code);
  const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${id}/exec`, { argv: ["python3", script] });
  return result;
}

describe("warm pool under attack", () => {
  let t: TestDaemon;
  const cleanup: string[] = [];

  beforeAll(async () => {
    await requireEngineAndImage();
    t = await startTestDaemon({ env: { SANDBOXD_POOL_SIZE: "2" } });
  }, 120_000);

  afterAll(async () => {
    await t?.close();
    for (const d of cleanup) await removeDir(d);
  });

  it("the first command of a pooled phase is confined: a connection out is refused and recorded as this phase's", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const script = await writeScript(project, "import socket\ntry:\n    socket.create_connection(('10.9.8.7', 80), timeout=3)\n    print('CONNECTED')\nexcept OSError as e:\n    print(type(e).__name__)");
    await poolUntil(t, (p) => p.ready >= 2);
    const a = await startPhase(t, project, "first-ms");
    expect(a.pooled).toBeTruthy();
    // no command before this one: the first thing the agent does
    const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${a.id}/exec`, { argv: ["python3", script] });
    expect(result.stdout.trim()).toBe("ConnectionRefusedError");
    await expect
      .poll(async () => (await readRecords(t.stateDir, { phase: a.id })).some((x) => x.type === "net.connect" && x.address === "10.9.8.7" && x.decision === "forbid"), { timeout: 10_000 })
      .toBe(true);
    await t.api.request("DELETE", `/v1/phases/${a.id}`);
  });

  it("a pooled phase cannot write .git, build_audit.log or main.py, and sees no .env", async () => {
    const project = await makeProject();
    cleanup.push(project);
    await mkdir(path.join(project, ".git"));
    await writeFile(path.join(project, ".git", "config"), "[core]\n");
    await writeFile(path.join(project, "main.py"), "print('main')\n");
    await writeFile(path.join(project, ".env"), "POOL_ATTACK_SECRET=pool-attack-secret-value-42\n");
    await mkdir(path.join(project, "config"));
    await writeFile(path.join(project, "config", ".env.production"), "PROD=1\n");
    await writeFile(path.join(project, "config", "server.key"), "KEY\n");
    await sh("chown", ["-R", "1000:1000", project]);
    await poolUntil(t, (p) => p.ready >= 1);
    const a = await startPhase(t, project, "protected");
    expect(a.pooled).toBeTruthy();
    const r = await py(t, a.id, project, [
      "import os, json",
      "out = {}",
      "for f in ['.git/config', 'build_audit.log', 'main.py']:",
      "    try:",
      "        open('/workspace/' + f, 'a').write('# tampered\\n')",
      "        out[f] = 'WROTE'",
      "    except OSError as e:",
      "        out[f] = e.errno",
      "try:",
      "    os.rename('/workspace/main.py', '/workspace/main_gone.py')",
      "    out['rename'] = 'RENAMED'",
      "except OSError as e:",
      "    out['rename'] = e.errno",
      "out['env_listed'] = '.env' in os.listdir('/workspace')",
      "out['config'] = sorted(os.listdir('/workspace/config'))",
      "try:",
      "    out['env_read'] = open('/workspace/.env').read()",
      "except OSError as e:",
      "    out['env_read'] = e.errno",
      "print(json.dumps(out))",
    ].join("\n"));
    expect(r.exitCode, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as Record<string, unknown>;
    for (const f of [".git/config", "build_audit.log", "main.py", "rename"]) expect(String(out[f]), f).not.toMatch(/WROTE|RENAMED/);
    expect(out[".git/config"]).toBe(30); // EROFS
    expect(out["main.py"]).toBe(30);
    expect(out.env_listed).toBe(false);
    expect(out.env_read).toBe(2); // ENOENT
    expect(out.config).toEqual([]);
    // the project itself is untouched
    expect(await readFile(path.join(project, "main.py"), "utf8")).toBe("print('main')\n");
    expect(await readFile(path.join(project, ".git", "config"), "utf8")).toBe("[core]\n");
    const records = await readRecords(t.stateDir, { phase: a.id });
    expect(records.find((x) => x.type === "phase.start")?.pooled).toBeTruthy();
    expect(records.some((x) => x.type === "exec.result")).toBe(true);
    await t.api.request("DELETE", `/v1/phases/${a.id}`);
  });

  it("a pooled phase's commands see no shim secret, no other container's processes, mounts or sockets", async () => {
    const project = await makeProject();
    cleanup.push(project);
    await poolUntil(t, (p) => p.ready >= 2);
    // the slot that stays ready while A runs: its id must be out of A's reach
    const a = await startPhase(t, project, "snoop");
    expect(a.pooled).toBeTruthy();
    // another project claimed meanwhile: its overlay is mounted on its own slot's view, never on A's
    const other = await makeProject();
    cleanup.push(other);
    await writeFile(path.join(other, "only_other.txt"), "other\n");
    await sh("chown", ["1000:1000", path.join(other, "only_other.txt")]);
    const b = await startPhase(t, other, "neighbour");
    expect(b.pooled).toBeTruthy();
    await poolUntil(t, (p) => p.ready >= 2);
    const phasesDir = path.join(t.stateDir, "phases");
    const { stdout: ls } = await sh("ls", [phasesDir]);
    const others = ls.split("\n").filter((x) => x && x !== a.id);
    expect(others.length).toBeGreaterThanOrEqual(2);
    const r = await py(t, a.id, project, [
      "import os, json, socket, glob",
      "out = {'env': sorted(k + '=' + v for k, v in os.environ.items() if k.startswith('SANDBOXD') or 'TOKEN' in k)}",
      "try:",
      "    out['init_environ'] = open('/proc/1/environ', 'rb').read().decode(errors='replace')",
      "except OSError as e:",
      "    out['init_environ'] = e.errno",
      "try:",
      "    out['rundir'] = os.listdir('/run/sandboxd')",
      "except OSError as e:",
      "    out['rundir'] = e.errno",
      "s = socket.socket(socket.AF_UNIX)",
      "try:",
      "    s.connect('/run/sandboxd/control.sock'); out['control'] = 'CONNECTED'",
      "except OSError as e:",
      "    out['control'] = e.errno",
      "out['mountinfo'] = open('/proc/self/mountinfo').read()",
      "out['unix'] = open('/proc/net/unix').read()",
      "out['ws'] = sorted(os.listdir('/workspace'))",
      "out['pids'] = [p for p in os.listdir('/proc') if p.isdigit()]",
      "out['cmdlines'] = []",
      "for p in out['pids']:",
      "    try: out['cmdlines'].append(open('/proc/%s/cmdline' % p, 'rb').read().replace(b'\\0', b' ').decode())",
      "    except OSError: pass",
      "print(json.dumps(out))",
    ].join("\n"));
    expect(r.exitCode, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { ws: string[]; env: string[]; init_environ: unknown; rundir: unknown; control: unknown; mountinfo: string; unix: string; cmdlines: string[] };
    // what the phase is, never how the shim reaches the daemon (its token, socket, pooled flag)
    expect(out.env).toEqual(["SANDBOXD_MODE=backtest", `SANDBOXD_PHASE=${a.id}`]);
    // the shim's environment (where its token came from) is root's: closed to the owner
    expect(out.init_environ).toBe(13);
    expect(out.control).not.toBe("CONNECTED");
    expect(out.ws).not.toContain("only_other.txt");
    expect(others).toContain(b.id);
    // no other slot's or phase's id in its mounts, its unix sockets or its processes
    for (const id of others) {
      expect(out.mountinfo).not.toContain(id);
      expect(out.unix).not.toContain(id);
      expect(out.cmdlines.join("\n")).not.toContain(id);
    }
    await t.api.request("DELETE", `/v1/phases/${b.id}`);
    await t.api.request("DELETE", `/v1/phases/${a.id}`);
  });

  it("a ready slot runs its shim alone, and a pooled phase's commands cannot signal it", async () => {
    await poolUntil(t, (p) => p.ready >= 2 && p.filling === 0);
    const instance = (await readFile(path.join(t.stateDir, "instance"), "utf8")).trim();
    const ready = await docker.listContainers({ filters: { label: [`sandboxd.instance=${instance}`, "sandboxd.pool=1"] } });
    expect(ready.length).toBe(2);
    for (const c of ready) {
      // before its claim: no forker, no owner's process, nothing but the shim (under tini)
      const top = await docker.getContainer(c.Id).top({ ps_args: "-o pid,user,args" });
      expect(top.Processes.length, JSON.stringify(top.Processes)).toBe(2);
      for (const p of top.Processes) expect(p.slice(1).join(" ")).toMatch(/^root (\/usr\/bin\/tini -g -- )?node \/opt\/sandboxd\/shim\.cjs$/);
    }
    const project = await makeProject();
    cleanup.push(project);
    const a = await startPhase(t, project, "signals");
    expect(a.pooled).toBeTruthy();
    const r = await py(t, a.id, project, [
      "import os, signal, json",
      "out = {}",
      "try:",
      "    os.kill(1, signal.SIGKILL)",
      "    out['1'] = 'SENT'",
      "except OSError as e:",
      "    out['1'] = e.errno",
      "print(json.dumps(out))",
    ].join("\n"));
    expect(r.exitCode, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)["1"]).toBe(1); // EPERM
    // the shim lives on: the phase still runs commands, and its trail has both
    const again = await py(t, a.id, project, "print('alive')");
    expect(again.stdout.trim()).toBe("alive");
    const results = (await readRecords(t.stateDir, { phase: a.id })).filter((x) => x.type === "exec.result");
    expect(results.length).toBeGreaterThanOrEqual(2);
    await t.api.request("DELETE", `/v1/phases/${a.id}`);
  });

  it("a phase policy with other limits never claims a slot: it starts cold, with its own limits", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const dir = await tempDir("policy");
    cleanup.push(dir);
    const base = await readFile(path.join(ROOT, "policies", "default.yaml"), "utf8");
    expect(base).toContain("    pidsLimit: 256 ");
    const file = path.join(dir, "narrow.yaml");
    await writeFile(file, base.replace("    pidsLimit: 256 ", "    pidsLimit: 64 "));
    await poolUntil(t, (p) => p.ready >= 2);
    const a = await startPhase(t, project, "narrow", file);
    expect(a.pooled).toBeUndefined();
    const info = await docker.getContainer(a.containerId!).inspect();
    expect(info.HostConfig.PidsLimit).toBe(64);
    expect(info.Config.Labels["sandboxd.pool"]).toBeUndefined();
    const records = await readRecords(t.stateDir, { phase: a.id });
    expect(records.find((x) => x.type === "phase.start")?.pooled).toBeUndefined();
    await t.api.request("DELETE", `/v1/phases/${a.id}`);
    // and a phase of the daemon's policy is served by a slot whose container has exactly that policy's limits
    await poolUntil(t, (p) => p.ready >= 1);
    const b = await startPhase(t, project, "default-limits");
    expect(b.pooled).toBeTruthy();
    const host = (await docker.getContainer(b.containerId!).inspect()).HostConfig;
    expect(host.PidsLimit).toBe(256);
    expect(host.Memory).toBe(2 * 1024 ** 3);
    expect(host.NanoCpus).toBe(1e9);
    await t.api.request("DELETE", `/v1/phases/${b.id}`);
  });

  it("a pooled slot's conntrack watch that dies during the claim is on record as degraded, never as recording", async () => {
    const project = await makeProject();
    cleanup.push(project);
    // a tree the credential walk takes a while over: the claim's window is wide enough to hit
    await sh("sh", ["-c", `cd ${project} && mkdir -p bulk && cd bulk && for d in $(seq 1 40); do mkdir d$d; (cd d$d && touch $(seq -f f%g 1 500)); done && chown -R 1000:1000 ${project}`]);
    await poolUntil(t, (p) => p.ready >= 2 && p.filling === 0);
    const phasesDir = path.join(t.stateDir, "phases");
    const exists = (f: string) => readFile(f, "utf8").then(() => true, () => false);
    const slots: string[] = [];
    for (const id of (await sh("ls", [phasesDir])).stdout.split("\n").filter(Boolean)) {
      if ((await exists(path.join(phasesDir, id, "pool.json"))) && !(await exists(path.join(phasesDir, id, "phase.json")))) slots.push(id);
    }
    expect(slots.length).toBe(2);
    const started = startPhase(t, project, "watch-dies");
    // the slot this start claimed: its folder has the phase's record now
    let claimed: string | undefined;
    const deadline = Date.now() + 20_000;
    while (!claimed && Date.now() < deadline) {
      for (const id of slots) {
        if (await exists(path.join(phasesDir, id, "phase.json"))) claimed = id;
      }
      if (!claimed) await new Promise((r) => setTimeout(r, 2));
    }
    expect(claimed).toBeTruthy();
    const info = await docker.getContainer(`sandboxd-${claimed!}`).inspect();
    // this daemon's watch of that container (the test started it; killed by its pid)
    const netns = await readlink(`/proc/${info.State.Pid}/ns/net`);
    const { stdout } = await sh("pgrep", ["-P", String(process.pid), "conntrack"]);
    let killed = 0;
    for (const pid of stdout.split("\n").filter(Boolean)) {
      if ((await readlink(`/proc/${pid}/ns/net`).catch(() => "")) !== netns) continue;
      process.kill(Number(pid), "SIGKILL");
      killed++;
    }
    expect(killed).toBe(1);
    const a = await started;
    expect(a.id).toBe(claimed);
    expect(a.pooled).toBeTruthy();
    await new Promise((r) => setTimeout(r, 500));
    const confines = (await readRecords(t.stateDir, { phase: a.id })).filter((x) => x.type === "net.confine");
    // the last word on the watch says it no longer records
    expect(confines.at(-1)?.recorded, JSON.stringify(confines)).toBe(false);
    await t.api.request("DELETE", `/v1/phases/${a.id}`);
  });

  it("a claim racing the daemon's stop leaves no container, mount or folder, and a phase on record has its end", async () => {
    const project = await makeProject();
    cleanup.push(project);
    await poolUntil(t, (p) => p.ready >= 2);
    const instance = (await readFile(path.join(t.stateDir, "instance"), "utf8")).trim();
    // two starts in flight when the daemon stops: each either never began or ended on record
    const starts = [0, 1].map((i) => startPhase(t, project, `race-${i}`).catch((e: Error) => e));
    await new Promise((r) => setTimeout(r, 5));
    await t.daemon.close();
    await Promise.all(starts);
    const left = await docker.listContainers({ all: true, filters: { label: [`sandboxd.instance=${instance}`] } });
    expect(left.map((c) => [c.Names, c.Labels["sandboxd.pool"], c.State, c.Created])).toEqual([]);
    expect(await readFile("/proc/self/mountinfo", "utf8")).not.toContain(t.stateDir);
    const trail = await readRecords(t.stateDir, {});
    for (const start of trail.filter((x) => x.type === "phase.start")) {
      expect(trail.some((x) => (x.type === "phase.complete" || x.type === "phase.failed") && x.phase === start.phase), `phase ${String(start.phase)} has no end`).toBe(true);
    }
  });
});

describe("warm pool whose image is rebuilt under it", () => {
  // a tag of this test's own, so rebuilding it touches no other daemon's image
  const tag = `sandboxd-sandbox:pool-attack-swap-${process.pid}`;
  let t: TestDaemon;
  const cleanup: string[] = [];

  beforeAll(async () => {
    await requireEngineAndImage();
    await sh("docker", ["tag", TEST_IMAGE, tag]);
  }, 60_000);

  afterAll(async () => {
    await t?.close();
    for (const d of cleanup) await removeDir(d);
    await sh("docker", ["rmi", tag]).catch(() => undefined);
  });

  it("a phase started after the image was rebuilt runs the rebuilt image, never a slot made from the old one", async () => {
    t = await startTestDaemon({ env: { SANDBOXD_POOL_SIZE: "2", SANDBOXD_IMAGE: tag } });
    await poolUntil(t, (p) => p.ready >= 2 && p.filling === 0);
    // the operator rebuilds the image (a fixed shim, a tightened Dockerfile): the tag names new content
    const ctxDir = await tempDir("rebuild");
    cleanup.push(ctxDir);
    await writeFile(path.join(ctxDir, "marker"), "rebuilt\n");
    await writeFile(path.join(ctxDir, "Dockerfile"), `FROM ${TEST_IMAGE}\nCOPY marker /etc/sandboxd-rebuilt\n`);
    await sh("docker", ["build", "-q", "-t", tag, ctxDir], { timeout: 120_000 });
    const now = (await docker.getImage(tag).inspect()).Id;

    const project = await makeProject();
    cleanup.push(project);
    const a = await startPhase(t, project, "after-rebuild");
    const info = await docker.getContainer(a.containerId!).inspect();
    expect(info.Image).toBe(now);
    const r = await py(t, a.id, project, "import os\nprint(os.path.exists('/etc/sandboxd-rebuilt'))");
    expect(r.stdout.trim()).toBe("True");
    // the old slots went, and the trail says why
    const trail = await readRecords(t.stateDir, {});
    expect(trail.some((x) => x.type === "pool.discard" && String(x.reason).includes("image"))).toBe(true);
    await t.api.request("DELETE", `/v1/phases/${a.id}`);
  });
});
