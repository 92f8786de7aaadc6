/**
 * The phase container's network namespace, made to account for every TCP
 * connection that is not to a service.
 *
 * A phase container has no interface but loopback (`--network none`, IPv6
 * off), so nothing leaves it; but by itself the kernel refuses stray
 * connections silently: ECONNREFUSED for a loopback port nobody serves,
 * ENETUNREACH for any other address. SKILLS.md's network boundary wants them
 * recorded. From the host (the daemon is root there), inside the container's
 * namespace:
 *
 *   - `ip rule` + a routing table that sends TCP for any address to `lo`
 *     (source 127.0.0.1), so a connection to another host or a host address
 *     is not stopped by routing before netfilter sees it. UDP keeps the
 *     kernel's immediate ENETUNREACH (not recorded).
 *   - one NAT OUTPUT rule: TCP to any address outside 127.0.0.0/8 is
 *     REDIRECTed to 127.0.0.1:<deadPort> (1), where nothing can listen
 *     (the container's ip_unprivileged_port_start is 1024 and no process in
 *     it has CAP_NET_BIND_SERVICE): the kernel answers with a reset, so the
 *     program gets an immediate ECONNREFUSED, as for a closed loopback port.
 *     Loopback itself is left alone: programs in the sandbox may serve each
 *     other there.
 *
 * Loading a NAT table also turns conntrack on in the namespace. A refused
 * attempt's conntrack entry is destroyed as soon as the reset passes (state
 * CLOSE, never ASSURED: the handshake never completed), with the destination
 * the program asked for as its original tuple. RefusalWatch follows those
 * DESTROY events with conntrack-tools (`conntrack -E`, run in the namespace
 * from the host), so the record comes from outside the sandbox. Rules live in
 * the namespace and go with the container.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { createInterface } from "node:readline";
import { promisify } from "node:util";

const run = promisify(execFile);

/** The routing table for TCP (any number not used by the main/local/default tables). */
export const TCP_TABLE = 4343;
const RULE_PREF = 1000;
const COMMAND_TIMEOUT_MS = 10_000;

export interface Confinement {
  /** a port on 127.0.0.1 nothing in the container can listen on (< 1024) */
  deadPort: number;
}

/** The iptables-restore input for the NAT table. Exported for the unit test. */
export function natRules(c: Confinement): string {
  if (!Number.isInteger(c.deadPort) || c.deadPort < 1 || c.deadPort > 1023) {
    throw new Error(`the dead port must be a privileged port (1-1023), got ${c.deadPort}`);
  }
  const lines = [
    "*nat",
    ":PREROUTING ACCEPT [0:0]",
    ":INPUT ACCEPT [0:0]",
    ":OUTPUT ACCEPT [0:0]",
    ":POSTROUTING ACCEPT [0:0]",
    `-A OUTPUT -p tcp ! -d 127.0.0.0/8 -j REDIRECT --to-ports ${c.deadPort}`,
    "COMMIT",
    "",
  ];
  return lines.join("\n");
}

/** The `ip -batch` input: TCP for any address is routed to `lo`, from 127.0.0.1. Exported for the unit test. */
export function routeCommands(): string {
  return [
    `rule add pref ${RULE_PREF} ipproto tcp lookup ${TCP_TABLE}`,
    `route add default dev lo src 127.0.0.1 table ${TCP_TABLE}`,
    "",
  ].join("\n");
}

/**
 * Applies the rules in the namespace of process `pid` (the container's init).
 * Throws with the failing step and its stderr; the caller decides what a
 * failure means (the kernel still refuses every stray connection, unrecorded).
 */
export async function confineNetwork(pid: number, c: Confinement): Promise<void> {
  if (!Number.isInteger(pid) || pid <= 0) throw new Error(`no process for the container's namespace (pid ${pid})`);
  const ns = ["-t", String(pid), "-n", "--"];
  const step = async (what: string, argv: string[], input?: string): Promise<void> => {
    try {
      const child = run("nsenter", [...ns, ...argv], { timeout: COMMAND_TIMEOUT_MS });
      if (input !== undefined) {
        child.child.stdin?.end(input);
      }
      await child;
    } catch (err) {
      const e = err as Error & { stderr?: string; code?: string | number };
      const detail = (e.stderr ?? "").trim() || e.message;
      throw new Error(`${what}: ${detail}`);
    }
  };
  // NAT first: routing TCP to lo without the REDIRECT would make connects hang instead of fail
  await step("iptables-restore (NAT to the dead port)", ["iptables-restore", "-w", "5"], natRules(c));
  await step("ip (TCP to the loopback table)", ["ip", "-batch", "-"], routeCommands());
}

export interface RefusedConnection {
  proto: "tcp";
  /** the address and port the program asked for */
  address: string;
  port: number;
  /** where it came from inside the sandbox */
  sourcePort: number;
}

/**
 * A refused attempt from one line of `conntrack -E -e DESTROY` output, or
 * null for anything else (an accepted connection ending, another protocol):
 *
 *   [DESTROY] tcp 6 120 CLOSE src=127.0.0.1 dst=10.0.0.1 sport=51204 dport=80 [UNREPLIED]
 *     src=127.0.0.1 dst=127.0.0.1 sport=1 dport=51204 id=1353213901
 */
export function parseRefusal(line: string): RefusedConnection | null {
  if (!line.includes("[DESTROY]") || line.includes("[ASSURED]")) return null;
  const fields = line.trim().split(/\s+/);
  if (fields[1] !== "tcp") return null;
  const first: Record<string, string> = {};
  for (const f of fields.slice(2)) {
    const eq = f.indexOf("=");
    if (eq <= 0) continue;
    const k = f.slice(0, eq);
    if (k in first) break; // the reply direction starts
    first[k] = f.slice(eq + 1);
  }
  const port = Number(first.dport);
  const sourcePort = Number(first.sport);
  if (!first.dst || !/^[0-9.]+$/.test(first.dst) || !Number.isInteger(port) || port < 0 || port > 65535) return null;
  return { proto: "tcp", address: first.dst, port, sourcePort: Number.isInteger(sourcePort) ? sourcePort : 0 };
}

const PROBE_INTERVAL_MS = 50;
/**
 * Where the readiness probe connects: on loopback (all of 127.0.0.0/8 is
 * local, so the dead port answers with a reset there too) but not 127.0.0.1,
 * so its refusals are told apart from a program's. A program connecting to
 * exactly this address and port goes unrecorded; nothing is lost by it.
 */
export const PROBE_ADDRESS = "127.83.66.88";

/**
 * Follows refused TCP connections in the namespace of `pid`. `ready()`
 * resolves once events are really flowing: it provokes refused connections
 * to 127.0.0.1:<deadPort> from the host side until the watch reports one,
 * so nothing a command does afterwards can be missed.
 */
export class RefusalWatch {
  private child: ChildProcess | null;
  private stopped = false;
  private probing: ((c: RefusedConnection) => boolean) | null = null;

  constructor(
    private readonly pid: number,
    private readonly deadPort: number,
    onRefused: (c: RefusedConnection) => void,
    /** the watch ended on its own (its process failed or exited) */
    private readonly onEnd: (why: string) => void,
    /** conntrack says it lost events (ENOBUFS): some refusals went unrecorded */
    onLoss: (what: string) => void = () => undefined,
  ) {
    // setpriv --pdeathsig: the watch dies with the daemon, even a SIGKILLed one (it
    // would otherwise keep the namespace alive after the container is gone)
    const argv = ["--pdeathsig", "SIGKILL", "--", "nsenter", "-t", String(pid), "-n", "--", "conntrack", "-E", "-e", "DESTROY", "-p", "tcp", "--buffer-size", String(4 << 20)];
    const child = spawn("setpriv", argv, {
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.child = child;
    let stderr = "";
    child.stderr!.on("data", (b: Buffer) => {
      const text = b.toString("utf8");
      stderr = (stderr + text).slice(-2000);
      if (/ENOBUFS|losing events/i.test(text)) onLoss(text.trim().split("\n")[0]!.slice(0, 300));
    });
    createInterface({ input: child.stdout! }).on("line", (line) => {
      const c = parseRefusal(line);
      if (!c) return;
      if (this.probing?.(c)) return;
      onRefused(c);
    });
    child.once("error", (err) => this.end(`conntrack: ${err.message}`));
    child.once("exit", (code, signal) => this.end(`conntrack exited (${signal ?? code})${stderr.trim() ? `: ${stderr.trim()}` : ""}`));
  }

  async ready(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let seen = false;
    // the probe's own attempts, to an address of its own on loopback (whatever the source port)
    this.probing = (c) => {
      if (c.address !== PROBE_ADDRESS || c.port !== this.deadPort) return false;
      seen = true;
      return true;
    };
    while (!seen) {
      if (this.stopped) throw new Error("the conntrack watch ended before it was ready");
      if (Date.now() > deadline) throw new Error(`the conntrack watch reported nothing within ${timeoutMs} ms`);
      // eslint-disable-next-line no-restricted-syntax -- the probe connection is meant to be refused; what counts is the event it makes
      await run("nsenter", ["-t", String(this.pid), "-n", "--", "bash", "-c", `exec 3<>/dev/tcp/${PROBE_ADDRESS}/${this.deadPort}`], { timeout: 2_000 }).catch(() => undefined);
      if (!seen) await new Promise((r) => setTimeout(r, PROBE_INTERVAL_MS));
    }
  }

  stop(): void {
    this.stopped = true;
    this.child?.kill("SIGTERM");
    this.child = null;
  }

  private end(why: string): void {
    if (this.stopped) return;
    this.stopped = true;
    this.child = null;
    this.onEnd(why);
  }
}
