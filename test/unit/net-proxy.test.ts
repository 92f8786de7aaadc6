/**
 * pip's allow-list proxy (src/net/proxy.ts): the request head, host matching,
 * address classification and the whole CONNECT decision, with a fake
 * resolver and a fake record sink. The integration test
 * (test/integration/pip-proxy.test.ts) runs pip through it from a sandbox.
 */
import net from "node:net";
import { describe, expect, it } from "vitest";
import {
  ProxyRequestError,
  RULE_ADDRESS,
  RULE_UNRESOLVED,
  classifyAddress,
  decideConnect,
  handleProxyClient,
  headEnd,
  matchHost,
  parseAuthority,
  parseRequestHead,
  type Address,
  type ProxyResult,
} from "../../src/net/proxy.js";
import { DEFAULT_NETWORK, type PackageIndexPolicy } from "../../src/policy/schema.js";

const INDEX: PackageIndexPolicy = {
  ...DEFAULT_NETWORK.packageIndex!,
  hosts: [
    { name: "pypi.org", port: 443 },
    { name: "files.pythonhosted.org", port: 443 },
    { name: "mirror.internal", port: 443, pin: { address: "10.1.2.3", port: 8443 } },
    { name: "localhost", port: 443 },
  ],
};

function statusOf(fn: () => unknown): number | null {
  try {
    fn();
    return null;
  } catch (e) {
    return e instanceof ProxyRequestError ? e.status : -1;
  }
}

describe("request head", () => {
  it("finds the end of the head with CRLF or bare LF line ends", () => {
    expect(headEnd(Buffer.from("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nTLS"))).toBe(39);
    expect(headEnd(Buffer.from("CONNECT a:443 HTTP/1.1\n\nTLS"))).toBe(24);
    expect(headEnd(Buffer.from("CONNECT a:443 HTTP/1.1\r\nHost: a"))).toBe(-1);
  });

  it("parses the request line and header fields", () => {
    expect(parseRequestHead("CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\nUser-Agent: pip/23\r\n\r\n")).toEqual({
      method: "CONNECT",
      target: "pypi.org:443",
      headers: [
        ["host", "pypi.org:443"],
        ["user-agent", "pip/23"],
      ],
    });
    expect(parseRequestHead("GET http://pypi.org/simple/ HTTP/1.0\r\n\r\n").method).toBe("GET");
  });

  it.each([
    ["no version", "CONNECT pypi.org:443\r\n\r\n"],
    ["HTTP/2", "CONNECT pypi.org:443 HTTP/2.0\r\n\r\n"],
    ["two spaces", "CONNECT  pypi.org:443 HTTP/1.1\r\n\r\n"],
    ["a NUL", "CONNECT pypi.org\u0000.evil:443 HTTP/1.1\r\n\r\n"],
    ["a bad header", "CONNECT pypi.org:443 HTTP/1.1\r\nno colon here\r\n\r\n"],
    ["a folded header", "CONNECT pypi.org:443 HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"],
  ])("refuses a head with %s (400)", (_what, text) => {
    expect(statusOf(() => parseRequestHead(text))).toBe(400);
  });

  it("parses CONNECT authorities, IP literals marked", () => {
    expect(parseAuthority("PyPI.org:443")).toEqual({ host: "pypi.org", port: 443, ip: 0 });
    expect(parseAuthority("127.0.0.1:443")).toEqual({ host: "127.0.0.1", port: 443, ip: 4 });
    expect(parseAuthority("[::1]:443")).toEqual({ host: "::1", port: 443, ip: 6 });
    expect(parseAuthority("[::ffff:127.0.0.1]:443").ip).toBe(6);
    expect(parseAuthority("pypi.org.:443").host).toBe("pypi.org.");
    for (const bad of ["pypi.org", "pypi.org:", "pypi.org:0", "pypi.org:70000", "user@pypi.org:443", "[pypi.org]:443", "http://pypi.org:443", "pypi.org:443/x", "a b:443"]) {
      expect(statusOf(() => parseAuthority(bad)), bad).toBe(400);
    }
  });
});

describe("host matching", () => {
  const m = (target: string) => matchHost(INDEX, parseAuthority(target));

  it("allows a listed name on its port, case-insensitively", () => {
    expect(m("pypi.org:443")).toEqual({ host: { name: "pypi.org", port: 443 } });
    expect(m("FILES.PythonHosted.ORG:443")).toMatchObject({ host: { name: "files.pythonhosted.org" } });
  });

  it.each([
    ["pypi.org.evil.com:443", /not a package index/],
    ["evilpypi.org:443", /not a package index/],
    ["org:443", /not a package index/],
    ["pypi.org.:443", /ends with a dot/],
    ["pypi.org:80", /port 80 is not allowed for pypi\.org/],
    ["pypi.org:8443", /port 8443/],
    ["151.101.0.223:443", /is an IP address/],
    ["[2a04:4e42::223]:443", /is an IP address/],
    ["10.1.2.3:443", /is an IP address/],
  ])("refuses %s", (target, reason) => {
    const r = m(target);
    expect("refusal" in r && r.refusal).toMatchObject({ status: 403, rule: "net.package-index" });
    expect("refusal" in r && r.refusal.reason).toMatch(reason);
  });

  it("says what to do in the refusal", () => {
    const r = m("evil.example:443");
    expect("refusal" in r && r.refusal.reason).toBe(
      "evil.example is not a package index in policy network.packageIndex (pypi.org, files.pythonhosted.org, mirror.internal, localhost); ask the operator to list it",
    );
  });
});

describe("address classification", () => {
  it.each([
    ["127.0.0.1", /^loopback/],
    ["127.255.255.254", /^loopback/],
    ["::1", /^loopback/],
    ["0.0.0.0", /^unspecified/],
    ["::", /^unspecified/],
    ["10.0.0.1", /^private/],
    ["172.16.0.1", /^private/],
    ["172.31.255.255", /^private/],
    ["192.168.1.1", /^private/],
    ["100.64.0.1", /CGNAT/],
    ["100.127.255.255", /CGNAT/],
    ["169.254.169.254", /^link-local/],
    ["fe80::1", /^link-local/],
    ["fe80::1%eth0", /^link-local/],
    ["febf::1", /^link-local/],
    ["fd00::1", /^unique-local/],
    ["fc00::1", /^unique-local/],
    ["224.0.0.1", /^multicast/],
    ["ff02::1", /^multicast/],
    ["255.255.255.255", /broadcast/],
    ["::ffff:127.0.0.1", /^loopback.*inside an IPv6/],
    ["::ffff:7f00:1", /^loopback.*inside an IPv6/],
    ["::ffff:10.0.0.1", /^private/],
    ["::ffff:169.254.169.254", /^link-local/],
    ["64:ff9b::a9fe:a9fe", /^link-local/],
    ["2002:7f00:1::", /^loopback.*6to4/],
    ["2002:c0a8:0101::1", /^private.*6to4/],
    ["::127.0.0.1", /IPv4-compatible/],
    ["2001:db8::1", /documentation/],
    ["2001:0:4136:e378::1", /Teredo/],
    ["198.18.0.1", /benchmarking/],
    ["pypi.org", /not an IP address/],
  ])("%s is refused", (address, why) => {
    expect(classifyAddress(address)).toMatch(why);
  });

  it.each(["151.101.0.223", "8.8.8.8", "100.63.255.255", "100.128.0.1", "172.15.255.255", "172.32.0.1", "169.253.0.1", "2a04:4e42::223", "2606:4700::1111", "::ffff:151.101.0.223", "2002:9765:df::1"])(
    "%s is public",
    (address) => {
      expect(classifyAddress(address)).toBeNull();
    },
  );
});

describe("the CONNECT decision", () => {
  const resolver = (table: Record<string, string[]>) => {
    const asked: string[] = [];
    const lookup = async (name: string): Promise<Address[]> => {
      asked.push(name);
      const list = table[name];
      if (!list) throw Object.assign(new Error("not found"), { code: "ENOTFOUND" });
      return list.map((address) => ({ address, family: address.includes(":") ? 6 : 4 }));
    };
    return { asked, lookup };
  };
  const decide = (target: string, r: ReturnType<typeof resolver>) => decideConnect(INDEX, parseAuthority(target), r.lookup);

  it("resolves the listed name itself and allows public addresses", async () => {
    const r = resolver({ "pypi.org": ["151.101.0.223", "2a04:4e42::223"] });
    const d = await decide("PYPI.org:443", r);
    expect(d).toMatchObject({ allow: true, port: 443, pinned: false, host: { name: "pypi.org" } });
    expect(d.allow && d.addresses.map((a) => a.address)).toEqual(["151.101.0.223", "2a04:4e42::223"]);
    expect(r.asked).toEqual(["pypi.org"]);
  });

  it("refuses a name that resolves to any inward address (DNS rebinding, a poisoned resolver)", async () => {
    const r = resolver({ "pypi.org": ["151.101.0.223", "169.254.169.254"], localhost: ["127.0.0.1"] });
    expect(await decide("pypi.org:443", r)).toMatchObject({ allow: false, refusal: { status: 403, rule: RULE_ADDRESS } });
    const local = await decide("localhost:443", r);
    expect(local.allow === false && local.refusal.reason).toMatch(/^localhost resolves to 127\.0\.0\.1, loopback/);
  });

  it("never resolves what is not listed", async () => {
    const r = resolver({});
    for (const t of ["evil.example:443", "127.0.0.1:443", "pypi.org.:443", "pypi.org:80"]) {
      expect((await decide(t, r)).allow).toBe(false);
    }
    expect(r.asked).toEqual([]);
  });

  it("dials a pinned host at the pin, private or not, without resolving", async () => {
    const r = resolver({});
    const d = await decide("mirror.internal:443", r);
    expect(d).toMatchObject({ allow: true, port: 8443, pinned: true, addresses: [{ address: "10.1.2.3", family: 4 }] });
    expect(r.asked).toEqual([]);
    // the pin is for that name only: its address as a CONNECT target is still refused
    expect((await decide("10.1.2.3:8443", r)).allow).toBe(false);
  });

  it("answers 502 for a listed name that does not resolve", async () => {
    const d = await decide("files.pythonhosted.org:443", resolver({}));
    expect(d).toMatchObject({ allow: false, refusal: { status: 502, rule: RULE_UNRESOLVED } });
    expect(d.allow === false && d.refusal.reason).toMatch(/ENOTFOUND/);
  });
});

describe("handleProxyClient", () => {
  /** The proxy behind a loopback listener, a pinned echo upstream, and what was recorded and dialled. */
  async function harness(opts: { pinPort?: number } = {}) {
    const echo = net.createServer((s) => s.pipe(s));
    await new Promise<void>((r) => echo.listen(0, "127.0.0.1", r));
    const echoPort = (echo.address() as net.AddressInfo).port;
    const index: PackageIndexPolicy = { ...INDEX, hosts: [{ name: "mirror.test", port: 443, pin: { address: "127.0.0.1", port: opts.pinPort ?? echoPort } }] };
    const events: Array<Record<string, unknown>> = [];
    const lines: string[] = [];
    const dialled: string[] = [];
    const results: Array<Promise<ProxyResult>> = [];
    const server = net.createServer({ pauseOnConnect: true }, (sock) => {
      results.push(
        handleProxyClient(sock, {
          index,
          now: () => new Date("2026-01-02T03:04:05Z"),
          record: async (event, l) => {
            events.push(event);
            lines.push(...l);
          },
          dial: (address, port) => {
            dialled.push(`${address}:${port}`);
            return net.connect({ host: address, port });
          },
          headTimeoutMs: 300,
        }),
      );
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as net.AddressInfo).port;
    /** sends `request`, then `payload` once answered, and ends once the payload came back (tunnel sockets do not half-close) */
    const talk = (request: string, payload = "") =>
      new Promise<string>((resolve) => {
        const c = net.connect({ host: "127.0.0.1", port });
        let got = "";
        c.on("data", (d: Buffer) => {
          const first = got === "";
          got += d.toString("latin1");
          if (first && payload) c.write(payload);
          if (!payload || got.endsWith(payload)) c.end();
        });
        c.on("close", () => resolve(got));
        c.write(request);
      });
    const close = async () => {
      await new Promise((r) => server.close(r));
      await new Promise((r) => echo.close(r));
    };
    return { events, lines, dialled, results, talk, close, echoPort, port };
  }

  it("tunnels an allowed CONNECT to the pin, records before dialling, and resolves when both sides closed", async () => {
    const h = await harness();
    const got = await h.talk("CONNECT mirror.test:443 HTTP/1.1\r\nHost: mirror.test:443\r\n\r\n", "ping");
    expect(got).toBe("HTTP/1.1 200 Connection established\r\n\r\nping");
    const r = await h.results[0]!;
    expect(r).toEqual({ target: "mirror.test:443", address: `127.0.0.1:${h.echoPort}`, error: null });
    expect(h.dialled).toEqual([`127.0.0.1:${h.echoPort}`]);
    expect(h.events).toEqual([
      expect.objectContaining({ type: "net.proxy", decision: "allow", host: "mirror.test", port: 443, address: `127.0.0.1:${h.echoPort}`, pinned: true }),
    ]);
    expect(h.lines[0]).toMatch(/^\[2026-01-02T03:04:05(\.000)?Z\] \[NET\] \[PROXY\] \[CONNECT mirror\.test:443\] \[ALLOW net\.package-index /);
    await h.close();
  });

  it("answers a refusal with 403 and its reason, records it, and dials nothing", async () => {
    const h = await harness();
    const got = await h.talk("CONNECT evil.test:443 HTTP/1.1\r\n\r\n");
    expect(got).toMatch(/^HTTP\/1\.1 403 sandboxd refused CONNECT evil\.test:443: evil\.test is not a package index [\s\S]*\r\nConnection: close\r\n/);
    const r = await h.results[0]!;
    expect(r.error).toMatch(/^403 net\.package-index: /);
    expect(h.events).toEqual([expect.objectContaining({ type: "net.proxy", decision: "forbid", host: "evil.test", port: 443, rule: "net.package-index" })]);
    expect(h.dialled).toEqual([]);
    // not CONNECT; an oversized head; a connection that says nothing
    expect(await h.talk("GET http://mirror.test/ HTTP/1.1\r\n\r\n")).toMatch(/^HTTP\/1\.1 405 /);
    expect(await h.talk(`CONNECT mirror.test:443 HTTP/1.1\r\nX: ${"a".repeat(9000)}\r\n\r\n`)).toMatch(/^HTTP\/1\.1 431 /);
    expect(await h.talk("CONNECT mirror.test HTTP/1.1\r\n\r\n")).toMatch(/^HTTP\/1\.1 400 sandboxd refused CONNECT mirror\.test HTTP\/1\.1: CONNECT needs host:port/);
    await Promise.all(h.results);
    expect(h.events.map((e) => e.rule)).toEqual(["net.package-index", "net.proxy.request", "net.proxy.request", "net.proxy.request"]);
    expect(h.events.map((e) => e.request)).toEqual(["CONNECT evil.test:443", "GET http://mirror.test/", "?", "CONNECT mirror.test HTTP/1.1"]);
    expect(h.events[1]).toMatchObject({ host: "mirror.test", port: 80, status: 405 });
    expect(h.dialled).toEqual([]);
    await h.close();
  });

  it("answers 502 when the upstream cannot be reached, after recording the allow", async () => {
    const closed = net.createServer();
    await new Promise<void>((r) => closed.listen(0, "127.0.0.1", r));
    const deadPort = (closed.address() as net.AddressInfo).port;
    await new Promise((r) => closed.close(r));
    const h = await harness({ pinPort: deadPort });
    expect(await h.talk("CONNECT mirror.test:443 HTTP/1.1\r\n\r\n")).toMatch(/^HTTP\/1\.1 502 sandboxd could not reach mirror\.test: 127\.0\.0\.1:\d+: ECONNREFUSED/);
    expect((await h.results[0]!).error).toMatch(/^upstream: 127\.0\.0\.1:\d+: ECONNREFUSED/);
    expect(h.events.map((e) => e.decision)).toEqual(["allow"]);
    await h.close();
  });

  it("times out a slow head (408) and records nothing for a connection that says nothing", async () => {
    const h = await harness();
    // connects and closes without a byte
    await new Promise<void>((resolve) => {
      const c = net.connect({ host: "127.0.0.1", port: h.port }, () => c.end());
      c.on("close", () => resolve());
    });
    expect(await h.talk("CONNECT mirror.te")).toMatch(/^HTTP\/1\.1 408 .*no complete request head within 300 ms/);
    const [silent] = await Promise.all(h.results);
    expect(silent!.error).toBe("closed before sending a request");
    expect(h.events.map((e) => e.status)).toEqual([408]);
    await h.close();
  });
});
