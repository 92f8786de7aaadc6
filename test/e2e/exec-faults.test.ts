/**
 * The exec path under the faults users and operators cause (issue 13), each
 * reproduced against a real daemon process, the real CLI and real
 * containers: a reader that goes away, a client that disconnects, a paused
 * container, oversized requests, a container killed or removed from
 * outside, and the exit codes of refusals.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import http from "node:http";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ApiClient } from "../../src/cli/client.js";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import {
  CLI,
  cli,
  containersOf,
  docker,
  makeProject,
  removeDir,
  requireEngineAndImage,
  spawnDaemon,
  tempDir,
  testAuditKey,
  until,
  waitExit,
  writeScript,
} from "../helpers/sandbox.js";

const run = promisify(execFile);

let stateDir: string;
let socket: string;
let daemon: { child: ChildProcess; output: () => string };
let api: ApiClient;
const projects: string[] = [];

async function startPhase(): Promise<PhaseView & { project: string }> {
  const project = await makeProject();
  projects.push(project);
  const { phase } = await api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "13", mode: "backtest" });
  return { ...phase, project };
}

async function records(): Promise<Array<Record<string, unknown>>> {
  const text = await readFile(path.join(stateDir, "audit.jsonl"), "utf8");
  return text
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}


async function errorOf(p: Promise<unknown>): Promise<SandboxdError> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(SandboxdError);
  return e as SandboxdError;
}

beforeAll(async () => {
  await requireEngineAndImage();
  stateDir = await tempDir("faults");
  socket = path.join(stateDir, "sandboxd.sock");
  daemon = await spawnDaemon(stateDir, socket);
  api = new ApiClient(socket);
}, 120_000);

afterAll(async () => {
  if (daemon?.child.exitCode === null) {
    daemon.child.kill("SIGTERM");
    await waitExit(daemon.child).catch(() => undefined);
  }
  for (const c of stateDir ? await containersOf(stateDir).catch(() => []) : []) {
    await docker.getContainer(c.Id).remove({ force: true }).catch(() => undefined);
  }
  for (const p of projects) await removeDir(p);
  if (stateDir) await removeDir(stateDir);
});

describe("a reader or client that goes away", () => {
  it("`exec … | head -2` exits quietly, the command is ended, and the phase answers the next command at once", async () => {
    const p = await startPhase();
    // far more than every buffer on the way holds, so the writer is blocked when head leaves
    const emit = await writeScript(p.project, "import sys\nfor i in range(2_000_000):\n    sys.stdout.write(f'line {i} ' + 'x' * 80 + '\\n')");
    for (let round = 0; round < 3; round++) {
      const t0 = Date.now();
      const { stdout, stderr } = await run(
        "bash",
        ["-c", `set -o pipefail; "${process.execPath}" "${CLI}" --socket "${socket}" exec ${p.id} -- python3 ${emit} | head -2; echo "status=$?" >&2`],
        { timeout: 60_000 },
      );
      expect(stdout).toBe(`line 0 ${"x".repeat(80)}\nline 1 ${"x".repeat(80)}\n`);
      // no stack trace, no EPIPE noise: only the pipeline's status (141: the reader left)
      expect(stderr.trim()).toBe("status=141");
      const quick = Date.now();
      const next = await cli(["exec", p.id, "--", "python3", await writeScript(p.project, "print('next')")], { socket, timeoutMs: 30_000 });
      expect(next.stdout).toBe("next\n");
      expect(next.code).toBe(0);
      expect(Date.now() - quick, `round ${round}: the next command waited`).toBeLessThan(10_000);
      expect(Date.now() - t0).toBeLessThan(40_000);
    }
    // each departed reader's command was ended, not left to run to its end
    const ended = (await records()).filter((r) => r.phase === p.id && r.type === "exec.result" && Array.isArray(r.argv) && (r.argv as string[])[1] === emit);
    expect(ended).toHaveLength(3);
    for (const r of ended) expect(r.signal).toBe("SIGKILL");
    const t = Date.now();
    expect((await cli(["phase", "stop", p.id], { socket, timeoutMs: 60_000 })).code).toBe(0);
    expect(Date.now() - t).toBeLessThan(20_000);
  }, 180_000);

  it("a streaming reader that stops reading holds up only its own command: another command's output and exit arrive at once, and are recorded", async () => {
    const p = await startPhase();
    const emit = await writeScript(p.project, "import sys\nfor i in range(5_000_000):\n    sys.stdout.write(f'line {i} ' + 'x' * 80 + '\\n')");
    const net = await import("node:net");
    // a client that sends its exec and then never reads a byte
    const stalled = net.connect(socket);
    stalled.on("error", () => undefined);
    const body = JSON.stringify({ argv: ["python3", emit] });
    stalled.write(`POST /v1/phases/${p.id}/exec?stream=1 HTTP/1.1\r\nHost: sandboxd\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`);
    stalled.pause();
    // long enough for every buffer between the command and the stalled client to fill
    await new Promise((r) => setTimeout(r, 4_000));
    for (let round = 0; round < 3; round++) {
      const t0 = Date.now();
      const other = await cli(["exec", "--json", p.id, "--", "python3", await writeScript(p.project, `print('other ${round}')`)], { socket, timeoutMs: 90_000 });
      expect(Date.now() - t0, `round ${round}: the other command waited for the stalled reader`).toBeLessThan(10_000);
      expect(other.code).toBe(0);
      expect(JSON.parse(other.stdout)).toMatchObject({ exitCode: 0, timedOut: false, stdout: `other ${round}\n` });
    }
    const others = (await records()).filter((r) => r.phase === p.id && r.type === "exec.result" && String((r.argv as string[])[1]).startsWith("sbx_scripts") && (r.argv as string[])[1] !== emit);
    expect(others.map((r) => r.exitCode)).toEqual([0, 0, 0]);
    // the stalled command is still there, blocked on its pipe, until its client goes
    expect((await records()).some((r) => r.phase === p.id && r.type === "exec.result" && (r.argv as string[])[1] === emit)).toBe(false);
    stalled.destroy();
    await until("the stalled reader's command to end", async () =>
      (await records()).find((r) => r.phase === p.id && r.type === "exec.result" && (r.argv as string[])[1] === emit),
    );
    const ended = (await records()).find((r) => r.phase === p.id && r.type === "exec.result" && (r.argv as string[])[1] === emit);
    expect(ended).toMatchObject({ signal: "SIGKILL" });
  }, 180_000);

  it("a frames reader that stops reading: the command waits, the daemon holds a bounded backlog, and every byte arrives once it reads again", async () => {
    const p = await startPhase();
    const total = 2400 * 65536; // 150 MiB: without backpressure, seconds of it would pile up in the daemon
    const emit = await writeScript(p.project, "import sys\nb = bytes(range(256)) * 256\nfor _ in range(2400):\n    sys.stdout.buffer.write(b)\n");
    const rss = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${daemon.child.pid}/status`, "utf8"))![1]) * 1024;
    const before = rss();
    const res = await api.stream("POST", `/v1/phases/${p.id}/exec?stream=frames`, { argv: ["python3", emit] });
    // no reader for 3 s: every buffer between the command and this client fills, then the command blocks
    await new Promise((r) => setTimeout(r, 3_000));
    const grown = rss() - before;
    expect(grown, "the daemon's RSS grew while its client did not read").toBeLessThan(40 * 1024 * 1024);
    const { FrameReader, StreamFrame } = await import("../../src/frames.js");
    const reader = new FrameReader();
    const pattern = Buffer.from(bytes256());
    let got = 0;
    let bad = -1;
    let last: { type: string; result?: ExecResult } | null = null;
    for await (const chunk of res as AsyncIterable<Buffer>) {
      for (const f of reader.push(chunk)) {
        if (f.kind === StreamFrame.Stdout) {
          for (let i = 0; i < f.payload.length && bad < 0; i++) if (f.payload[i] !== pattern[(got + i) % 256]) bad = got + i;
          got += f.payload.length;
        } else if (f.kind === StreamFrame.Event) last = JSON.parse(f.payload.toString("utf8")) as typeof last;
      }
    }
    expect(bad, "first byte out of order or changed").toBe(-1);
    expect(got).toBe(total);
    expect(last).toMatchObject({ type: "exit", result: { exitCode: 0, stdoutBytes: total } });
  }, 120_000);

  it("a non-streaming exec whose client disconnects ends its command", async () => {
    const p = await startPhase();
    const script = await writeScript(p.project, "import time\nfor i in range(300):\n    time.sleep(0.1)\nprint('ran to the end')");
    const req = http.request({ socketPath: socket, method: "POST", path: `/v1/phases/${p.id}/exec`, headers: { "content-type": "application/json" } });
    req.on("error", () => undefined);
    req.end(JSON.stringify({ argv: ["python3", script] }));
    await until("the command to start", async () => (await records()).some((r) => r.phase === p.id && r.type === "exec.verdict"));
    await new Promise((r) => setTimeout(r, 500));
    req.destroy();
    const result = await until(
      "the command's result",
      async () => (await records()).find((r) => r.phase === p.id && r.type === "exec.result"),
      15_000,
    );
    expect(result.signal).toBe("SIGKILL");
    expect(result.durationMs as number).toBeLessThan(15_000);
  }, 60_000);

  it("a late write after the backstop answered does not crash the daemon (docker pause, then unpause)", async () => {
    const p = await startPhase();
    const chatty = await writeScript(p.project, "import time, sys\nfor i in range(400):\n    print('tick', i, flush=True)\n    time.sleep(0.05)");
    const container = docker.getContainer(p.containerName);
    const running = cli(["exec", p.id, "--timeout", "1", "--", "python3", chatty], { socket, timeoutMs: 90_000 });
    await until("output to flow", async () => (await records()).some((r) => r.phase === p.id && r.type === "exec.verdict"));
    await new Promise((r) => setTimeout(r, 300));
    await container.pause();
    try {
      const r = await running;
      // the backstop answered (timeout + grace + 10 s) with the shim's silence
      expect(r.stderr).toMatch(/SBX_ERR_SHIM_LOST/);
    } finally {
      await container.unpause();
    }
    // whatever the shim now sends late for that exec is dropped; the daemon lives and serves
    await new Promise((r) => setTimeout(r, 2_000));
    expect(daemon.child.exitCode).toBeNull();
    expect(daemon.output()).not.toMatch(/ERR_HTTP_HEADERS_SENT|uncaught/i);
    const next = await cli(["exec", p.id, "--", "python3", await writeScript(p.project, "print('alive')")], { socket, timeoutMs: 30_000 });
    expect(next.stdout).toBe("alive\n");
  }, 120_000);
});

describe("large requests", () => {
  it("argv over the channel's frame is refused with a coded 413 before anything is sent; the phase's running command is unharmed", async () => {
    const p = await startPhase();
    const slow = api.request<{ result: ExecResult }>("POST", `/v1/phases/${p.id}/exec`, {
      argv: ["python3", await writeScript(p.project, "import time; time.sleep(3); print('survived')")],
    });
    await new Promise((r) => setTimeout(r, 500));
    const big = Array.from({ length: 10 }, () => "a".repeat(110_000));
    const e = await errorOf(api.request("POST", `/v1/phases/${p.id}/exec`, { argv: ["python3", "-V", ...big] }));
    expect(e.code).toBe("SBX_ERR_REQUEST_TOO_LARGE");
    expect(e.status).toBe(413);
    expect(e.hint).toMatch(/file/);
    const { result } = await slow;
    expect(result.stdout).toBe("survived\n");
    expect(result.exitCode).toBe(0);
    // nothing was recorded for the refused request: it never became a decision
    expect((await records()).filter((r) => r.phase === p.id && r.type === "exec.verdict")).toHaveLength(1);
  });

  it("one argument of 131,072 bytes is refused as the kernel would (400), one of 131,071 runs", async () => {
    const p = await startPhase();
    const script = await writeScript(p.project, "import sys; print(len(sys.argv[1]))");
    const e = await errorOf(api.request("POST", `/v1/phases/${p.id}/exec`, { argv: ["python3", script, "b".repeat(131_072)] }));
    expect(e.code).toBe("SBX_ERR_VALIDATION");
    expect(e.message).toMatch(/at most 131071 bytes/);
    const { result } = await api.request<{ result: ExecResult }>("POST", `/v1/phases/${p.id}/exec`, { argv: ["python3", script, "b".repeat(131_071)] });
    expect(result.exitCode).toBe(0);
    expect(result.stdout).toBe("131071\n");
  });
});

describe("a container killed or removed from outside", () => {
  for (const how of ["kill", "remove"] as const) {
    it(`docker ${how}: the phase ends failed with the cause; later execs are refused with no verdict recorded`, async () => {
      const p = await startPhase();
      const c = docker.getContainer(p.containerName);
      if (how === "kill") await c.kill();
      else await c.remove({ force: true });
      const ended = await until("the phase to end", async () => {
        const { phase } = await api.request<{ phase: PhaseView }>("GET", `/v1/phases/${p.id}`);
        return phase.state === "failed" ? phase : null;
      });
      expect(ended.endReason).toMatch(how === "kill" ? /its container stopped \(exited, exit code 137/ : /removed from outside sandboxd/);
      const failed = await until("the end record", async () => (await records()).find((r) => r.phase === p.id && r.type === "phase.failed"));
      expect(failed.reason).toBe(ended.endReason);
      const e = await errorOf(api.request("POST", `/v1/phases/${p.id}/exec`, { argv: ["python3", "-V"] }));
      expect(e.code).toBe("SBX_ERR_PHASE_NOT_RUNNING");
      expect((await records()).filter((r) => r.phase === p.id && r.type === "exec.verdict")).toHaveLength(0);
      const stop = await cli(["phase", "stop", p.id], { socket });
      expect(stop.code).toBe(1);
      expect(stop.stderr).toMatch(/already failed/);
      expect((await records()).filter((r) => r.phase === p.id && (r.type === "phase.complete" || r.type === "phase.failed"))).toHaveLength(1);
    }, 60_000);
  }
});

describe("exit codes", () => {
  it("126 for a string the shell parser refuses, 2 with a hint for a timeout over 5 minutes, the reason on stderr for a missing compose file", async () => {
    const p = await startPhase();
    const parse = await cli(["exec", p.id, "--command", "echo hi > x.txt"], { socket });
    expect(parse.code).toBe(126);
    expect(parse.stderr).toMatch(/SBX_ERR_COMMAND_PARSE/);

    const tooLong = await cli(["exec", p.id, "--timeout", "600", "--", "python3", "-V"], { socket });
    expect(tooLong.code).toBe(2);
    expect(tooLong.stderr).toMatch(/SBX_ERR_TIMEOUT_RANGE/);
    expect(tooLong.stderr).toMatch(/hint: use a timeout within/);

    // whitelisted (SKILLS.md §2), run on the host (src/phases/compose.ts): a project without a compose file says so
    const missing = await cli(["exec", p.id, "--", "docker-compose", "ps"], { socket });
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/^sandboxd: the project has no compose file/m);
  });
});

describe("idle connections", () => {
  it("a connection that never sends a request is closed; a silent follow that did send one is not", async () => {
    const net = await import("node:net");
    const idle = net.connect(socket);
    const closedAt = new Promise<number>((r) => idle.on("close", () => r(Date.now())));
    idle.on("error", () => undefined);
    const t0 = Date.now();
    // a follow of the audit trail, quiet for longer than the idle limit
    const follow = http.request({ socketPath: socket, method: "GET", path: "/v1/audit?follow=1&last=1" });
    follow.end();
    const res = await new Promise<http.IncomingMessage>((r) => follow.on("response", r));
    let got = "";
    res.on("data", (c: Buffer) => (got += c.toString()));
    const closed = await closedAt;
    expect(closed - t0).toBeGreaterThan(8_000);
    expect(closed - t0).toBeLessThan(20_000);
    expect(res.destroyed).toBe(false);
    // still live: a new record reaches it
    const before = got.length;
    const p = await startPhase();
    await until("the follow to see the new phase", async () => got.length > before && got.includes(p.id));
    res.destroy();
  }, 60_000);

  it("many requests over one kept-alive connection leave no listener behind on it (a harness that keeps its connection)", async () => {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const sockets = new Set<unknown>();
    try {
      for (let i = 0; i < 40; i++) {
        const status = await new Promise<number>((resolve, reject) => {
          const req = http.request({ socketPath: socket, method: "GET", path: "/v1/health", agent }, (res) => {
            res.resume();
            res.on("end", () => resolve(res.statusCode ?? 0));
          });
          req.on("socket", (s) => sockets.add(s));
          req.on("error", reject);
          req.end();
        });
        expect(status).toBe(200);
      }
    } finally {
      agent.destroy();
    }
    expect(sockets.size).toBe(1);
    // each request used to add a close listener to the connection, kept until it closed
    expect(daemon.output()).not.toMatch(/MaxListenersExceededWarning/);
  });

  it("a request whose body trickles in is cut; the daemon records no exec for it and answers the next client", async () => {
    const net = await import("node:net");
    const p = await startPhase();
    const slow = net.connect(socket);
    slow.on("error", () => undefined);
    const t0 = Date.now();
    const closedAt = new Promise<number>((r) => slow.on("close", () => r(Date.now())));
    slow.write(
      `POST /v1/phases/${p.id}/exec HTTP/1.1\r\nHost: sandboxd\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"argv":["python3"`,
    );
    const drip = setInterval(() => slow.write(" "), 1_000);
    const closed = await closedAt;
    clearInterval(drip);
    expect(closed - t0).toBeGreaterThan(8_000);
    expect(closed - t0).toBeLessThan(20_000);
    const r = await cli(["exec", p.id, "--", "python3", "--version"], { socket });
    expect(r.code).toBe(0);
    const verdicts = (await readFile(path.join(stateDir, "audit.jsonl"), "utf8"))
      .split("\n")
      .filter((l) => l.includes('"exec.verdict"') && l.includes(p.id));
    expect(verdicts).toHaveLength(1); // the CLI's, not the cut request's
  }, 60_000);
});

describe("kill -9 during phase start", () => {
  it("the restarted daemon (0.7 s later, the dead one not yet reaped) takes the audit lock and ends the half-started phase, recorded", async () => {
    const dir = await tempDir("kill9");
    const sock = path.join(dir, "s.sock");
    try {
      // the daemon's parent never reaps it (sh exec'd into sleep): after kill -9 it stays a zombie holding its pid
      // the key the restarted daemon (spawnDaemon) signs with: a daemon refuses an anchor signed by another key
      const env = { ...process.env, SANDBOXD_LOG_LEVEL: "info", SANDBOXD_AUDIT_KEY: testAuditKey(dir) };
      const sh = spawn("sh", ["-c", `"${process.execPath}" "${CLI}" --socket "${sock}" start --state-dir "${dir}" >"${dir}/d1.log" 2>&1 & echo $!; exec sleep 120`], {
        stdio: ["ignore", "pipe", "ignore"],
        env,
      });
      const pid = Number((await new Promise<Buffer>((r) => sh.stdout!.once("data", r))).toString().trim());
      const a = new ApiClient(sock);
      await until("the first daemon", () => a.request("GET", "/v1/health").then(() => true, () => false), 60_000);
      const project = await makeProject();
      projects.push(project);
      const starting = a.request("POST", "/v1/phases", { project, phase: "k9", mode: "backtest" }).catch((e: unknown) => e);
      // kill as soon as the container exists, while the phase is still starting
      await until("the phase's container", async () => (await containersOf(dir)).length > 0, 30_000);
      process.kill(pid, "SIGKILL");
      await starting;
      await new Promise((r) => setTimeout(r, 700));
      const second = await spawnDaemon(dir, sock);
      try {
        const { phases } = await new ApiClient(sock).request<{ phases: PhaseView[] }>("GET", "/v1/phases");
        expect(phases).toHaveLength(1);
        const p = phases[0]!;
        if (p.state === "failed") expect(p.endReason).toMatch(/while the phase was starting|container/);
        else expect(p.state).toBe("running"); // the start had completed before the kill: re-adopted
        const recs = await readFile(path.join(dir, "audit.jsonl"), "utf8");
        if (p.state === "failed") expect(recs).toMatch(/"type":"phase.failed"/);
        if (p.state === "failed") expect(await containersOf(dir)).toHaveLength(0);
      } finally {
        second.child.kill("SIGTERM");
        await waitExit(second.child);
        sh.kill("SIGKILL");
      }
    } finally {
      for (const c of await containersOf(dir).catch(() => [])) await docker.getContainer(c.Id).remove({ force: true });
      await removeDir(dir);
    }
  }, 180_000);
});

describe("shutdown", () => {
  it("SIGTERM ends a phase whose streaming reader left, and the daemon exits", async () => {
    const p = await startPhase();
    const emit = await writeScript(p.project, "import sys\nfor i in range(2_000_000):\n    sys.stdout.write('y' * 90 + '\\n')");
    // a reader that stops reading but keeps its end open: the stream stays paused
    const stuck = spawn(process.execPath, [CLI, "--socket", socket, "exec", p.id, "--", "python3", emit], { stdio: ["ignore", "pipe", "ignore"] });
    stuck.stdout!.once("data", () => stuck.stdout!.pause());
    await until("output to flow", async () => (await records()).some((r) => r.phase === p.id && r.type === "exec.verdict"));
    await new Promise((r) => setTimeout(r, 1_000));
    const t = Date.now();
    daemon.child.kill("SIGTERM");
    expect(await waitExit(daemon.child, 60_000)).toBe(0);
    expect(Date.now() - t).toBeLessThan(30_000);
    stuck.kill("SIGKILL");
    expect(await containersOf(stateDir)).toHaveLength(0);
  }, 120_000);
});

function bytes256(): number[] {
  return Array.from({ length: 256 }, (_, i) => i);
}
