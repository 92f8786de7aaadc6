/**
 * The console's listen address (`--console HOST:PORT`, SANDBOXD_CONSOLE).
 * Loopback only: the console can approve commands and stop phases, and its
 * one defence beyond the token is that nobody off this machine can connect.
 * An operator elsewhere forwards the port over SSH.
 */
import net from "node:net";
import { SandboxdError } from "../errors.js";

export interface ConsoleAddress {
  /** the address bound: 127.x.y.z or ::1 */
  host: string;
  /** 0 lets the kernel choose a free port (the printed URL names the one chosen) */
  port: number;
}

function refuse(spec: string, why: string): never {
  throw new SandboxdError("SBX_ERR_CONSOLE_ADDRESS", `console address ${JSON.stringify(spec.slice(0, 100))}: ${why}`);
}

/** Is this literal address a loopback one? (127.0.0.0/8, ::1, and 127/8 mapped into IPv6) */
export function isLoopback(host: string): boolean {
  if (net.isIPv4(host)) return host.split(".")[0] === "127";
  if (net.isIPv6(host)) {
    const h = host.toLowerCase();
    if (h === "::1" || h === "0:0:0:0:0:0:0:1") return true;
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(h);
    return mapped ? isLoopback(mapped[1]!) : false;
  }
  return false;
}

/** "127.0.0.1:8470", "[::1]:8470", "localhost:8470" (= 127.0.0.1) or a bare port (= 127.0.0.1). */
export function parseConsoleAddress(spec: string): ConsoleAddress {
  const s = spec.trim();
  let host: string;
  let portText: string;
  const v6 = /^\[([^\]]+)\]:(\d+)$/.exec(s);
  if (v6) {
    host = v6[1]!;
    portText = v6[2]!;
  } else if (/^\d+$/.test(s)) {
    host = "127.0.0.1";
    portText = s;
  } else {
    const i = s.lastIndexOf(":");
    if (i <= 0) refuse(spec, "expected HOST:PORT");
    host = s.slice(0, i);
    portText = s.slice(i + 1);
    if (host.includes(":")) refuse(spec, "write an IPv6 address in brackets, e.g. [::1]:8470");
  }
  if (!/^\d{1,5}$/.test(portText) || Number(portText) > 65535) refuse(spec, "the port must be a number from 0 to 65535");
  if (host.toLowerCase() === "localhost") host = "127.0.0.1";
  if (!net.isIP(host)) refuse(spec, "give a literal loopback address (127.0.0.1 or ::1), not a name");
  if (!isLoopback(host)) refuse(spec, "the console listens on loopback addresses only (127.0.0.0/8 or ::1)");
  return { host, port: Number(portText) };
}
