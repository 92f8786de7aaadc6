/**
 * The network boundary from inside a real sandbox: every TCP connection that
 * is not to a service — another loopback port, another host, the host's own
 * addresses — fails at once and is recorded with the destination the program
 * asked for (src/runtime/netns.ts, src/shim/conntrack.ts, src/net/stray.ts).
 * Programs in the sandbox can still serve each other on loopback.
 *
 * The host runs a TCP server on all its addresses, so a path out of the
 * sandbox, if there were one, would connect.
 */
import { execFileSync } from "node:child_process";
import { readFile, readdir, symlink } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { ApiClient } from "../../src/cli/client.js";
import {
  containersOf,
  docker,
  makeProject,
  removeDir,
  requireEngineAndImage,
  spawnDaemon,
  startTestDaemon,
  tempDir,
  waitExit,
  writeScript,
  type TestDaemon,
  auditEvents,
} from "../helpers/sandbox.js";

let t: TestDaemon;
let open: net.Server;
let openPort = 0;
let openAccepted = 0;
const cleanup: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
  open = net.createServer((s) => {
    openAccepted++;
    s.end("hello from the host\n");
    s.on("error", () => undefined);
  });
  await new Promise<void>((r) => open.listen(0, "0.0.0.0", r));
  openPort = (open.address() as net.AddressInfo).port;
  t = await startTestDaemon();
});

afterAll(async () => {
  await t?.close();
  await new Promise((r) => open?.close(r));
  for (const d of cleanup) await removeDir(d);
});

async function exec(phase: PhaseView, argv: string[]): Promise<ExecResult> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv })).result;
}

async function netRecords(phaseId: string): Promise<Array<Record<string, unknown>>> {
  return (await auditEvents(t.stateDir)).filter((e) => e.phase === phaseId && String(e.type).startsWith("net."));
}

/** The host's own IPv4 addresses (not loopback): reachable from a container on a bridge, not from a sandbox. */
function hostAddresses(): string[] {
  return Object.values(os.networkInterfaces())
    .flat()
    .filter((a): a is os.NetworkInterfaceInfo => !!a && a.family === "IPv4" && !a.internal)
    .map((a) => a.address);
}

const PROBE = (targets: Array<[string, number]>) => `
import errno, json, socket, threading, time

def attempt(host, port):
    t0 = time.monotonic()
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, port))
        data = s.recv(100)
        return {"ok": True, "data": data.decode(errors="replace"), "secs": time.monotonic() - t0}
    except OSError as e:
        return {"ok": False, "errno": e.errno, "secs": time.monotonic() - t0}
    finally:
        s.close()

out = {}
# a program in the sandbox serving another on loopback still works
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 8765))
srv.listen(4)
def serve():
    c, _ = srv.accept()
    c.sendall(b"own server")
    c.close()
threading.Thread(target=serve, daemon=True).start()
out["own"] = attempt("127.0.0.1", 8765)

out["targets"] = {"%s:%d" % (h, p): attempt(h, p) for h, p in ${JSON.stringify(targets)}}

# UDP keeps failing at routing, at once
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", ("8.8.8.8", 53))
    out["udp"] = "sent"
except OSError as e:
    out["udp"] = e.errno

# nothing in the sandbox can listen where stray connections are sent
b = socket.socket()
try:
    b.bind(("127.0.0.1", 1))
    out["bind1"] = "bound"
except OSError as e:
    out["bind1"] = e.errno

# IPv6 is off: no ::1 to go around the IPv4 rules
try:
    socket.socket(socket.AF_INET6).connect(("::1", 5432))
    out["v6"] = "connected"
except OSError as e:
    out["v6"] = e.errno
print(json.dumps(out))
`;

const BURST = (n: number) => `
import socket
refused = 0
for i in range(${n}):
    s = socket.socket()
    try:
        s.connect(("10.77.0.1", 9999))
    except ConnectionRefusedError:
        refused += 1
    finally:
        s.close()
print(refused)
`;

describe("network boundary (connections to anything but services)", () => {
  it("refuses another port, another host and the host's addresses at once, and records each with its destination", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "stray", mode: "test" });
    const targets: Array<[string, number]> = [
      ["127.0.0.1", 5433], // a loopback port that is not a service
      ["127.0.0.1", 1], // the dead port itself (the watch's own probe uses another address)
      ["127.0.0.2", 5432], // a service port on another loopback address
      ["10.0.0.1", 80], // another host
      ["172.17.0.1", openPort], // the Docker bridge's host address
      ...hostAddresses().map((a): [string, number] => [a, openPort]),
    ];
    const r = await exec(phase, ["python3", await writeScript(project, PROBE(targets))]);
    expect(r.stderr).toBe("");
    expect(r.exitCode).toBe(0);
    const out = JSON.parse(r.stdout) as {
      own: { ok: boolean; data: string };
      targets: Record<string, { ok: boolean; errno?: number; secs: number }>;
      udp: unknown;
      bind1: unknown;
      v6: unknown;
    };
    expect(out.own).toMatchObject({ ok: true, data: "own server" });
    for (const [target, res] of Object.entries(out.targets)) {
      expect({ target, ok: res.ok, errno: res.errno }).toEqual({ target, ok: false, errno: 111 }); // ECONNREFUSED
      expect(res.secs).toBeLessThan(0.5);
    }
    expect(openAccepted).toBe(0);
    expect(out.udp).toBe(101); // ENETUNREACH
    expect(out.bind1).toBe(13); // EACCES
    expect(out.v6).toBe(99); // EADDRNOTAVAIL: IPv6 is off, there is no ::1

    const want = targets.map(([h, p]) => `${h}:${p}`);
    let refused: Array<Record<string, unknown>> = [];
    for (let i = 0; i < 50; i++) {
      refused = (await netRecords(phase.id)).filter((e) => e.type === "net.connect" && e.rule === "net.unlisted-destination");
      if (want.every((w) => refused.some((e) => `${e.address}:${e.port}` === w))) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    for (const w of want) {
      const rec = refused.find((e) => `${e.address}:${e.port}` === w);
      expect(rec, `no record of ${w}`).toBeDefined();
      expect(rec).toMatchObject({ decision: "forbid", proto: "tcp" });
      expect(String(rec!.clause)).toMatch(/^SKILLS\.md .*Network Boundaries/);
      expect(String(rec!.reason)).toContain("not a service this phase may use");
    }
    // the sandbox talking to itself is not a refusal
    expect(refused.some((e) => e.port === 8765)).toBe(false);
    const confine = (await netRecords(phase.id)).find((e) => e.type === "net.confine");
    expect(confine).toMatchObject({ recorded: true, deadPort: 1 });

    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/\[NET\] \[CONNECT\] \[10\.0\.0\.1:80\] \[FORBID net\.unlisted-destination \(SKILLS\.md/);
    expect(log).toMatch(/\[NET\] \[CONNECT\] \[127\.0\.0\.1:5433\] \[FORBID net\.unlisted-destination/);
  });

  it("accounts for every attempt of a connect loop (one by one up to the rate, the rest in a summary), or records that events were lost", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "burst", mode: "test" });
    const n = 400;
    const r = await exec(phase, ["python3", await writeScript(project, BURST(n))]);
    expect(r.exitCode).toBe(0);
    expect(r.stdout.trim()).toBe(String(n));
    const accounted = async () => {
      const recs = (await netRecords(phase.id)).filter((e) => e.rule === "net.unlisted-destination");
      return {
        single: recs.filter((e) => e.count === undefined).length,
        summarised: recs.reduce((a, e) => a + (typeof e.count === "number" ? e.count : 0), 0),
      };
    };
    const lossRecorded = async () => (await netRecords(phase.id)).some((e) => e.type === "net.watch" && e.lost === true);
    let got = await accounted();
    for (let i = 0; i < 60 && got.single + got.summarised < n; i++) {
      await new Promise((res) => setTimeout(res, 100));
      got = await accounted();
    }
    if (got.single + got.summarised < n) {
      // On a loaded machine the kernel can drop conntrack events (ENOBUFS):
      // then, and only then, fewer are accounted for, and the trail says so.
      await new Promise((res) => setTimeout(res, 1_500)); // the last summary
      got = await accounted();
      expect(await lossRecorded(), `only ${got.single + got.summarised} of ${n} accounted for, and no loss on record`).toBe(true);
      expect(got.single + got.summarised).toBeLessThan(n);
    } else {
      expect(got.single + got.summarised).toBe(n);
    }
    expect(got.single).toBeLessThan(n); // the rate limit kicked in
    expect(got.summarised).toBeGreaterThan(0);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  });
});

describe("network boundary where refusals cannot be recorded", () => {
  it("without conntrack-tools the phase still runs, stray connections are still refused, and the trail says they go unrecorded", async () => {
    // the daemon's PATH with every program on it but conntrack (the workspace layer, the namespace tools … stay)
    const bin = await tempDir("bin-no-conntrack");
    cleanup.push(bin);
    const linked = new Set<string>();
    for (const dir of (process.env.PATH ?? "").split(":").filter(Boolean)) {
      const names = await readdir(dir).catch(() => [] as string[]);
      for (const name of names) {
        if (name === "conntrack" || linked.has(name)) continue;
        linked.add(name);
        await symlink(path.join(dir, name), `${bin}/${name}`);
      }
    }
    expect(linked.has("nsenter") && linked.has("sh") && !linked.has("conntrack")).toBe(true);
    expect(execFileSync("bash", ["-c", "command -v conntrack || true"], { encoding: "utf8", env: { PATH: bin } }).trim()).toBe("");
    const stateDir = await tempDir("no-conntrack");
    cleanup.push(stateDir);
    const socket = path.join(stateDir, "sandboxd.sock");
    const daemon = await spawnDaemon(stateDir, socket, { env: { PATH: bin } });
    const api = new ApiClient(socket);
    try {
      const project = await makeProject();
      cleanup.push(project);
      const started = Date.now();
      const { phase } = await api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "degraded", mode: "test" });
      expect(Date.now() - started).toBeLessThan(4_000); // no wait for a watch that cannot start
      const r = (await api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv: ["python3", await writeScript(project, BURST(3))] })).result;
      expect(r.stdout.trim()).toBe("3"); // refused at once all the same
      const text = await readFile(path.join(stateDir, "audit.jsonl"), "utf8");
      const mine = text.split("\n").filter((l) => l.includes(phase.id));
      const confine = mine.map((l) => JSON.parse(l) as { event?: Record<string, unknown> }).map((r) => r.event ?? r).find((e) => (e as Record<string, unknown>).type === "net.confine");
      expect(confine).toMatchObject({ recorded: false });
      expect(String((confine as Record<string, unknown>).error)).toMatch(/conntrack/);
      expect(mine.some((l) => l.includes("net.unlisted-destination"))).toBe(false);
      await api.request("DELETE", `/v1/phases/${phase.id}`);
      const log = await readFile(phase.buildLog, "utf8");
      expect(log).toMatch(/\[NET\] \[CONFINE\] .*DEGRADED: connections to anything but services are refused by the kernel but not recorded/);
    } finally {
      daemon.child.kill("SIGTERM");
      await waitExit(daemon.child).catch(() => undefined);
      for (const c of await containersOf(stateDir).catch(() => [])) await docker.getContainer(c.Id).remove({ force: true }).catch(() => undefined);
    }
  });
});
