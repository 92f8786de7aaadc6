/**
 * The pure parts of src/runtime/netns.ts: the NAT rules and the parsing of
 * conntrack's DESTROY events (lines as conntrack-tools 1.4.7 prints them).
 */
import { describe, expect, it } from "vitest";
import { natRules, parseRefusal, routeCommands, TCP_TABLE } from "../../src/runtime/netns.js";

describe("natRules", () => {
  it("redirects TCP to anything outside loopback to the dead port, and nothing else", () => {
    const rules = natRules({ deadPort: 1 });
    expect(rules.split("\n")).toEqual([
      "*nat",
      ":PREROUTING ACCEPT [0:0]",
      ":INPUT ACCEPT [0:0]",
      ":OUTPUT ACCEPT [0:0]",
      ":POSTROUTING ACCEPT [0:0]",
      "-A OUTPUT -p tcp ! -d 127.0.0.0/8 -j REDIRECT --to-ports 1",
      "COMMIT",
      "",
    ]);
  });

  it("refuses a dead port something in the sandbox could listen on", () => {
    expect(() => natRules({ deadPort: 1024 })).toThrow(/privileged port/);
    expect(() => natRules({ deadPort: 0 })).toThrow(/privileged port/);
    expect(() => natRules({ deadPort: 1.5 })).toThrow(/privileged port/);
  });
});

describe("routeCommands", () => {
  it("sends TCP (only) for any address to lo, from 127.0.0.1, in a table of its own", () => {
    expect(routeCommands().split("\n")).toEqual([
      `rule add pref 1000 ipproto tcp lookup ${TCP_TABLE}`,
      `route add default dev lo src 127.0.0.1 table ${TCP_TABLE}`,
      "",
    ]);
  });
});

describe("parseRefusal", () => {
  it("reads the destination the program asked for from a redirected attempt", () => {
    const line =
      "[DESTROY] tcp      6 120 CLOSE src=127.0.0.1 dst=10.0.0.1 sport=51204 dport=80 [UNREPLIED] src=127.0.0.1 dst=127.0.0.1 sport=1 dport=51204 id=1353213901";
    expect(parseRefusal(line)).toEqual({ proto: "tcp", address: "10.0.0.1", port: 80, sourcePort: 51204 });
  });

  it("reads a refused loopback port", () => {
    const line =
      "[DESTROY] tcp      6 120 CLOSE src=127.0.0.1 dst=127.0.0.1 sport=45920 dport=5433 [UNREPLIED] src=127.0.0.1 dst=127.0.0.1 sport=5433 dport=45920 id=312441640";
    expect(parseRefusal(line)).toEqual({ proto: "tcp", address: "127.0.0.1", port: 5433, sourcePort: 45920 });
  });

  it("ignores connections that were accepted, other events and other protocols", () => {
    expect(
      parseRefusal(
        "[DESTROY] tcp      6 TIME_WAIT src=127.0.0.1 dst=127.0.0.1 sport=47350 dport=8765 src=127.0.0.1 dst=127.0.0.1 sport=8765 dport=47350 [ASSURED] id=98284689",
      ),
    ).toBeNull();
    expect(
      parseRefusal("    [NEW] tcp      6 120 SYN_SENT src=127.0.0.1 dst=10.0.0.1 sport=51204 dport=80 [UNREPLIED] src=127.0.0.1 dst=127.0.0.1 sport=1 dport=51204"),
    ).toBeNull();
    expect(parseRefusal("[DESTROY] udp      17 src=127.0.0.1 dst=8.8.8.8 sport=5000 dport=53 [UNREPLIED] src=8.8.8.8 dst=127.0.0.1 sport=53 dport=5000")).toBeNull();
    expect(parseRefusal("conntrack v1.4.7 (conntrack-tools): 5 flow events have been shown.")).toBeNull();
    expect(parseRefusal("")).toBeNull();
  });

  it("takes the original direction, not the reply", () => {
    const c = parseRefusal("[DESTROY] tcp 6 CLOSE src=127.0.0.1 dst=172.17.0.1 sport=40000 dport=22 src=127.0.0.1 dst=127.0.0.1 sport=1 dport=40000");
    expect(c).toMatchObject({ address: "172.17.0.1", port: 22 });
  });
});
