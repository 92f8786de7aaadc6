/**
 * Loopback inside a real sandbox, as a test suite uses it: `localhost`
 * resolves (the container has networking disabled, so Docker writes no
 * /etc/hosts; src/runtime/docker.ts mounts one), and only the services a
 * phase really has are listened for (src/net/services.ts listenList): the
 * port of a service it does not have is free for the suite's own server and
 * refused like any closed port, and that refusal is still on record with the
 * service's reason.
 */
import { readFile } from "node:fs/promises";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon, auditEvents } from "../helpers/sandbox.js";

let t: TestDaemon;
const cleanup: string[] = [];

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
});

afterAll(async () => {
  await t?.close();
  for (const d of cleanup) await removeDir(d);
});

async function exec(phase: PhaseView, argv: string[]): Promise<ExecResult> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv })).result;
}

async function journal(): Promise<Array<Record<string, unknown>>> {
  return auditEvents(t.stateDir);
}

const RESOLVE = `
import json, socket, threading
out = {}
out["localhost"] = sorted({ai[4][0] for ai in socket.getaddrinfo("localhost", 5432)})
out["families"] = sorted({ai[0].name for ai in socket.getaddrinfo("localhost", 5432)})
out["hostname"] = socket.gethostname()
out["own"] = sorted({ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), 1)})
# a server bound to ("localhost", port), as pyalgotrade's optimizer does, and a client by name
srv = socket.socket()
srv.bind(("localhost", 0))
srv.listen(1)
port = srv.getsockname()[1]
def serve():
    c, _ = srv.accept()
    c.sendall(b"hi by name")
    c.close()
threading.Thread(target=serve, daemon=True).start()
c = socket.create_connection(("localhost", port), timeout=5)
out["served"] = c.recv(100).decode()
out["bound"] = srv.getsockname()[0]
try:
    open("/etc/hosts", "a").write("10.0.0.1 pypi.org\\n")
    out["hosts_writable"] = True
except OSError as e:
    out["hosts_writable"] = e.errno
print(json.dumps(out))
`;

const PORTS = `
import json, socket, time
out = {}
def attempt(port):
    t0 = time.monotonic()
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port))
        return {"ok": True, "secs": time.monotonic() - t0}
    except OSError as e:
        return {"ok": False, "errno": e.errno, "secs": time.monotonic() - t0}
    finally:
        s.close()
# nothing configured: every service port but the package-index proxy is closed
out["connect"] = {str(p): attempt(p) for p in (5432, 6379, 8812)}
# and free for the suite's own servers (here as PostgreSQL, Redis and QuestDB would)
out["bind"] = {}
for p in (5432, 6379, 8812):
    s = socket.socket()
    try:
        s.bind(("localhost", p))
        s.listen(1)
        out["bind"][str(p)] = "bound"
    except OSError as e:
        out["bind"][str(p)] = e.errno
    finally:
        s.close()
# the package-index proxy listens, and answers what it does not serve
s = socket.create_connection(("127.0.0.1", 3128), timeout=5)
s.sendall(b"GET http://example.com/ HTTP/1.1\\r\\nHost: example.com\\r\\n\\r\\n")
s.settimeout(5)
try:
    out["proxy"] = s.recv(200).decode(errors="replace").split("\\r\\n")[0]
except OSError as e:
    out["proxy"] = "err %s" % e.errno
s.close()
print(json.dumps(out))
`;

describe("loopback in a phase", () => {
  it("resolves localhost (IPv4 only, read-only hosts file) and serves by that name", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "hosts", mode: "test" });
    const r = await exec(phase, ["python3", await writeScript(project, RESOLVE)]);
    expect(r.stderr).toBe("");
    expect(r.exitCode).toBe(0);
    const out = JSON.parse(r.stdout) as Record<string, unknown>;
    expect(out).toMatchObject({
      localhost: ["127.0.0.1"],
      families: ["AF_INET"],
      hostname: "sandbox",
      own: ["127.0.0.1"],
      served: "hi by name",
      bound: "127.0.0.1",
    });
    expect([13, 30]).toContain(out.hosts_writable); // EACCES (root's file) or EROFS (read-only mount)
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
  });

  it("listens only for services the phase has: other service ports refuse at once, are free to bind, and the refusal is recorded", async () => {
    const project = await makeProject(); // no .env: no service configured
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "ports", mode: "test" });
    const r = await exec(phase, ["python3", await writeScript(project, PORTS)]);
    expect(r.stderr).toBe("");
    expect(r.exitCode).toBe(0);
    const out = JSON.parse(r.stdout) as {
      connect: Record<string, { ok: boolean; errno?: number; secs: number }>;
      bind: Record<string, unknown>;
      proxy: string;
    };
    for (const [port, res] of Object.entries(out.connect)) {
      expect({ port, ok: res.ok, errno: res.errno }).toEqual({ port, ok: false, errno: 111 }); // ECONNREFUSED
      expect(res.secs).toBeLessThan(0.5);
    }
    expect(out.bind).toEqual({ "5432": "bound", "6379": "bound", "8812": "bound" });
    expect(out.proxy).toMatch(/^HTTP\/1\.[01] 405 /);

    // each refusal is on record with the service's own rule and reason
    const want = { "5432": "postgres", "6379": "redis", "8812": "questdb-pg" } as const;
    let refused: Array<Record<string, unknown>> = [];
    for (let i = 0; i < 50; i++) {
      refused = (await journal()).filter((e) => e.phase === phase.id && e.type === "net.connect" && e.decision === "forbid");
      if (Object.values(want).every((s) => refused.some((e) => e.service === s))) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    for (const [port, service] of Object.entries(want)) {
      const rec = refused.find((e) => e.service === service);
      expect(rec, `no record of the refused ${service} connection`).toMatchObject({ address: "127.0.0.1", port: Number(port), decision: "forbid" });
      expect(String(rec!.reason)).toContain("nothing listens for it");
    }
    expect(refused.find((e) => e.service === "postgres")).toMatchObject({ rule: "db.test-database-only" });
    expect(String(refused.find((e) => e.service === "postgres")!.reason)).toMatch(/DATABASE_URL_TEST is not set/);
    expect(refused.find((e) => e.service === "redis")).toMatchObject({ rule: "redis.test-instance-only" });
    expect(String(refused.find((e) => e.service === "redis")!.reason)).toMatch(/REDIS_URL_TEST is not set/);
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/\[NET\] \[CONNECT\] \[postgres 127\.0\.0\.1:5432\] \[FORBID db\.test-database-only/);
  });
});
