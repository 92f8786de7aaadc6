/**
 * Attacks on `sandboxd exec`'s native client (native/exec): command lines,
 * descriptors and daemons chosen to make it differ from the Node CLI it
 * stands in for, each run both ways through the `sandboxd` command
 * (SANDBOXD_CLI_NODE=1 runs Node) and compared — stdout bytes, stderr,
 * status. The commands run in a real sandbox of a real test daemon; a daemon
 * that breaks off mid-frame is a socket server of the test's own, since the
 * real one never does.
 */
import { createHash } from "node:crypto";
import { chmod, mkdir, mkdtemp, rm, symlink } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Sandboxd } from "sandboxd";
import { runProcess, type ProcessRun } from "../helpers/run-process.js";
import { CLI_COMMAND, daemonWithPhase, removeDir, type TestDaemon } from "../helpers/sandbox.js";

let d: TestDaemon;
let project: string;
let phaseId: string;
let tmp: string;
let scripts: Record<string, string> = {};

const CODE = {
  args: "import json, sys\nprint(json.dumps(sys.argv[1:]))",
  // 4 MiB of stdout and 1 MiB of stderr, more than any pipe holds
  big: "import sys\nblock = bytes(range(256)) * 4096\nfor i in range(4):\n    sys.stdout.buffer.write(block)\n    sys.stdout.flush()\nsys.stderr.buffer.write(block)\nsys.stderr.flush()",
};

beforeAll(async () => {
  ({ d, project, phaseId, scripts } = await daemonWithPhase(CODE, "14.1"));
  tmp = await mkdtemp(path.join(os.tmpdir(), "sbx-native-attack-"));
}, 120_000);

afterAll(async () => {
  await d?.close();
  if (project) await removeDir(project);
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

type Run = ProcessRun;
const run = runProcess;

/** the same thing natively and on Node */
async function both(f: (env: NodeJS.ProcessEnv) => Promise<Run>): Promise<{ native: Run; node: Run }> {
  return { native: await f({}), node: await f({ SANDBOXD_CLI_NODE: "1" }) };
}

function expectSame({ native, node }: { native: Run; node: Run }): void {
  expect({ code: native.code, stderr: native.stderr }).toEqual({ code: node.code, stderr: node.stderr });
  expect(native.stdout.equals(node.stdout)).toBe(true);
}

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/**
 * Runs the `sandboxd` command with stdout and stderr pipes that another
 * holder made non-blocking (O_NONBLOCK belongs to the pipe, shared by all its
 * holders: a Node parent, a terminal multiplexer), read only after a pause,
 * so they fill; prints status, then stdout's and stderr's sizes and hashes.
 */
const NONBLOCKING_PIPES = `
import hashlib, json, os, subprocess, sys, threading, time
ro, wo = os.pipe(); re, we = os.pipe()
os.set_blocking(wo, False); os.set_blocking(we, False)
p = subprocess.Popen(sys.argv[1:], stdout=wo, stderr=we)
os.close(wo); os.close(we)
time.sleep(2)
got = {}
def drain(fd, k):
    data = b""
    while True:
        b = os.read(fd, 65536)
        if not b: break
        data += b
    got[k] = data
ts = [threading.Thread(target=drain, args=(fd, k)) for fd, k in ((ro, "out"), (re, "err"))]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps({"status": p.wait(), "out": [len(got["out"]), hashlib.sha256(got["out"]).hexdigest()], "err": [len(got["err"]), got["err"][:200].decode("utf8", "replace")]}))
`;

describe("attacks on the native exec client", () => {
  it("stdout and stderr left non-blocking by another holder of the pipe: every byte arrives, as on Node (EAGAIN waits, never fails)", async () => {
    const r = await both((env) => run("python3", ["-c", NONBLOCKING_PIPES, CLI_COMMAND, "--socket", d.socket, "exec", phaseId, "--", "python3", scripts.big!], { env }));
    const native = JSON.parse(r.native.stdout.toString()) as { status: number; out: [number, string]; err: [number, string] };
    const node = JSON.parse(r.node.stdout.toString()) as typeof native;
    const block = Buffer.concat(Array<Buffer>(4096).fill(Buffer.from(Array.from({ length: 256 }, (_, i) => i))));
    expect(node.status).toBe(0);
    expect(node.out).toEqual([4 * block.length, sha(Buffer.concat(Array<Buffer>(4).fill(block)))]);
    expect(native).toEqual(node);
  }, 60_000);

  it("a relative socket path or one through `..` names the socket Node names (path.resolve), never another", async () => {
    // link/.. is `tmp` to path.resolve, but the daemon's directory to the kernel
    const real = path.join(tmp, "real");
    await mkdir(path.join(real, "sub"), { recursive: true });
    await symlink(d.socket, path.join(real, "d.sock"));
    await symlink(path.join(real, "sub"), path.join(tmp, "link"));
    const viaFlag = await both((env) => run(CLI_COMMAND, ["--socket", path.join(tmp, "link", "..", "d.sock"), "exec", phaseId, "--", "python3", scripts.args!, "x"], { env }));
    expectSame(viaFlag);
    expect(viaFlag.node.code).toBe(125);
    expect(viaFlag.node.stderr).toContain(`cannot reach the sandboxd daemon at ${path.join(tmp, "d.sock")} (ENOENT)`);
    const viaEnv = await both((env) =>
      run(CLI_COMMAND, ["exec", phaseId, "--", "python3", scripts.args!, "x"], { env: { ...env, SANDBOXD_SOCKET: "link/../d.sock" }, cwd: tmp }),
    );
    expectSame(viaEnv);
    // a relative path short enough for a unix socket's 108 bytes, whose absolute form is not
    const deep = path.join(tmp, "d".repeat(60), "e".repeat(60));
    await mkdir(deep, { recursive: true });
    await symlink(d.socket, path.join(deep, "s.sock"));
    const long = await both((env) => run(CLI_COMMAND, ["--socket", "s.sock", "exec", phaseId, "--", "python3", scripts.args!, "x"], { env, cwd: deep }));
    expectSame(long);
    expect(long.node.code).toBe(125);
  }, 60_000);

  it("a SANDBOXD_SOCKET that is not UTF-8 is Node's to name: the native client never falls back to the default socket", async () => {
    // a non-root user whose default socket ($XDG_RUNTIME_DIR/sandboxd/sandboxd.sock) is a listener that notes every request
    const xdg = path.join(tmp, "xdg");
    await mkdir(path.join(xdg, "sandboxd"), { recursive: true });
    await chmod(tmp, 0o755);
    await chmod(xdg, 0o777);
    await chmod(path.join(xdg, "sandboxd"), 0o777);
    const requests: string[] = [];
    const server = net.createServer((s) =>
      s
        .on("data", (b) => {
          requests.push(b.toString("latin1"));
          s.end();
        })
        .on("error", () => undefined),
    );
    const sock = path.join(xdg, "sandboxd", "sandboxd.sock");
    await new Promise<void>((r) => server.listen(sock, r));
    await chmod(sock, 0o777);
    try {
      const line = `SANDBOXD_SOCKET=$'/tmp/\\xff.sock' XDG_RUNTIME_DIR='${xdg}' HOME='${tmp}' exec '${CLI_COMMAND}' exec ${phaseId} -- python3 x.py`;
      const r = await both((env) => run("bash", ["-c", line], { env, uid: 1000 }));
      expect(requests).toEqual([]);
      expectSame(r);
      expect(r.node.code).toBe(125);
      expect(r.node.stderr).toContain("cannot reach the sandboxd daemon at /tmp/\ufffd.sock (ENOENT)");
    } finally {
      server.close();
    }
  }, 60_000);

  it("a daemon that breaks off inside an event frame: the cut-off count includes the frame's header, as on Node", async () => {
    const sock = path.join(tmp, "cut.sock");
    const frame = (kind: number, payload: Buffer) => {
      const h = Buffer.alloc(5);
      h[0] = kind;
      h.writeUInt32BE(payload.length, 1);
      return Buffer.concat([h, payload]);
    };
    const started = frame(1, Buffer.from('{"type":"started","pid":7}'));
    const exit = frame(1, Buffer.from('{"type":"exit","result":{"exitCode":0,"signal":null,"timedOut":false}}'));
    const body = Buffer.concat([started, frame(2, Buffer.from("out\n")), exit.subarray(0, 12)]);
    const server = net.createServer((s) => {
      s.once("data", () => {
        s.end(Buffer.concat([Buffer.from(`HTTP/1.1 200 OK\r\nContent-Type: application/vnd.sandboxd.frames\r\nTransfer-Encoding: chunked\r\n\r\n${body.length.toString(16)}\r\n`), body, Buffer.from("\r\n")]));
      });
      s.on("error", () => undefined);
    });
    await new Promise<void>((r) => server.listen(sock, r));
    try {
      const r = await both((env) => run(CLI_COMMAND, ["--socket", sock, "exec", "ph_000000000000", "--", "python3", "x.py"], { env }));
      expectSame(r);
      expect(r.node.stdout.toString()).toBe("out\n");
      expect(r.node.stderr).toBe("sandboxd: the exec stream was cut off (13 bytes of an unfinished frame)\n");
    } finally {
      server.close();
    }
  });
});
