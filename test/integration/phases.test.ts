/**
 * Phases and mediated exec against the real engine and the real sandbox image,
 * driven through the real unix socket. Security properties are checked by
 * attempting the attack from inside the sandbox.
 */
import { chown, mkdtemp, readFile, readdir, stat, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import {
  OWNER,
  containersOf,
  docker,
  makeProject,
  removeDir,
  tempDir as tempDirFor,
  writeScript,
  requireEngineAndImage,
  startTestDaemon,
  type TestDaemon,
} from "../helpers/sandbox.js";
import { cgroup2Root, commandCgroupDir } from "../../src/runtime/docker.js";
import { projectKey } from "../../src/workspace/packages.js";

let t: TestDaemon;
let project: string;
let phase: PhaseView;

async function exec(argv: string[], extra: { timeoutMs?: number; phaseId?: string } = {}): Promise<ExecResult> {
  const { result } = await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${extra.phaseId ?? phase.id}/exec`, {
    argv,
    ...(extra.timeoutMs ? { timeoutMs: extra.timeoutMs } : {}),
  });
  return result;
}

/** Runs Python code as the agent would: a script in the project, then `python3 <script>`. */
async function py(code: string, extra: { timeoutMs?: number; phaseId?: string; project?: string } = {}): Promise<ExecResult> {
  const script = await writeScript(extra.project ?? project, code);
  return exec(["python3", script], extra);
}

/** The container's processes as Docker sees them (from outside the sandbox). */
async function processes(): Promise<string[]> {
  const top = (await docker.getContainer(phase.containerName).top({ ps_args: "-eo pid,args" })) as { Processes: string[][] };
  return top.Processes.map((p) => p.join(" "));
}

async function expectCode(p: Promise<unknown>, code: string, status?: number): Promise<SandboxdError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(SandboxdError);
  const e = err as SandboxdError;
  expect(e.code).toBe(code);
  if (status) expect(e.status).toBe(status);
  expect(e.hint.length).toBeGreaterThan(10);
  return e;
}

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
  project = await makeProject();
  ({ phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "2.3", mode: "backtest" }));
});

afterAll(async () => {
  await t?.close();
  if (project) await removeDir(project);
});

describe("phase lifecycle", () => {
  it("starts a running phase whose commands run as the project owner", async () => {
    expect(phase.state).toBe("running");
    expect(phase.id).toMatch(/^ph_[0-9a-f]{12}$/);
    expect(phase.uid).toBe(OWNER.uid);
    const r = await py("import os; print(os.getuid(), os.getgid(), os.getgroups(), os.getcwd())");
    expect(r.exitCode).toBe(0);
    expect(r.stdout.trim()).toBe(`${OWNER.uid} ${OWNER.gid} [] /workspace`);
    const listed = await t.api.request<{ phases: PhaseView[] }>("GET", "/v1/phases");
    expect(listed.phases.map((p) => p.id)).toContain(phase.id);
  });

  it("labels and hardens the container (as Docker reports it)", async () => {
    const info = await docker.getContainer(phase.containerName).inspect();
    const hc = info.HostConfig;
    expect(info.Config.Labels["sandboxd.phase"]).toBe(phase.id);
    expect(info.Config.Labels["sandboxd.instance"]).toMatch(/^[0-9a-f]{16}$/);
    expect(hc.NetworkMode).toBe("none");
    expect(hc.CapDrop).toEqual(["ALL"]);
    expect([...(hc.CapAdd ?? [])].sort()).toEqual(["DAC_READ_SEARCH", "KILL", "SETGID", "SETUID"]);
    expect(hc.SecurityOpt).toContain("no-new-privileges");
    expect(hc.ReadonlyRootfs).toBe(true);
    expect(hc.Privileged).toBe(false);
    expect(hc.Memory).toBe(2048 * 1024 * 1024);
    expect(hc.NanoCpus).toBe(1e9);
    expect(hc.PidsLimit).toBe(256);
    // a wide safety cap: the 10 MB rule is judged per iteration (test/integration/workspace.test.ts)
    expect(hc.Ulimits).toEqual([{ Name: "fsize", Soft: 2048 * 1024 * 1024, Hard: 2048 * 1024 * 1024 }]);
    // Only the phase's view of the project (src/workspace/layer.ts: the overlay and the read-only
    // protected paths reach it by propagation), its run dir, its hosts file, its own cgroup v2
    // directory (per-command cgroups, src/shim/cgroups.ts) come from the host; no Docker socket.
    const sources = info.Mounts.filter((m) => m.Type === "bind").map((m) => m.Source).sort();
    const runDir = path.join(t.stateDir, "phases", phase.id, "run");
    const view = path.join(t.stateDir, "phases", phase.id, "ws", "view");
    const cgroupDir = commandCgroupDir((await cgroup2Root())!, phase.containerName);
    // and the project's package disk (src/workspace/packages.ts), its own, read-write
    const packages = path.join(t.stateDir, "projects", projectKey(phase.project), "packages");
    expect(sources).toEqual([view, runDir, path.join(runDir, "hosts"), cgroupDir, packages].sort());
    expect(info.Mounts.find((m) => m.Source === packages)).toMatchObject({ Destination: "/opt/sandboxd-packages", RW: true });
    expect(info.Mounts.find((m) => m.Source === cgroupDir)).toMatchObject({ Destination: "/run/sandboxd-cgroup", RW: true });
    expect(info.Mounts.find((m) => m.Source === view)).toMatchObject({ Destination: "/workspace", RW: true, Propagation: "rslave" });
    expect(info.Mounts.find((m) => m.Source === path.join(runDir, "hosts"))).toMatchObject({ Destination: "/etc/hosts", RW: false });
    expect(JSON.stringify(info.Mounts)).not.toContain("docker.sock");
    // no network endpoint at all (Docker lists none, or only "none")
    expect(Object.keys(info.NetworkSettings.Networks ?? {}).filter((n) => n !== "none")).toEqual([]);
  });

  it("streams NDJSON output and an exit event", async () => {
    const res = await t.api.stream("POST", `/v1/phases/${phase.id}/exec?stream=1`, {
      argv: ["python3", await writeScript(project, "import sys; print('out1'); print('err1', file=sys.stderr); print('out2')")],
    });
    let body = "";
    for await (const c of res) body += (c as Buffer).toString();
    const events = body.trim().split("\n").map((l) => JSON.parse(l) as { type: string; data?: string; result?: ExecResult });
    const out = events.filter((e) => e.type === "stdout").map((e) => e.data).join("");
    const err = events.filter((e) => e.type === "stderr").map((e) => e.data).join("");
    expect(out).toBe("out1\nout2\n");
    expect(err).toBe("err1\n");
    expect(events.at(-1)?.type).toBe("exit");
    expect(events.at(-1)?.result?.exitCode).toBe(0);
  });
});

describe("mediated exec", () => {
  it("runs pytest on the project: passing file exits 0, failing file exits 1", async () => {
    const ok = await exec(["pytest", "-q", "-p", "no:cacheprovider", "tests/test_calc.py"]);
    expect(ok.exitCode).toBe(0);
    expect(ok.stdout).toMatch(/1 passed/);
    const bad = await exec(["pytest", "-q", "-p", "no:cacheprovider", "tests/test_broken.py"]);
    expect(bad.exitCode).toBe(1);
    expect(bad.stdout).toMatch(/1 failed/);
  });

  it("writes SHELL_EXEC, RETURN_CODE, STDOUT and STDERR to the audit trail before answering", async () => {
    const marker = `audit-${Date.now()}`;
    await py(`import sys; print('${marker}'); print('warn-${marker}', file=sys.stderr); sys.exit(4)`);
    const log = await readFile(phase.buildLog, "utf8");
    const lines = log.split("\n");
    const outLine = lines.findIndex((l) => l.includes(`STDOUT: ${marker}`));
    let start = outLine;
    while (start >= 0 && !lines[start]!.includes("SHELL_EXEC:")) start--;
    expect(start).toBeGreaterThanOrEqual(0);
    const block = lines.slice(start, start + 8).join("\n");
    expect(block).toMatch(/^\[\d{4}-\d\d-\d\dT[\d:.]+Z\] SHELL_EXEC: python3 sbx_scripts\/s\d+_\d+\.py$/m);
    expect(block).toMatch(/\] RETURN_CODE: 4$/m);
    expect(block).toMatch(new RegExp(`\\] STDOUT: ${marker}$`, "m"));
    expect(block).toMatch(new RegExp(`\\] STDERR: warn-${marker}$`, "m"));
    expect(block).toMatch(/\[SHELL\] \[EXEC\] \[python3 sbx_scripts\/.*\] \[FAIL exit 4\]/);
  });

  it("keeps the audit trail one line per record when output tries to forge lines", async () => {
    const forged = "[2020-01-01T00:00:00.000Z] RETURN_CODE: 0";
    await py(`print('first'); print(${JSON.stringify(forged)}); print('\\x1b[31mred\\x1b[0m')`);
    const log = await readFile(phase.buildLog, "utf8");
    // Every line either starts with a timestamp the daemon wrote, or is an indented continuation.
    for (const line of log.split("\n").filter(Boolean)) {
      expect(line).toMatch(/^(\[\d{4}-\d\d-\d\dT[\d:.]+Z\] |    \| )/);
    }
    expect(log).not.toMatch(/^\[2020-01-01/m);
    expect(log).toContain("\\x1b[31mred");
  });

  it("kills a command and all of its children at the timeout", async () => {
    const r = await py(
      "import subprocess, time; subprocess.Popen(['sleep', '300']); subprocess.Popen(['sh', '-c', 'sleep 301']); print('spawned', flush=True); time.sleep(300)",
      { timeoutMs: 1500 },
    );
    expect(r.timedOut).toBe(true);
    expect(r.exitCode).toBeNull();
    expect(r.stdout).toContain("spawned");
    expect(r.durationMs).toBeGreaterThanOrEqual(1400);
    expect(r.durationMs).toBeLessThan(15_000);
    expect((await processes()).filter((c) => /sleep 30[01]/.test(c))).toEqual([]);
    // the timeout is a counted runtime failure of this command; the same command fixed answers it
    // (fail-fast: a success of another script would not), so the phase's later tests start at zero
    expect(r.failure).toMatchObject({ category: "runtime", counted: true });
    const script = r.argv![1]!;
    await writeFile(path.join(project, script), "print('ok')\n");
    expect((await exec(["python3", script])).exitCode).toBe(0);
  });

  it("leaves no background process behind once a command exits", async () => {
    const p = await py("import subprocess; subprocess.Popen(['sleep', '302'], start_new_session=False); print('bg')");
    expect(p.exitCode).toBe(0);
    expect((await processes()).filter((c) => c.includes("sleep 302"))).toEqual([]);
  });

  it("caps the output it keeps and reports the truncation, while counting every byte", async () => {
    const r = await py("import sys; sys.stdout.write('x' * 5_000_000)");
    expect(r.exitCode).toBe(0);
    expect(r.stdoutBytes).toBe(5_000_000);
    expect(r.stdoutTruncated).toBe(true);
    // the first and last outputCapBytes/2, the bytes between counted and marked
    expect(r.stdoutOmitted).toBe(5_000_000 - r.outputCapBytes);
    expect(r.stdout).toBe(`${"x".repeat(r.outputCapBytes / 2)}\n[… ${r.stdoutOmitted} bytes not kept …]\n${"x".repeat(r.outputCapBytes / 2)}`);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/STDOUT: x+\n {4}~ \[\d+ bytes not kept\]\n {4}\| x+\n/);
  });

  it("streams every byte of a large output", async () => {
    const res = await t.api.stream("POST", `/v1/phases/${phase.id}/exec?stream=1`, {
      argv: ["python3", await writeScript(project, "import sys\nfor i in range(200000): sys.stdout.write('%08d\\n' % i)")],
    });
    let buf = "";
    let stdout = "";
    let exit: ExecResult | undefined;
    for await (const c of res) {
      buf += (c as Buffer).toString();
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const ev = JSON.parse(buf.slice(0, nl)) as { type: string; data?: string; result?: ExecResult };
        buf = buf.slice(nl + 1);
        if (ev.type === "stdout") stdout += ev.data;
        if (ev.type === "exit") exit = ev.result;
      }
    }
    expect(exit?.exitCode).toBe(0);
    expect(stdout.length).toBe(200000 * 9);
    expect(stdout.endsWith("00199999\n")).toBe(true);
  });

  it("runs docker-compose on the host: a project without a compose file gets exit 1 and the reason", async () => {
    // whitelisted, run by the daemon (src/phases/compose.ts; test/integration/compose.test.ts)
    const r = await exec(["docker-compose", "ps"]);
    expect(r.exitCode).toBe(1);
    expect(r.stderr).toMatch(/the project has no compose file/);
  });

  it("runs execs in two phases at once", async () => {
    const other = await makeProject();
    const { phase: p2 } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", {
      project: other,
      phase: "2.4",
      mode: "test",
    });
    try {
      const code = (tag: string) => `import time; time.sleep(1.0); print("${tag}", open("services/calc.py").read().count("def"))`;
      const [a, b] = await Promise.all([py(code("tagA")), py(code("tagB"), { phaseId: p2.id, project: other })]);
      expect(a.stdout.trim()).toBe("tagA 1");
      expect(b.stdout.trim()).toBe("tagB 1");
      const logB = await readFile(p2.buildLog, "utf8");
      expect(logB).toContain("tagB");
      expect(logB).not.toContain("tagA");
    } finally {
      await t.api.request("DELETE", `/v1/phases/${p2.id}`);
      await removeDir(other);
    }
  });
});

describe("policy (minimal whitelist)", () => {
  it("refuses a non-whitelisted command without running it", async () => {
    const marker = path.join(project, "should-not-exist");
    const e = await expectCode(exec(["touch", "/workspace/should-not-exist"]), "SBX_ERR_POLICY_NEEDS_APPROVAL", 403);
    expect(e.message).toContain("shell.not-whitelisted");
    await expect(stat(marker)).rejects.toThrow();
  });

  it("forbids sudo and recursive rm, naming the rule and the SKILLS.md clause", async () => {
    const e = await expectCode(exec(["sudo", "id"]), "SBX_ERR_POLICY_DENIED", 403);
    expect(e.message).toMatch(/shell\.forbidden\.privilege.*SKILLS\.md §2/);
    await expectCode(exec(["rm", "-rf", "/workspace"]), "SBX_ERR_POLICY_DENIED", 403);
    expect((await stat(path.join(project, "services", "calc.py"))).isFile()).toBe(true);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/\[SHELL\] \[POLICY\] \[sudo id\] \[FORBID shell\.forbidden\.privilege/);
  });
});

describe("human approvals", () => {
  it("an asked command runs only after approval, and only once", async () => {
    const marker = path.join(project, "approved-marker");
    const argv = ["touch", "/workspace/approved-marker"];
    const first = await expectCode(exec(argv), "SBX_ERR_POLICY_NEEDS_APPROVAL", 403);
    const approvalId = (first.details as { approvalId: string }).approvalId;
    expect(approvalId).toMatch(/^ap_[0-9a-f]{12}$/);
    expect(first.hint).toContain(`sandboxd approvals approve ${approvalId}`);
    // asking again while pending gives the same request, and still nothing runs
    const again = await expectCode(exec(argv), "SBX_ERR_POLICY_NEEDS_APPROVAL", 403);
    expect((again.details as { approvalId: string }).approvalId).toBe(approvalId);
    await expect(stat(marker)).rejects.toThrow();
    const pending = await t.api.request<{ approvals: Array<{ id: string; state: string }> }>("GET", "/v1/approvals");
    expect(pending.approvals.find((a) => a.id === approvalId)?.state).toBe("pending");

    // approving a different command's request does not unlock this one
    const other = await expectCode(exec(["touch", "/workspace/other-marker"]), "SBX_ERR_POLICY_NEEDS_APPROVAL");
    await t.api.request("POST", `/v1/approvals/${(other.details as { approvalId: string }).approvalId}/deny`, { note: "no" });

    const { approval } = await t.api.request<{ approval: { state: string } }>("POST", `/v1/approvals/${approvalId}/approve`, {
      note: "ok for this test",
    });
    expect(approval.state).toBe("approved");
    await expectCode(t.api.request("POST", `/v1/approvals/${approvalId}/deny`, {}), "SBX_ERR_APPROVAL_DECIDED", 409);

    const ran = await exec(argv);
    expect(ran.exitCode).toBe(0);
    // the write reaches the project with the iteration (docs/WORKSPACE.md)
    await t.api.request("POST", `/v1/phases/${phase.id}/checkpoint`, { message: "approved marker" });
    expect((await stat(marker)).isFile()).toBe(true);
    await expect(stat(path.join(project, "other-marker"))).rejects.toThrow();

    // used: the next identical exec needs a new approval
    const third = await expectCode(exec(argv), "SBX_ERR_POLICY_NEEDS_APPROVAL", 403);
    expect((third.details as { approvalId: string }).approvalId).not.toBe(approvalId);
    const all = await t.api.request<{ approvals: Array<{ id: string; state: string }> }>("GET", "/v1/approvals?all=1");
    expect(all.approvals.find((a) => a.id === approvalId)?.state).toBe("used");

    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(new RegExp(`\\[APPROVAL\\] \\[REQUEST\\] \\[touch /workspace/approved-marker\\] \\[${approvalId} pending`));
    expect(log).toMatch(new RegExp(`\\[APPROVAL\\] \\[APPROVE\\] .*\\[${approvalId} by operator: ok for this test\\]`));
    expect(log).toMatch(new RegExp(`\\[SHELL\\] \\[POLICY\\] \\[touch /workspace/approved-marker\\] \\[ALLOW shell\\.not-whitelisted .*approval=${approvalId}`));
  });

  it("rejects unknown approval ids with a coded error", async () => {
    await expectCode(t.api.request("POST", "/v1/approvals/ap_000000000000/approve", {}), "SBX_ERR_APPROVAL_NOT_FOUND", 404);
    await expectCode(t.api.request("POST", "/v1/approvals/nope/approve", {}), "SBX_ERR_VALIDATION", 400);
  });
});

describe("attacks from inside the sandbox", () => {
  it("cannot write the image's filesystem", async () => {
    const r = await py("open('/usr/pwned', 'w').write('x')");
    expect(r.exitCode).not.toBe(0);
    expect(r.stderr).toMatch(/Read-only file system/);
  });

  it("has no network but loopback: outside hosts and the Docker bridge are unreachable", async () => {
    const r = await py(
      [
        "import socket",
        "res = []",
        "for host in ['1.1.1.1', '172.17.0.1', '10.0.0.1']:",
        "    s = socket.socket(); s.settimeout(3)",
        "    try: s.connect((host, 53)); res.append('connected ' + host)",
        "    except OSError as e: res.append(type(e).__name__ + ':' + str(e.errno))",
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
        "try: u.sendto(b'x', ('1.1.1.1', 53)); res.append('udp sent')",
        "except OSError as e: res.append('udp:' + str(e.errno))",
        "print(res)",
        "import subprocess; print(open('/proc/net/dev').read())",
      ].join("\n"),
    );
    expect(r.exitCode).toBe(0);
    expect(r.stdout).not.toContain("connected");
    // TCP: refused at once (redirected to a port nothing can listen on, and recorded:
    // test/integration/network-confine.test.ts); UDP: no route at all
    expect(r.stdout).toMatch(/ConnectionRefusedError:111.*ConnectionRefusedError:111.*ConnectionRefusedError:111.*udp:101/);
    const ifaces = r.stdout
      .split("\n")
      .filter((l) => l.includes(":") && !l.includes("|") && !l.startsWith("["))
      .map((l) => l.split(":")[0]!.trim());
    expect(ifaces).toEqual(["lo"]);
  });

  it("cannot become root or keep any capability", async () => {
    const r = await py(
      [
        "import os",
        "try: os.setuid(0); print('became root')",
        "except PermissionError: print('setuid refused')",
        "print([l for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'NoNewPrivs'))])",
      ].join("\n"),
    );
    expect(r.stdout).toContain("setuid refused");
    expect(r.stdout).toContain("CapEff:\\t0000000000000000");
    expect(r.stdout).toContain("CapPrm:\\t0000000000000000");
    expect(r.stdout).toContain("NoNewPrivs:\\t1");
  });

  it("cannot reach the shim's control socket or read the shim's secret", async () => {
    const r = await py(
      [
        "import socket, os",
        "s = socket.socket(socket.AF_UNIX)",
        "try: s.connect('/run/sandboxd/control.sock'); print('connected')",
        "except OSError as e: print('socket', type(e).__name__)",
        "for p in os.listdir('/proc'):",
        "    if p.isdigit():",
        "        try: env = open('/proc/%s/environ' % p, 'rb').read()",
        "        except OSError: continue",
        "        if b'SANDBOXD_SHIM_TOKEN' in env: print('token visible in', p)",
        "print('env', 'SANDBOXD_SHIM_TOKEN' in os.environ)",
      ].join("\n"),
    );
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toContain("socket PermissionError");
    expect(r.stdout).not.toContain("connected");
    expect(r.stdout).not.toContain("token visible");
    expect(r.stdout).toContain("env False");
  });

  it("writes files over 10 MB outside the project (a wheel, a cache): the 10 MB rule is the checkpoint's, not a process limit", async () => {
    const r = await py("f = open('/tmp/big.bin', 'wb')\nf.write(b'0' * (11 * 1024 * 1024))\nf.close()\nprint('ok')");
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toBe("ok\n");
  });

  it("cannot change, truncate, replace or delete its audit trail", async () => {
    const before = await readFile(phase.buildLog, "utf8");
    const r = await py(
      [
        "import os",
        "p = '/workspace/build_audit.log'",
        "print('readable', len(open(p).read()) > 0)",
        "for name, f in [('append', lambda: open(p, 'a').write('[2020-01-01T00:00:00.000Z] forged\\n')),",
        "                ('truncate', lambda: open(p, 'w')),",
        "                ('rename', lambda: os.rename(p, '/workspace/moved.log')),",
        "                ('unlink', lambda: os.unlink(p)),",
        "                ('chmod', lambda: os.chmod(p, 0o777))]:",
        "    try: f(); print(name, 'succeeded')",
        "    except OSError as e: print(name, 'refused', e.errno)",
      ].join("\n"),
    );
    expect(r.stdout).toContain("readable True");
    expect(r.stdout).not.toContain("succeeded");
    expect(r.stdout.match(/refused/g)?.length).toBe(5);
    const after = await readFile(phase.buildLog, "utf8");
    expect(after.startsWith(before)).toBe(true);
    expect(after).not.toMatch(/^\[2020-01-01T00:00:00\.000Z\] forged/m);
    expect((await stat(phase.buildLog)).uid).toBe(0);
  });

  it("creates files owned by the project owner, not root", async () => {
    const r = await py("open('/workspace/owned.txt', 'w').write('x')");
    expect(r.exitCode).toBe(0);
    await t.api.request("POST", `/v1/phases/${phase.id}/checkpoint`, { message: "owned" });
    const s = await stat(path.join(project, "owned.txt"));
    expect([s.uid, s.gid]).toEqual([OWNER.uid, OWNER.gid]);
  });
});

describe("bad input leaves nothing behind", () => {
  async function snapshot() {
    const containers = (await containersOf(t.stateDir)).length;
    const phases = (await readdir(path.join(t.stateDir, "phases"))).length;
    return { containers, phases };
  }

  async function raw(method: string, url: string, body: string, contentType = "application/json") {
    const http = await import("node:http");
    return new Promise<{ status: number; json: { error: { code: string; message: string; hint: string } } }>((resolve, reject) => {
      const req = http.request({ socketPath: t.socket, method, path: url, headers: { "content-type": contentType } }, (res) => {
        let text = "";
        res.on("data", (c: Buffer) => (text += c.toString()));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(text) }));
      });
      req.on("error", reject);
      req.end(body);
    });
  }

  it("answers each with a 4xx coded error and creates no container or state", async () => {
    const before = await snapshot();
    const rootOwned = await mkdtemp(path.join(os.tmpdir(), "sbx-rootproj-"));
    const notDir = path.join(project, "services", "calc.py");
    const cases: Array<[Promise<{ status: number; json: { error: { code: string; hint: string } } }>, number, string]> = [
      [raw("POST", "/v1/phases", "{not json"), 400, "SBX_ERR_BAD_JSON"],
      [raw("POST", "/v1/phases", JSON.stringify({ project, phase: "x", mode: "backtest", extra: 1 })), 400, "SBX_ERR_VALIDATION"],
      [raw("POST", "/v1/phases", JSON.stringify({ project, phase: "x", mode: "live" })), 400, "SBX_ERR_VALIDATION"],
      [raw("POST", "/v1/phases", JSON.stringify({ project: "/nonexistent/p", phase: "x", mode: "test" })), 400, "SBX_ERR_PROJECT_NOT_FOUND"],
      [raw("POST", "/v1/phases", JSON.stringify({ project: notDir, phase: "x", mode: "test" })), 400, "SBX_ERR_PROJECT_NOT_DIR"],
      [raw("POST", "/v1/phases", JSON.stringify({ project: "relative/path", phase: "x", mode: "test" })), 400, "SBX_ERR_VALIDATION"],
      [raw("POST", "/v1/phases", JSON.stringify({ project: rootOwned, phase: "x", mode: "test" })), 400, "SBX_ERR_PROJECT_ROOT_OWNED"],
      [raw("GET", "/v1/phases/ph_000000000000", ""), 404, "SBX_ERR_PHASE_NOT_FOUND"],
      [raw("GET", "/v1/phases/not-an-id", ""), 400, "SBX_ERR_VALIDATION"],
      [raw("POST", `/v1/phases/${phase.id}/exec`, JSON.stringify({ argv: [] })), 400, "SBX_ERR_VALIDATION"],
      [raw("POST", `/v1/phases/${phase.id}/exec`, JSON.stringify({ argv: [""] })), 400, "SBX_ERR_VALIDATION"],
      [raw("POST", `/v1/phases/${phase.id}/exec`, JSON.stringify({ argv: ["pytest"], timeoutMs: 10_000_000 })), 400, "SBX_ERR_TIMEOUT_RANGE"],
      [raw("POST", `/v1/phases/${phase.id}/exec`, JSON.stringify({ argv: ["pytest"], timeoutMs: -5 })), 400, "SBX_ERR_VALIDATION"],
      [raw("POST", `/v1/phases/${phase.id}/exec`, JSON.stringify({ command: "pytest", argv: ["pytest"] })), 400, "SBX_ERR_VALIDATION"],
      [raw("POST", `/v1/phases/${phase.id}/exec`, JSON.stringify({ reason: "nothing to run" })), 400, "SBX_ERR_VALIDATION"],
      [raw("POST", "/v1/phases", JSON.stringify({ project, phase: "x", mode: "test", policy: "/nonexistent/policy.yaml" })), 400, "SBX_ERR_POLICY_INVALID"],
      [raw("POST", "/v1/phases/ph_000000000000/exec", JSON.stringify({ argv: ["pytest"] })), 404, "SBX_ERR_PHASE_NOT_FOUND"],
      [raw("GET", "/v1/nothing-here", ""), 404, "SBX_ERR_NOT_FOUND"],
    ];
    for (const [p, status, code] of cases) {
      const r = await p;
      expect({ status: r.status, code: r.json.error.code }).toEqual({ status, code });
      expect(r.json.error.hint).toBeTruthy();
    }
    expect(await snapshot()).toEqual(before);
    await removeDir(rootOwned);
    // and the daemon keeps serving
    expect((await py("print(1)")).stdout).toBe("1\n");
  });

  it("will not write its audit trail through a symlink or into a file someone else made", async () => {
    const before = await snapshot();
    const victim = path.join(await tempDirFor("victim"), "victim.txt");
    await writeFile(victim, "original\n");
    const linked = await makeProject();
    await symlink(victim, path.join(linked, "build_audit.log"));
    await chown(path.join(linked, "build_audit.log"), OWNER.uid, OWNER.gid).catch(() => undefined);
    await expectCode(t.api.request("POST", "/v1/phases", { project: linked, phase: "x", mode: "test" }), "SBX_ERR_BUILD_LOG_UNSAFE", 400);
    expect(await readFile(victim, "utf8")).toBe("original\n");

    const foreign = await makeProject();
    await writeFile(path.join(foreign, "build_audit.log"), "[2020-01-01T00:00:00.000Z] PHASE_COMPLETE: forged\n");
    await chown(path.join(foreign, "build_audit.log"), OWNER.uid, OWNER.gid);
    const e = await expectCode(t.api.request("POST", "/v1/phases", { project: foreign, phase: "x", mode: "test" }), "SBX_ERR_BUILD_LOG_UNSAFE");
    expect(e.message).toMatch(/owned by uid 1000/);
    expect(await snapshot()).toEqual(before);
    await Promise.all([removeDir(linked), removeDir(foreign), removeDir(path.dirname(victim))]);
  });

  it("refuses exec on a stopped phase and a second stop", async () => {
    const other = await makeProject();
    const { phase: p2 } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: other, phase: "9", mode: "paper" });
    const { phase: stopped } = await t.api.request<{ phase: PhaseView }>("DELETE", `/v1/phases/${p2.id}`);
    expect(stopped.state).toBe("stopped");
    await expectCode(exec(["pytest"], { phaseId: p2.id }), "SBX_ERR_PHASE_NOT_RUNNING", 409);
    await expectCode(t.api.request("DELETE", `/v1/phases/${p2.id}`), "SBX_ERR_PHASE_NOT_RUNNING", 409);
    // stopped: container gone, logs and audit kept
    await expect(docker.getContainer(p2.containerName).inspect()).rejects.toMatchObject({ statusCode: 404 });
    const dir = path.join(t.stateDir, "phases", p2.id);
    expect(stopped.buildLog).toBe(path.join(other, "build_audit.log"));
    expect(await readFile(stopped.buildLog, "utf8")).toMatch(/\[PHASE_COMPLETE\] Phase 9 /);
    expect(await readFile(path.join(dir, "container.log"), "utf8")).toMatch(/\S/);
    await removeDir(other);
  });

  it("accepts a paper-mode timeout up to 5 minutes but not beyond", async () => {
    const other = await makeProject();
    const { phase: p2 } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project: other, phase: "p", mode: "paper" });
    try {
      const r = await py("print('feed')", { phaseId: p2.id, project: other, timeoutMs: 300_000 });
      expect(r.exitCode).toBe(0);
      await expectCode(exec(["python3", "-c", "1"], { phaseId: p2.id, timeoutMs: 300_001 }), "SBX_ERR_TIMEOUT_RANGE", 400);
      // over the backtest limit, within the ceiling: a person's call (test/integration/long-timeouts.test.ts)
      await expectCode(exec(["python3", "-c", "1"], { timeoutMs: 60_001 }), "SBX_ERR_POLICY_NEEDS_APPROVAL", 403);
    } finally {
      await t.api.request("DELETE", `/v1/phases/${p2.id}`);
      await removeDir(other);
    }
  });
});

describe("shim channel", () => {
  it("drops a connection with a wrong token and keeps serving the real shim", async () => {
    const net = await import("node:net");
    const { encodeMessage } = await import("../../src/shim/protocol.js");
    const sockPath = path.join(t.stateDir, "phases", phase.id, "run", "control.sock");
    const closed = await new Promise<boolean>((resolve) => {
      const s = net.connect(sockPath, () => {
        s.write(encodeMessage({ type: "hello", protocol: 1, token: "f".repeat(64), pid: 1, node: "x", running: [] }));
      });
      s.on("close", () => resolve(true));
      s.on("error", () => undefined);
      setTimeout(() => resolve(false), 8000);
    });
    expect(closed).toBe(true);
    expect((await py("print('still here')")).stdout).toBe("still here\n");
  });

  it("run dir and socket are private to root", async () => {
    const run = path.join(t.stateDir, "phases", phase.id, "run");
    expect((await stat(run)).mode & 0o777).toBe(0o700);
    expect((await stat(path.join(run, "control.sock"))).mode & 0o777).toBe(0o600);
    expect((await stat(t.socket)).mode & 0o777).toBe(0o600);
    await writeFile(path.join(project, "touched"), "x"); // the project itself stays writable by the host
  });
});
