/**
 * `sandboxd exec`'s native fast path (native/exec) beside the Node CLI it
 * stands in for, against the real daemon and a real sandbox: the same
 * command line through the `sandboxd` command both ways (SANDBOXD_CLI_NODE=1
 * runs it on Node) must give the same stdout bytes, the same stderr and the
 * same exit status — output, exit codes, signals, timeouts, refusals with
 * invisible characters in them, errors, a reader that goes away. Every form
 * the native client does not take is handed to Node before anything is
 * sent: with a `node` on the PATH that only says it was called, the plain
 * forms never call it and the other forms always do.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { chmod, mkdtemp, rm, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Sandboxd } from "sandboxd";
import { runProcess, type ProcessRun } from "../helpers/run-process.js";
import { CLI_COMMAND, CLI_NATIVE, PATH_WITH_THIS_NODE, daemonWithPhase, removeDir, type TestDaemon } from "../helpers/sandbox.js";

let d: TestDaemon;
let project: string;
let phaseId: string;
let stubDir: string;
let scripts: Record<string, string> = {};

const CODE = {
  // its arguments back as JSON, a line on stderr
  args: "import json, sys\nprint(json.dumps(sys.argv[1:]))\nsys.stderr.write('to stderr\\n')",
  // the exit status it is given
  status: "import sys\nprint('exiting', sys.argv[1])\nsys.exit(int(sys.argv[1]))",
  // killed by its own SIGTERM
  term: "import os, signal\nprint('before', flush=True)\nos.kill(os.getpid(), signal.SIGTERM)",
  slow: "import time\nprint('ready', flush=True)\ntime.sleep(30)",
  // 8 MiB of stdout and 1 MiB of stderr, interleaved, bytes of every value
  big: "import sys\nblock = bytes(range(256)) * 4096\nfor i in range(8):\n    sys.stdout.buffer.write(block)\n    if i % 4 == 0:\n        sys.stderr.buffer.write(block[: 1 << 19])\nsys.stdout.flush()",
  // writes until its reader goes away
  endless: "import sys\nwhile True:\n    sys.stdout.write('y' * 4096)",
};

beforeAll(async () => {
  ({ d, project, phaseId, scripts } = await daemonWithPhase(CODE, "14.1"));
  // a `node` that only says it was called: the native client must not need it for the plain forms
  stubDir = await mkdtemp(path.join(os.tmpdir(), "sbx-node-stub-"));
  await writeFile(path.join(stubDir, "node"), "#!/bin/sh\necho NODE-CALLED >&2\nexit 99\n");
  await chmod(path.join(stubDir, "node"), 0o755);
}, 120_000);

afterAll(async () => {
  await d?.close();
  if (project) await removeDir(project);
  if (stubDir) await rm(stubDir, { recursive: true, force: true });
});

type Run = ProcessRun;
const run = (file: string, args: string[], env: NodeJS.ProcessEnv = {}) => runProcess(file, args, { env });

/** what differs from one run to the next: approval and phase ids, durations */
const normal = (text: string) =>
  text
    .replace(/ap_[0-9a-f]{12}/g, "ap_…")
    .replace(/ph_[0-9a-f]{12}/g, "ph_…")
    .replace(/\(\d+ ms\)/g, "(… ms)");

const fresh = async () => (await new Sandboxd({ socket: d.socket }).startPhase({ project, phase: "14.2", mode: "test" })).id;

/**
 * The same command line natively (node unreachable: a stub on the PATH) and
 * on Node; both results. A command that fails counts toward the phase's
 * fail-fast limit, so `failing` runs each in a phase of its own.
 */
async function both(args: (phase: string) => string[], failing = false): Promise<{ native: Run; node: Run }> {
  const native = await run(CLI_COMMAND, args(failing ? await fresh() : phaseId), { PATH: `${stubDir}:${PATH_WITH_THIS_NODE}` });
  const node = await run(CLI_COMMAND, args(failing ? await fresh() : phaseId), { SANDBOXD_CLI_NODE: "1" });
  return { native, node };
}

function expectSame({ native, node }: { native: Run; node: Run }): void {
  expect(native.stderr).not.toContain("NODE-CALLED");
  expect(native.code).toBe(node.code);
  expect(native.stdout.equals(node.stdout)).toBe(true);
  expect(normal(native.stderr)).toBe(normal(node.stderr));
}

describe("the native exec client beside the Node CLI", () => {
  it("is built (cargo is on this machine; scripts/build-native.mjs builds it with npm run build)", () => {
    expect(existsSync(CLI_NATIVE)).toBe(true);
  });

  it("sends the arguments as given — quotes, backslashes, newlines, tabs, non-ASCII, option-like words", async () => {
    const words = ['a b', '"q"', "back\\slash", "new\nline", "tab\there", "é", "😀", "--not-an-option", "-", '{"json": 1}'];
    const r = await both((p) => ["--socket", d.socket, "exec", p, "--", "python3", scripts.args!, ...words]);
    expectSame(r);
    expect(r.native.code).toBe(0);
    expect(JSON.parse(r.native.stdout.toString("utf8"))).toEqual(words);
    expect(r.native.stderr).toBe("to stderr\n");
  });

  it("exits with the command's code; death by signal is 128+N; a timeout is 124 with its line on stderr", async () => {
    const three = await both((p) => ["--socket", d.socket, "exec", p, "--", "python3", scripts.status!, "3"], true);
    expectSame(three);
    expect(three.native.code).toBe(3);
    const term = await both((p) => ["--socket", d.socket, "exec", p, "--", "python3", scripts.term!], true);
    expectSame(term);
    expect(term.native.code).toBe(143);
    expect(term.native.stdout.toString()).toBe("before\n");
    const slow = await both((p) => ["--socket", d.socket, "exec", p, "--timeout", "1", "--", "python3", scripts.slow!], true);
    expectSame(slow);
    expect(slow.native.code).toBe(124);
    expect(slow.native.stderr).toMatch(/^sandboxd: command killed after its timeout \(\d+ ms\)\n$/);
    const frac = await both((p) => ["--socket", d.socket, "exec", p, "--timeout=1.5", "--", "python3", scripts.slow!], true);
    expectSame(frac);
    expect(frac.native.code).toBe(124);
  }, 90_000);

  it("the failure that escalates the phase says so, and the next command is refused with 75", async () => {
    const twice = async (env: NodeJS.ProcessEnv) => {
      const p = await fresh();
      // two deaths by signal in a row: the runtime category's limit (policies/default.yaml)
      const args = ["--socket", d.socket, "exec", p, "--", "python3", scripts.term!];
      await run(CLI_COMMAND, args, env);
      return { escalating: await run(CLI_COMMAND, args, env), after: await run(CLI_COMMAND, args, env) };
    };
    const native = await twice({ PATH: `${stubDir}:${PATH_WITH_THIS_NODE}` });
    const node = await twice({ SANDBOXD_CLI_NODE: "1" });
    expectSame({ native: native.escalating, node: node.escalating });
    expect(native.escalating.code).toBe(143);
    expect(native.escalating.stderr).toMatch(/^sandboxd: fail-fast: phase escalated \(.+\); report \S+escalation-1\.log\n$/);
    expectSame({ native: native.after, node: node.after });
    expect(native.after.code).toBe(75);
    expect(native.after.stderr).toContain("[SBX_ERR_PHASE_ESCALATED]");
  }, 60_000);

  it("a refusal says the daemon's message and hint with invisible characters escaped, and exits 126", async () => {
    const plain = await both((p) => ["--socket", d.socket, "exec", p, "--", "ls", "/workspace"]);
    expectSame(plain);
    expect(plain.native.code).toBe(126);
    expect(plain.native.stderr).toMatch(/\[SBX_ERR_POLICY_NEEDS_APPROVAL\]\n {2}hint: approval ap_[0-9a-f]{12} is pending/);
    // an escape sequence, a zero-width space, a right-to-left override, a letter and an emoji in the refused command
    const odd = await both((p) => ["--socket", d.socket, "exec", p, "--", "ls", "\x1b[2J", "\u200b", "\u202e", "é", "😀"]);
    expectSame(odd);
    expect(odd.native.code).toBe(126);
    expect(odd.native.stderr).not.toMatch(/[\x1b\u200b\u202e]/);
    expect(odd.native.stderr).toContain("\\x1b[2J");
    expect(odd.native.stderr).toContain("\\u200b");
    expect(odd.native.stderr).toContain("é");
  });

  it("errors the daemon answers before the stream (a phase that does not exist, a malformed id) are said the same", async () => {
    const missing = await both(() => ["--socket", d.socket, "exec", "ph_000000000000", "--", "python3", "x.py"]);
    expectSame(missing);
    expect(missing.native.code).not.toBe(0);
    const bad = await both(() => ["--socket", d.socket, "exec", "not-a-phase", "--", "python3", "x.py"]);
    expectSame(bad);
    expect(bad.native.code).toBe(2);
    expect(bad.native.stderr).toContain("[SBX_ERR_VALIDATION]");
  });

  it("8 MiB of stdout and 1 MiB of stderr arrive byte for byte", async () => {
    const r = await both((p) => ["--socket", d.socket, "exec", p, "--", "python3", scripts.big!]);
    expectSame(r);
    expect(r.native.code).toBe(0);
    expect(r.native.stdout.length).toBe(8 * 1024 * 1024);
    const block = Buffer.concat(Array<Buffer>(4096).fill(Buffer.from(Array.from({ length: 256 }, (_, i) => i))));
    const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");
    expect(sha(r.native.stdout)).toBe(sha(Buffer.concat(Array<Buffer>(8).fill(block))));
    expect(r.native.stderr.length).toBeGreaterThan(0);
  }, 60_000);

  it("a reader that goes away (`| head -c 100`) ends it with 141, and the command with it", async () => {
    const line = (env: string) =>
      `${env} "${CLI_COMMAND}" --socket "${d.socket}" exec ${phaseId} -- python3 ${scripts.endless!} | head -c 100 > /dev/null; echo "status=\${PIPESTATUS[0]}"`;
    const native = await run("bash", ["-c", line(`PATH="${stubDir}:${PATH_WITH_THIS_NODE}"`)]);
    const node = await run("bash", ["-c", line("SANDBOXD_CLI_NODE=1")]);
    expect(native.stdout.toString()).toBe("status=141\n");
    expect(node.stdout.toString()).toBe("status=141\n");
    expect(native.stderr).toBe("");
  }, 60_000);

  it("a stdout that cannot take the output (/dev/full: ENOSPC) is said in one line and exits 125, on Node as natively (Node crashed with a stack trace and 1)", async () => {
    const line = (env: string) => `${env} "${CLI_COMMAND}" --socket "${d.socket}" exec ${phaseId} -- python3 ${scripts.status!} 0 > /dev/full; echo "status=$?" >&2`;
    const native = await run("bash", ["-c", line(`PATH="${stubDir}:${PATH_WITH_THIS_NODE}"`)]);
    const node = await run("bash", ["-c", line("SANDBOXD_CLI_NODE=1")]);
    expect(native.stderr).toBe("sandboxd: write ENOSPC\nstatus=125\n");
    expect(node.stderr).toBe("sandboxd: write ENOSPC\nstatus=125\n");
  }, 60_000);

  it("a stderr whose reader went away costs its lines only: stdout arrives and the command's status is the exit code, on Node as natively (Node exited 1)", async () => {
    const once = (env: NodeJS.ProcessEnv) =>
      new Promise<{ code: number | null; stdout: string }>((resolve, reject) => {
        const child = spawn(CLI_COMMAND, ["--socket", d.socket, "exec", phaseId, "--", "python3", scripts.args!, "kept"], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } });
        // the reader goes before the client has anything to say there: its writes to stderr fail with EPIPE
        child.stderr.destroy();
        let stdout = "";
        child.stdout.on("data", (c: Buffer) => (stdout += c.toString("utf8")));
        child.on("error", reject);
        child.on("close", (code) => resolve({ code, stdout }));
      });
    const native = await once({ PATH: `${stubDir}:${PATH_WITH_THIS_NODE}` });
    const node = await once({ PATH: PATH_WITH_THIS_NODE, SANDBOXD_CLI_NODE: "1" });
    expect(native).toEqual({ code: 0, stdout: '["kept"]\n' });
    expect(node).toEqual({ code: 0, stdout: '["kept"]\n' });
  }, 60_000);

  it("the socket from SANDBOXD_SOCKET or --socket=; an unreachable one is Node's to report, before anything is sent", async () => {
    const viaEnv = await run(CLI_COMMAND, ["exec", phaseId, "--", "python3", scripts.args!, "x"], { SANDBOXD_SOCKET: d.socket, PATH: `${stubDir}:${PATH_WITH_THIS_NODE}` });
    expect(viaEnv.code).toBe(0);
    expect(viaEnv.stdout.toString()).toBe('["x"]\n');
    const viaEq = await run(CLI_COMMAND, [`--socket=${d.socket}`, "exec", phaseId, "--", "python3", scripts.args!, "y"], { PATH: `${stubDir}:${PATH_WITH_THIS_NODE}` });
    expect(viaEq.code).toBe(0);
    expect(viaEq.stdout.toString()).toBe('["y"]\n');
    const gone = path.join(stubDir, "no-daemon.sock");
    const unreachable = await run(CLI_COMMAND, ["--socket", gone, "exec", phaseId, "--", "python3", "x.py"]);
    const onNode = await run(CLI_COMMAND, ["--socket", gone, "exec", phaseId, "--", "python3", "x.py"], { SANDBOXD_CLI_NODE: "1" });
    expect(unreachable.code).toBe(125);
    expect(unreachable.stderr).toBe(onNode.stderr);
    expect(unreachable.stderr).toContain(`cannot reach the sandboxd daemon at ${gone} (ENOENT) [SBX_ERR_DAEMON_UNREACHABLE]`);
  });

  it("every other form goes to Node: --json, -c, --reason, --help, a timeout spelled otherwise, a missing command", async () => {
    for (const args of [
      ["exec", phaseId, "--json", "--", "python3", "x.py"],
      ["exec", phaseId, "-c", "python3 x.py"],
      ["exec", phaseId, "--reason", "why", "--", "python3", "x.py"],
      ["exec", "--help"],
      ["exec", phaseId, "--timeout", "1e1", "--", "python3", "x.py"],
      ["exec", phaseId, "--timeout", "0", "--", "python3", "x.py"],
      ["exec", phaseId, "--timeout", "1", "--timeout", "2", "--", "python3", "x.py"],
      ["exec", phaseId],
      ["exec", phaseId, "--"],
    ]) {
      const r = await run(CLI_NATIVE, ["--socket", d.socket, ...args], { PATH: `${stubDir}:${PATH_WITH_THIS_NODE}` });
      expect({ args, stderr: r.stderr, code: r.code }).toEqual({ args, stderr: "NODE-CALLED\n", code: 99 });
    }
    // and Node answers it as it always has
    const onNode = await run(CLI_COMMAND, ["--socket", d.socket, "exec", phaseId, "--json", "--", "python3", scripts.args!]);
    expect(onNode.code).toBe(0);
    expect(JSON.parse(onNode.stdout.toString()).exitCode).toBe(0);
  });
});
