/**
 * End to end: the real `sandboxd` CLI against a real daemon process on a real
 * unix socket, real containers. Includes the crash test: SIGKILL the daemon
 * while phases run, restart it, and check it reconciles them.
 */
import { readFile, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import type { ChildProcess } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { PhaseView } from "../../src/phases/types.js";
import {
  cli,
  containersOf,
  docker,
  makeProject,
  removeDir,
  requireEngineAndImage,
  ROOT,
  spawnDaemon,
  tempDir,
  testAuditKey,
  waitExit,
  writeScript,
} from "../helpers/sandbox.js";

let stateDir: string;
let socket: string;
let daemon: { child: ChildProcess; output: () => string };
let project: string;
const projects: string[] = [];

async function startPhase(mode = "backtest", name = "1.1"): Promise<PhaseView> {
  const p = await makeProject();
  projects.push(p);
  const r = await cli(["phase", "start", p, "--phase", name, "--mode", mode, "--json"], { socket });
  expect(r.stderr).toBe("");
  expect(r.code).toBe(0);
  return JSON.parse(r.stdout) as PhaseView;
}

beforeAll(async () => {
  await requireEngineAndImage();
  stateDir = await tempDir("e2e");
  socket = path.join(stateDir, "sandboxd.sock");
  daemon = await spawnDaemon(stateDir, socket);
  project = await makeProject();
  projects.push(project);
});

afterAll(async () => {
  if (daemon?.child.exitCode === null) {
    daemon.child.kill("SIGTERM");
    await waitExit(daemon.child).catch(() => undefined);
  }
  // Belt and braces: nothing this suite started may outlive it.
  for (const c of stateDir ? await containersOf(stateDir).catch(() => []) : []) {
    await docker.getContainer(c.Id).remove({ force: true }).catch(() => undefined);
  }
  for (const p of projects) await removeDir(p);
  if (stateDir) await removeDir(stateDir);
});

describe("sandboxd CLI", () => {
  it("phase start prints the id; ps lists it; phase show describes it", async () => {
    const r = await cli(["phase", "start", project, "--phase", "3.1", "--mode", "test"], { socket });
    expect(r.code).toBe(0);
    const id = r.stdout.trim();
    expect(id).toMatch(/^ph_[0-9a-f]{12}$/);
    const ps = await cli(["ps"], { socket });
    expect(ps.stdout).toMatch(/^ID\s+PHASE\s+MODE\s+STATE/);
    expect(ps.stdout).toMatch(new RegExp(`${id}\\s+3\\.1\\s+test\\s+running`));
    const json = JSON.parse((await cli(["ps", "--json"], { socket })).stdout) as PhaseView[];
    expect(json.find((p) => p.id === id)?.state).toBe("running");
    const show = await cli(["phase", "show", id], { socket });
    expect(show.stdout).toMatch(/state:\s+running/);
    const stop = await cli(["phase", "stop", id], { socket });
    expect(stop.stdout).toMatch(new RegExp(`^${id} stopped\\n- Files modified: `));
    expect((await cli(["ps"], { socket })).stdout).not.toContain(id);
    expect((await cli(["ps", "--all"], { socket })).stdout).toMatch(new RegExp(`${id}.*stopped`));
  });

  it("exec streams output and exits with the command's exit code, 124 at timeout, 126 when refused", async () => {
    const p = await startPhase();
    const ok = await cli(["exec", p.id, "--", "python3", await writeScript(p.project, "import sys; print('hello'); print('oops', file=sys.stderr); sys.exit(3)")], {
      socket,
    });
    expect(ok.stdout).toBe("hello\n");
    expect(ok.stderr).toBe("oops\n");
    expect(ok.code).toBe(3);

    const slow = await cli(["exec", p.id, "--timeout", "1", "--", "python3", await writeScript(p.project, "import time; time.sleep(30)")], { socket });
    expect(slow.code).toBe(124);
    expect(slow.stderr).toMatch(/timeout/);

    const refused = await cli(["exec", p.id, "--", "curl", "http://example.com"], { socket });
    expect(refused.code).toBe(126);
    expect(refused.stderr).toMatch(/SBX_ERR_POLICY_NEEDS_APPROVAL/);
    expect(refused.stderr).toMatch(/hint: /);

    const denied = await cli(["exec", p.id, "--", "sudo", "id"], { socket });
    expect(denied.code).toBe(126);
    expect(denied.stderr).toMatch(/policy denied `sudo id` \(rule shell\.forbidden\.privilege/);

    const json = await cli(["exec", p.id, "--json", "--reason", "check", "--", "python3", await writeScript(p.project, "print(42)")], { socket });
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout)).toMatchObject({ exitCode: 0, stdout: "42\n", timedOut: false });

    const signalled = await cli(["exec", p.id, "--", "python3", await writeScript(p.project, "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")], { socket });
    expect(signalled.code).toBe(128 + 15);
  });

  it("approvals: ls shows the pending request, approve lets the command run once", async () => {
    const p = await startPhase();
    const refused = await cli(["exec", p.id, "--reason", "need a marker", "--", "touch", "/workspace/cli-approved"], { socket });
    expect(refused.code).toBe(126);
    const id = /approval (ap_[0-9a-f]{12}) is pending/.exec(refused.stderr)?.[1];
    expect(id).toBeDefined();
    const ls = await cli(["approvals", "ls"], { socket });
    expect(ls.stdout).toMatch(new RegExp(`${id}\\s+${p.id}\\s+pending\\s+.*touch /workspace/cli-approved`));
    const ok = await cli(["approvals", "approve", id!, "--note", "fine"], { socket });
    expect(ok.stdout.trim()).toBe(`${id} approved`);
    expect((await cli(["exec", p.id, "--", "touch", "/workspace/cli-approved"], { socket })).code).toBe(0);
    expect((await cli(["exec", p.id, "--", "touch", "/workspace/cli-approved"], { socket })).code).toBe(126);
    const json = JSON.parse((await cli(["approvals", "ls", "--all", "--json", "--phase", p.id], { socket })).stdout) as Array<{ id: string; state: string; requestReason: string }>;
    expect(json.find((a) => a.id === id)).toMatchObject({ state: "used", requestReason: "need a marker" });
    const bad = await cli(["approvals", "approve", "ap_000000000000"], { socket });
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/SBX_ERR_APPROVAL_NOT_FOUND/);
  });

  it("approvals ls/show escape a command that would rewrite itself on the terminal; --json keeps it exact; a denial is answered on retry", async () => {
    const p = await startPhase();
    // on a terminal the raw bytes would show `touch pytest -q tests/`
    const disguised = "/workspace/x #\u001b[35Dpytest -q tests/\u001b[K\r\u202e";
    const refused = await cli(["exec", p.id, "--", "touch", disguised], { socket });
    expect(refused.code).toBe(126);
    const id = /approval (ap_[0-9a-f]{12}) is pending/.exec(refused.stderr)?.[1];
    expect(id).toBeDefined();
    for (const args of [["approvals", "ls"], ["approvals", "show", id!], ["audit", "show", p.id]]) {
      const out = (await cli(args, { socket })).stdout;
      // bytes: no control character but the newline, no format character
      expect(out.replace(/\n/g, "")).not.toMatch(/[\p{Cc}\p{Cf}]/u);
      expect(out).toContain(`touch $'/workspace/x #\\x1b[35Dpytest -q tests/\\x1b[K\\r\\u202e'`);
    }
    expect(refused.stderr.replace(/\n/g, "")).not.toMatch(/[\p{Cc}\p{Cf}]/u);
    const json = JSON.parse((await cli(["approvals", "show", id!, "--json"], { socket })).stdout) as { argv: string[] };
    expect(json.argv).toEqual(["touch", disguised]);
    expect((await cli(["approvals", "deny", id!, "--note", "looks disguised"], { socket })).stdout.trim()).toBe(`${id} denied`);
    const again = await cli(["exec", p.id, "--", "touch", disguised], { socket });
    expect(again.code).toBe(126);
    expect(again.stderr).toMatch(/SBX_ERR_APPROVAL_DENIED/);
    expect(again.stderr).toContain(`looks disguised`);
    expect(again.stderr).toContain(id!);
  });

  it("logs prints the container's log and -f follows it until the phase stops", async () => {
    const p = await startPhase();
    const logs = await cli(["logs", p.id], { socket });
    expect(logs.code).toBe(0);
    expect(logs.stdout).toMatch(/\S/);
    const follow = cli(["logs", "-f", p.id], { socket, timeoutMs: 60_000 });
    await new Promise((r) => setTimeout(r, 500));
    await cli(["exec", p.id, "--", "python3", await writeScript(p.project, "print(1)")], { socket });
    await cli(["phase", "stop", p.id], { socket });
    const followed = await follow;
    expect(followed.code).toBe(0);
    expect(followed.stdout.length).toBeGreaterThanOrEqual(logs.stdout.length);
    // after the stop the kept log is served from the state dir
    const kept = await cli(["logs", p.id], { socket });
    expect(kept.code).toBe(0);
    expect(kept.stdout).toMatch(/\S/);
  });

  it("says clearly when input is wrong or the daemon is not there", async () => {
    const missing = await cli(["phase", "start", "/nonexistent/project", "--phase", "1", "--mode", "test"], { socket });
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/does not exist \[SBX_ERR_PROJECT_NOT_FOUND\]/);
    const badMode = await cli(["phase", "start", project, "--phase", "1", "--mode", "live"], { socket });
    expect(badMode.code).toBe(2);
    expect(badMode.stderr).toMatch(/backtest, paper, test/);
    const badTimeout = await cli(["exec", "ph_000000000000", "--timeout", "abc", "--", "pytest"], { socket });
    expect(badTimeout.code).toBe(2);
    const unknown = await cli(["exec", "ph_000000000000", "--", "pytest"], { socket });
    expect(unknown.code).toBe(125);
    expect(unknown.stderr).toMatch(/SBX_ERR_PHASE_NOT_FOUND/);
    const nowhere = await cli(["ps"], { socket: path.join(stateDir, "nobody.sock") });
    expect(nowhere.code).toBe(1);
    expect(nowhere.stderr).toMatch(/cannot reach the sandboxd daemon.*SBX_ERR_DAEMON_UNREACHABLE/);
    expect(nowhere.stderr).toMatch(/hint: start the daemon/);
    const help = await cli(["exec", "--help"]);
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/124 killed at its timeout; 126 refused by policy/);
  });

  it("a second daemon on the same socket refuses to start; a stale socket is replaced", async () => {
    const second = await cli(["--socket", socket, "start", "--state-dir", stateDir], { timeoutMs: 30_000 });
    expect(second.code).toBe(1);
    expect(second.stderr).toMatch(/already serving .*SBX_ERR_DAEMON_RUNNING/);

    const otherState = await tempDir("stale");
    const staleSock = path.join(otherState, "s.sock");
    // a socket file nobody listens on, as a crashed daemon leaves it: bound, then the process exits
    const { execFileSync } = await import("node:child_process");
    execFileSync("python3", ["-c", "import socket, sys; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)", staleSock]);
    expect((await stat(staleSock)).isSocket()).toBe(true);
    const d = await spawnDaemon(otherState, staleSock);
    expect(d.output()).toMatch(/removed a stale socket/);
    d.child.kill("SIGTERM");
    expect(await waitExit(d.child)).toBe(0);
    await expect(stat(staleSock)).rejects.toThrow();
    await removeDir(otherState);
  });

  it("reconciles after SIGKILL: running phases are re-adopted, dead ones cleaned up", async () => {
    const keep = await startPhase("backtest", "keep");
    const dies = await startPhase("backtest", "dies");
    await writeFile(path.join(stateDir, "marker"), "x");
    // a command in flight when the daemon dies: its verdict is on record, its result never will be
    const longScript = await writeScript(keep.project, "import time; time.sleep(60)");
    void cli(["exec", keep.id, "--", "python3", longScript], { socket, timeoutMs: 120_000 });
    for (let i = 0; i < 100; i++) {
      if ((await readFile(path.join(stateDir, "audit.jsonl"), "utf8")).includes(longScript)) break;
      await new Promise((r) => setTimeout(r, 100));
    }

    daemon.child.kill("SIGKILL");
    await waitExit(daemon.child);
    // the containers outlive the daemon…
    expect((await docker.getContainer(keep.containerName).inspect()).State.Running).toBe(true);
    // …and one of them dies while nobody is watching
    await docker.getContainer(dies.containerName).kill();

    daemon = await spawnDaemon(stateDir, socket);
    const out = daemon.output();
    expect(out).toMatch(new RegExp(`re-adopted running phase.*${keep.id}|${keep.id}.*re-adopted running phase`));
    expect(out).toMatch(new RegExp(`${dies.id}`));

    const r = await cli(["exec", keep.id, "--", "python3", await writeScript(keep.project, "print('after restart')")], { socket });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe("after restart\n");
    // the command cut off by the crash is marked lost after the re-adoption, naming its verdict
    const recs = (await readFile(path.join(stateDir, "audit.jsonl"), "utf8"))
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as Record<string, any>)
      .filter((x) => x.phase === keep.id);
    const verdict = recs.find((x) => x.type === "exec.verdict" && x.argv?.[1] === longScript)!;
    const readopt = recs.findIndex((x) => x.type === "phase.readopt");
    const lost = recs.findIndex((x) => x.type === "exec.lost");
    expect(readopt).toBeGreaterThan(0);
    expect(lost).toBeGreaterThan(readopt);
    expect(recs[lost]).toMatchObject({ argv: ["python3", longScript], verdictSeq: verdict.seq });
    expect(recs.filter((x) => x.type === "exec.lost")).toHaveLength(1);

    const gone = JSON.parse((await cli(["phase", "show", dies.id, "--json"], { socket })).stdout) as PhaseView;
    expect(gone.state).toBe("failed");
    expect(gone.endReason).toMatch(/reaped after daemon restart/);
    await expect(docker.getContainer(dies.containerName).inspect()).rejects.toMatchObject({ statusCode: 404 });
    const audit = await readFile(keep.buildLog, "utf8");
    expect(audit).toMatch(/\[PHASE\] \[READOPT\]/);
  });

  it("the README's `npm start` serves the socket, and SIGTERM to npm stops the daemon and its phases", async () => {
    const { spawn } = await import("node:child_process");
    const dir = await tempDir("npmstart");
    const sock = path.join(dir, "d.sock");
    const child = spawn("npm", ["start", "--silent"], {
      cwd: ROOT,
      // its own signing key (and so its own witness folder), never the machine's /etc/sandboxd one
      env: { ...process.env, SANDBOXD_SOCKET: sock, SANDBOXD_STATE_DIR: dir, SANDBOXD_AUDIT_KEY: testAuditKey(dir) },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    child.stdout!.on("data", (c: Buffer) => (out += c.toString()));
    child.stderr!.on("data", (c: Buffer) => (out += c.toString()));
    try {
      const deadline = Date.now() + 120_000;
      while ((await cli(["ps"], { socket: sock })).code !== 0) {
        if (Date.now() > deadline || child.exitCode !== null) throw new Error(`npm start did not come up: ${out}`);
        await new Promise((r) => setTimeout(r, 250));
      }
      const p = await makeProject();
      projects.push(p);
      expect((await cli(["phase", "start", p, "--phase", "n", "--mode", "test"], { socket: sock })).code).toBe(0);
      expect((await containersOf(dir)).length).toBe(1);
      child.kill("SIGTERM");
      await waitExit(child);
      expect(await containersOf(dir)).toEqual([]);
      await expect(stat(sock)).rejects.toThrow();
      expect(out).toMatch(/"msg":"stopped"/);
    } finally {
      // after a failed assertion the daemon (npm's child) may still run: stopped through its socket, not orphaned
      if (child.exitCode === null) await cli(["stop"], { socket: sock }).catch(() => undefined);
      if (child.exitCode === null) child.kill("SIGKILL");
      for (const c of await containersOf(dir).catch(() => [])) await docker.getContainer(c.Id).remove({ force: true });
      await removeDir(dir);
    }
  });

  it("SIGTERM stops the daemon cleanly: phases stopped, containers removed, socket gone", async () => {
    await startPhase("test", "last");
    expect((await containersOf(stateDir)).length).toBeGreaterThan(0);
    daemon.child.kill("SIGTERM");
    expect(await waitExit(daemon.child)).toBe(0);
    expect(await containersOf(stateDir)).toEqual([]);
    await expect(stat(socket)).rejects.toThrow();
  });
});
