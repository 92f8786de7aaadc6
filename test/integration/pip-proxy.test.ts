/**
 * pip's allow-list proxy end to end (SKILLS.md Network Boundaries: "Exception:
 * Package downloads via pip from PyPI only"): a real daemon, a real phase
 * container (no network but loopback), and a local HTTPS stand-in for PyPI on
 * the host — a PEP 503 simple index and one tiny wheel built here, behind a
 * certificate from a throwaway CA. The test policy lists the stand-in's two
 * names (index and file host, as PyPI has) pinned to 127.0.0.1:<its port>,
 * and `localhost` unpinned, on the port of a trap server that must never see
 * a connection.
 *
 * Inside the sandbox pip is run exactly as an agent would, with no proxy
 * option: the command environment points it at the proxy. Then the attacks:
 * another host, a listed name that resolves to loopback, IP literals, the
 * wrong port, a trailing dot, plain HTTP, and urllib through the environment.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { chown, readFile, readdir, writeFile } from "node:fs/promises";
import https from "node:https";
import net from "node:net";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { OWNER, ROOT, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, writeScript, type TestDaemon } from "../helpers/sandbox.js";

const run = promisify(execFile);
const INDEX_HOST = "pypi.sandboxd.test";
const FILES_HOST = "files.sandboxd.test";
const PKG = "sbxdemo";
const WHEEL = `${PKG}-0.1.0-py3-none-any.whl`;
const PROXY_PORT = 3128;

let t: TestDaemon;
let standIn: https.Server;
let standInPort = 0;
let standInConnections = 0;
const requests: Array<{ host: string; path: string }> = [];
let trap: net.Server;
let trapPort = 0;
let trapConnections = 0;
let caPem = "";
let wheel: Buffer;
const cleanup: string[] = [];

/** A CA and a server certificate for both stand-in names (SAN), made with openssl. */
async function makeCertificates(dir: string): Promise<{ ca: string; key: string; cert: string }> {
  const p = (f: string) => path.join(dir, f);
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  await run("openssl", ["req", "-x509", ...ec, "-keyout", p("ca.key"), "-out", p("ca.pem"), "-days", "2", "-subj", "/CN=sandboxd test CA",
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
  await run("openssl", ["req", ...ec, "-keyout", p("server.key"), "-out", p("server.csr"), "-subj", `/CN=${INDEX_HOST}`]);
  await writeFile(
    p("server.ext"),
    `subjectAltName=DNS:${INDEX_HOST},DNS:${FILES_HOST}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n` +
      "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
  );
  await run("openssl", ["x509", "-req", "-in", p("server.csr"), "-CA", p("ca.pem"), "-CAkey", p("ca.key"), "-CAcreateserial", "-out", p("server.pem"), "-days", "2", "-extfile", p("server.ext")]);
  return { ca: await readFile(p("ca.pem"), "utf8"), key: await readFile(p("server.key"), "utf8"), cert: await readFile(p("server.pem"), "utf8") };
}

/** A tiny pure-Python wheel (a zip with the dist-info pip reads), written by the host's Python. */
async function makeWheel(dir: string): Promise<Buffer> {
  const script = path.join(dir, "mkwheel.py");
  await writeFile(
    script,
    `import base64, hashlib, sys, zipfile
name, ver = "${PKG}", "0.1.0"
files = {
    f"{name}/__init__.py": "VALUE = 42\\n",
    f"{name}-{ver}.dist-info/METADATA": f"Metadata-Version: 2.1\\nName: {name}\\nVersion: {ver}\\nSummary: sandboxd proxy test\\n",
    f"{name}-{ver}.dist-info/WHEEL": "Wheel-Version: 1.0\\nGenerator: sandboxd-test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
}
record = f"{name}-{ver}.dist-info/RECORD"
rows = []
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z:
    for path, text in files.items():
        data = text.encode()
        z.writestr(path, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{path},sha256={digest},{len(data)}")
    rows.append(f"{record},,")
    z.writestr(record, "\\n".join(rows) + "\\n")
`,
  );
  const out = path.join(dir, WHEEL);
  await run("python3", [script, out]);
  return readFile(out);
}

/** policies/default.yaml with its package index replaced by the stand-in's. */
async function standInPolicy(dir: string): Promise<string> {
  const base = await readFile(path.join(ROOT, "policies", "default.yaml"), "utf8");
  const start = base.indexOf("\n  packageIndex:\n");
  const end = base.indexOf("\n  services:\n", start);
  if (start < 0 || end < 0) throw new Error("policies/default.yaml has no network.packageIndex before network.services");
  const block = [
    "  packageIndex:",
    "    id: net.package-index",
    '    clause: "SKILLS.md Security & Safety Guardrails — Network Boundaries: package downloads via pip from PyPI only"',
    `    port: ${PROXY_PORT}`,
    `    indexUrl: https://${INDEX_HOST}/simple`,
    "    hosts:",
    `      - {name: ${INDEX_HOST}, pin: {address: 127.0.0.1, port: ${standInPort}}}`,
    `      - {name: ${FILES_HOST}, pin: {address: 127.0.0.1, port: ${standInPort}}}`,
    `      - {name: localhost, port: ${trapPort}}`,
    "    justification: the local PyPI stand-in of this test, and a listed name that resolves to loopback",
  ].join("\n");
  const file = path.join(dir, "pip-proxy.yaml");
  await writeFile(file, `${base.slice(0, start)}\n${block}${base.slice(end)}`);
  return file;
}

beforeAll(async () => {
  await requireEngineAndImage();
  const dir = await tempDir("pypi");
  cleanup.push(dir);
  const tls = await makeCertificates(dir);
  caPem = tls.ca;
  wheel = await makeWheel(dir);
  const sha = createHash("sha256").update(wheel).digest("hex");

  standIn = https.createServer({ key: tls.key, cert: tls.cert }, (req, res) => {
    const host = String(req.headers.host ?? "").replace(/:\d+$/, "");
    requests.push({ host, path: req.url ?? "" });
    const html = (body: string) => {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(`<!DOCTYPE html><html><body>${body}</body></html>`);
    };
    if (host === INDEX_HOST && req.url === "/simple/") return html(`<a href="${PKG}/">${PKG}</a>`);
    if (host === INDEX_HOST && req.url === `/simple/${PKG}/`) {
      // the file lives on the other host, as PyPI's files do
      return html(`<a href="https://${FILES_HOST}/packages/${WHEEL}#sha256=${sha}">${WHEEL}</a>`);
    }
    if (host === FILES_HOST && req.url === `/packages/${WHEEL}`) {
      res.writeHead(200, { "content-type": "application/octet-stream", "content-length": wheel.length });
      return res.end(wheel);
    }
    res.writeHead(404);
    res.end("not found");
  });
  standIn.on("connection", () => standInConnections++);
  await new Promise<void>((r) => standIn.listen(0, "127.0.0.1", r));
  standInPort = (standIn.address() as net.AddressInfo).port;

  trap = net.createServer((s) => {
    trapConnections++;
    s.destroy();
  });
  await new Promise<void>((r) => trap.listen(0, "127.0.0.1", r));
  trapPort = (trap.address() as net.AddressInfo).port;

  t = await startTestDaemon({ policy: await standInPolicy(dir) });
});

afterAll(async () => {
  await t?.close();
  await new Promise((r) => standIn?.close(r));
  await new Promise((r) => trap?.close(r));
  for (const d of cleanup) await removeDir(d);
});

async function exec(phase: PhaseView, argv: string[]): Promise<ExecResult & { verdict?: unknown }> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${phase.id}/exec`, { argv, timeoutMs: 60_000 })).result;
}

async function proxyRecords(phase: PhaseView): Promise<Array<Record<string, unknown>>> {
  const { records } = await t.api.request<{ records: Array<Record<string, unknown>> }>("GET", `/v1/audit?phase=${phase.id}`);
  return records.map((r) => (r.event as Record<string, unknown> | undefined) ?? r).filter((e) => String(e.type).startsWith("net."));
}

/** net.close is written once both sides have closed: wait for `n` of them. */
async function waitForCloses(phase: PhaseView, n: number): Promise<Array<Record<string, unknown>>> {
  let records: Array<Record<string, unknown>> = [];
  for (let i = 0; i < 100; i++) {
    records = await proxyRecords(phase);
    if (records.filter((e) => e.type === "net.close" && e.service === "pip-proxy").length >= n) break;
    await new Promise((res) => setTimeout(res, 100));
  }
  return records;
}

const ATTACKS = (standInPortOnHost: number, trapPortOnHost: number) => `
import json, os, socket, urllib.request

def ask(line):
    s = socket.create_connection(("127.0.0.1", ${PROXY_PORT}), timeout=10)
    s.sendall(line.encode() + b"\\r\\nHost: x\\r\\n\\r\\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    return data.decode("latin1").split("\\r\\n")[0]

out = {
    "other_host": ask("CONNECT evil.sandboxd.test:443 HTTP/1.1"),
    "loopback_name": ask("CONNECT localhost:${trapPortOnHost} HTTP/1.1"),
    "ip_literal": ask("CONNECT 127.0.0.1:${standInPortOnHost} HTTP/1.1"),
    "ip6_literal": ask("CONNECT [::ffff:127.0.0.1]:${trapPortOnHost} HTTP/1.1"),
    "wrong_port": ask("CONNECT ${INDEX_HOST}:${standInPortOnHost} HTTP/1.1"),
    "trailing_dot": ask("CONNECT ${INDEX_HOST}.:443 HTTP/1.1"),
    "plain_http": ask("GET http://${INDEX_HOST}/simple/ HTTP/1.1"),
}
# a library that only honours the environment's proxy variables
try:
    urllib.request.urlopen("https://evil.sandboxd.test/", timeout=10)
    out["urllib"] = "fetched"
except Exception as e:
    out["urllib"] = str(e)
out["env"] = {k: os.environ.get(k) for k in ("PIP_PROXY", "PIP_INDEX_URL", "HTTPS_PROXY", "https_proxy", "NO_PROXY")}
print(json.dumps(out))
`;

describe("pip's allow-list proxy", () => {
  it("lets pip download and install from the listed index, with nothing configured by the agent", async () => {
    const project = await makeProject();
    cleanup.push(project);
    await writeFile(path.join(project, "standin-ca.crt"), caPem);
    await chown(path.join(project, "standin-ca.crt"), OWNER.uid, OWNER.gid);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "pip", mode: "test" });

    const dl = await exec(phase, ["pip", "download", PKG, "--no-deps", "-d", "dl", "--cert", "standin-ca.crt", "--disable-pip-version-check"]);
    expect(dl.stderr).not.toMatch(/ERROR/);
    expect(dl.exitCode).toBe(0);
    expect(dl.stdout).toMatch(new RegExp(`Saved \\S*${WHEEL.replace(/\./g, "\\.")}`));
    // the wheel arrived in the phase's view of the project (docs/WORKSPACE.md), byte for byte
    const view = path.join(t.stateDir, "phases", phase.id, "ws", "view");
    expect(await readdir(path.join(view, "dl"))).toEqual([WHEEL]);
    expect((await readFile(path.join(view, "dl", WHEEL))).equals(wheel)).toBe(true);
    expect(requests).toEqual(
      expect.arrayContaining([
        { host: INDEX_HOST, path: `/simple/${PKG}/` },
        { host: FILES_HOST, path: `/packages/${WHEEL}` },
      ]),
    );

    // `pip install NAME` is allowed by the shell policy and reaches the index the same way
    const inst = await exec(phase, ["pip", "install", "--no-deps", "--target", "pkgs", PKG, "--cert", "standin-ca.crt", "--disable-pip-version-check"]);
    expect(inst.exitCode).toBe(0);
    const check = await writeScript(project, `import sys\nsys.path.insert(0, "pkgs")\nimport ${PKG}\nprint(${PKG}.VALUE)`);
    expect((await exec(phase, ["python3", check])).stdout.trim()).toBe("42");
    // and plainly, as SKILLS.md has it (`pip install [package]`): into the user site (the
    // image's system Python is read-only and Debian-managed) on the project's package disk,
    // importable by later commands and by the project's next phases (src/workspace/packages.ts)
    const plain = await exec(phase, ["pip", "install", "--no-deps", PKG, "--cert", "standin-ca.crt", "--disable-pip-version-check"]);
    expect(plain.stderr).not.toMatch(/externally-managed|ERROR/);
    expect(plain.exitCode).toBe(0);
    const where = await writeScript(project, `import ${PKG}\nprint(${PKG}.VALUE, ${PKG}.__file__)`);
    expect((await exec(phase, ["python3", where])).stdout.trim()).toMatch(new RegExp(`^42 /opt/sandboxd-packages/user/lib/python3\\.\\d+/site-packages/`));

    const records = await waitForCloses(phase, 6);
    const allowed = records.filter((e) => e.type === "net.proxy" && e.decision === "allow");
    expect(allowed.map((e) => e.host)).toEqual(expect.arrayContaining([INDEX_HOST, FILES_HOST]));
    expect(allowed[0]).toMatchObject({ port: 443, address: `127.0.0.1:${standInPort}`, pinned: true, rule: "net.package-index", service: "pip-proxy" });
    expect(String(allowed[0]!.clause)).toMatch(/pip from PyPI only/);
    const close = records.find((e) => e.type === "net.close" && e.service === "pip-proxy" && e.target === `${FILES_HOST}:443`);
    expect(close, JSON.stringify(records.filter((e) => e.service === "pip-proxy"), null, 1)).toBeDefined();
    expect(close!.bytesIn as number).toBeGreaterThan(wheel.length);
    expect(typeof close!.durationMs).toBe("number");
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(new RegExp(`\\[NET\\] \\[PROXY\\] \\[CONNECT ${FILES_HOST.replace(/\./g, "\\.")}:443\\] \\[ALLOW net\\.package-index .*127\\.0\\.0\\.1:${standInPort} \\(pinned by policy\\)\\]`));
  });

  it("refuses every other target without dialling it, and records each refusal with the host", async () => {
    const project = await makeProject();
    cleanup.push(project);
    const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: "pip-attacks", mode: "test" });
    const before = standInConnections;
    const script = await writeScript(project, ATTACKS(standInPort, trapPort));
    const r = await exec(phase, ["python3", script]);
    expect(r.stderr).toBe("");
    expect(r.exitCode).toBe(0);
    const out = JSON.parse(r.stdout) as Record<string, string> & { env: Record<string, string | null> };

    expect(out.other_host).toMatch(/^HTTP\/1\.1 403 .*evil\.sandboxd\.test is not a package index in policy network\.packageIndex.*ask the operator/);
    expect(out.loopback_name).toMatch(/^HTTP\/1\.1 403 .*localhost resolves to (127\.0\.0\.1|::1), loopback/);
    expect(out.ip_literal).toMatch(/^HTTP\/1\.1 403 .*127\.0\.0\.1 is an IP address/);
    expect(out.ip6_literal).toMatch(/^HTTP\/1\.1 403 .*::ffff:127\.0\.0\.1 is an IP address/);
    expect(out.wrong_port).toMatch(new RegExp(`^HTTP/1\\.1 403 .*port ${standInPort} is not allowed for ${INDEX_HOST.replace(/\./g, "\\.")}`));
    expect(out.trailing_dot).toMatch(/^HTTP\/1\.1 403 .*ends with a dot/);
    expect(out.plain_http).toMatch(/^HTTP\/1\.1 405 .*only CONNECT is served/);
    expect(out.urllib).toMatch(/Tunnel connection failed: 403 .*evil\.sandboxd\.test is not a package index/);
    expect(out.env).toEqual({
      PIP_PROXY: `http://127.0.0.1:${PROXY_PORT}`,
      PIP_INDEX_URL: `https://${INDEX_HOST}/simple`,
      HTTPS_PROXY: `http://127.0.0.1:${PROXY_PORT}`,
      https_proxy: `http://127.0.0.1:${PROXY_PORT}`,
      NO_PROXY: "127.0.0.1,localhost,::1",
    });
    // nothing was dialled for any of them
    expect(standInConnections).toBe(before);
    expect(trapConnections).toBe(0);

    const records = await waitForCloses(phase, 8);
    const refused = records.filter((e) => e.type === "net.proxy" && e.decision === "forbid");
    expect(records.filter((e) => e.type === "net.proxy" && e.decision === "allow")).toEqual([]);
    expect(refused.map((e) => e.host)).toEqual([
      "evil.sandboxd.test",
      "localhost",
      "127.0.0.1",
      "::ffff:127.0.0.1",
      INDEX_HOST,
      `${INDEX_HOST}.`,
      INDEX_HOST,
      "evil.sandboxd.test",
    ]);
    expect(refused.map((e) => e.rule)).toEqual([
      "net.package-index",
      "net.proxy.address",
      "net.package-index",
      "net.package-index",
      "net.package-index",
      "net.package-index",
      "net.proxy.request",
      "net.package-index",
    ]);
    for (const e of refused) {
      expect(String(e.clause)).toMatch(/^SKILLS\.md .*pip from PyPI only/);
      expect(e.service).toBe("pip-proxy");
    }
    await t.api.request("DELETE", `/v1/phases/${phase.id}`);
    const log = await readFile(phase.buildLog, "utf8");
    expect(log).toMatch(/\[NET\] \[PROXY\] \[CONNECT evil\.sandboxd\.test:443\] \[FORBID net\.package-index \(SKILLS\.md [^)]*\): evil\.sandboxd\.test is not a package index/);
    expect(log).toMatch(new RegExp(`\\[NET\\] \\[PROXY\\] \\[CONNECT localhost:${trapPort}\\] \\[FORBID net\\.proxy\\.address .*loopback`));
    expect(log).toMatch(/\[NET\] \[PROXY\] \[GET http:\/\/pypi\.sandboxd\.test\/simple\/\] \[FORBID net\.proxy\.request .*only CONNECT is served/);
  });
});
