/**
 * A fake ContainerRuntime and a scripted shim, for unit tests of the phase
 * state machine and reconcile. The "container" is a record in a map; its
 * "shim" is a real client on the phase's real control socket that says hello
 * with the token the runtime was given, and answers each exec as the script
 * says. Everything else — the store, the journal, the recorder, the tunnel
 * server — is the real thing in a temp dir.
 */
import { chown, mkdtemp, readFile, rm } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { Readable } from "node:stream";
import pino from "pino";
import { AuditJournal, JOURNAL_FILE } from "../../src/audit/journal.js";
import { ApprovalQueue } from "../../src/approvals/queue.js";
import { PhaseManager, type ManagerOptions } from "../../src/phases/manager.js";
import { initShellParser, loadPolicy, type Policy } from "../../src/policy/index.js";
import type { ContainerRuntime, ContainerState, ContainerSummary, MemoryProbe, PhaseContainerSpec } from "../../src/runtime/types.js";
import {
  FrameDecoder,
  FrameKind,
  PROTOCOL_VERSION,
  SHIM_ENV,
  daemonToShimSchema,
  encodeFrame,
  encodeMessage,
  type DaemonToShim,
  type ExecMessage,
} from "../../src/shim/protocol.js";
import { systemClock } from "../../src/util/clock.js";
import { ROOT } from "./sandbox.js";

/** How the fake shim answers one exec: output then an exit, or nothing (a shim that hangs). */
export type ExecScript = (msg: ExecMessage, shim: FakeShim) => void;

export const echoScript: ExecScript = (msg, shim) => {
  shim.send({ type: "started", execId: msg.execId, pid: 100 + msg.execId });
  shim.output(msg.execId, "stdout", msg.argv.slice(1).join(" ") + "\n");
  shim.send({ type: "exit", execId: msg.execId, exitCode: 0, signal: null, timedOut: false, durationMs: 1 });
};

export class FakeShim {
  readonly received: DaemonToShim[] = [];
  private sock: net.Socket | null = null;
  constructor(
    readonly socketPath: string,
    readonly token: string,
    public script: ExecScript = echoScript,
  ) {}

  connect(): Promise<void> {
    return new Promise((resolve, reject) => {
      const sock = net.connect(this.socketPath);
      this.sock = sock;
      const decoder = new FrameDecoder();
      sock.once("error", reject);
      sock.on("connect", () => {
        sock.off("error", reject);
        sock.on("error", () => undefined);
        this.send({ type: "hello", protocol: PROTOCOL_VERSION, token: this.token, pid: 7, node: process.version, running: [], features: ["owner"] });
        resolve();
      });
      sock.on("data", (chunk: Buffer) => {
        for (const f of decoder.push(chunk)) {
          const msg = daemonToShimSchema.parse(JSON.parse(f.payload.toString("utf8")));
          this.received.push(msg);
          if (msg.type === "exec") this.script(msg, this);
          if (msg.type === "shutdown") sock.end();
        }
      });
    });
  }

  get connected(): boolean {
    return this.sock !== null && !this.sock.destroyed;
  }

  send(msg: Parameters<typeof encodeMessage>[0]): void {
    this.sock?.write(encodeMessage(msg));
  }

  output(execId: number, stream: "stdout" | "stderr", text: string): void {
    this.sock?.write(encodeFrame(stream === "stdout" ? FrameKind.Stdout : FrameKind.Stderr, execId, Buffer.from(text)));
  }

  destroy(): void {
    this.sock?.destroy();
  }
}

interface FakeContainer {
  id: string;
  name: string;
  labels: Record<string, string>;
  running: boolean;
  state: string;
  spec: PhaseContainerSpec | null;
  shim: FakeShim | null;
}

/** Which runtime call should fail (once each time it is set) or wait for the test. */
export interface FakeFaults {
  runPhaseContainer?: Error;
  stopAndRemove?: Error;
  /** the shim does not connect (waitReady times out) */
  noShim?: boolean;
  /** runPhaseContainer waits for this before it returns */
  gateRun?: Promise<void>;
}

export class FakeRuntime implements ContainerRuntime {
  readonly containers = new Map<string, FakeContainer>();
  readonly calls: string[] = [];
  faults: FakeFaults = {};
  logText = "a line of container log\n";
  private next = 1;

  async ping(): Promise<void> {}
  async imageExists(): Promise<boolean> {
    return true;
  }
  async imageId(ref: string): Promise<string | null> {
    return `sha256:fake-${ref}`;
  }

  async runPhaseContainer(spec: PhaseContainerSpec): Promise<string> {
    this.calls.push(`run ${spec.name}`);
    if (this.faults.gateRun) await this.faults.gateRun;
    if (this.faults.runPhaseContainer) throw this.faults.runPhaseContainer;
    const id = `c${String(this.next++).padStart(63, "0")}`;
    const c: FakeContainer = { id, name: spec.name, labels: spec.labels, running: true, state: "running", spec, shim: null };
    this.containers.set(id, c);
    if (!this.faults.noShim) {
      // like a real container, it does not wait for its shim: the shim connects (or not) on its own
      c.shim = new FakeShim(path.join(spec.runDir, "control.sock"), spec.env[SHIM_ENV.token]!);
      c.shim.connect().catch(() => undefined);
    }
    return id;
  }

  async stopAndRemove(id: string): Promise<void> {
    this.calls.push(`remove ${id.slice(0, 8)}`);
    if (this.faults.stopAndRemove) throw this.faults.stopAndRemove;
    const c = this.containers.get(id);
    c?.shim?.destroy();
    this.containers.delete(id);
  }

  async list(filter: Record<string, string>): Promise<ContainerSummary[]> {
    return [...this.containers.values()]
      .filter((c) => Object.entries(filter).every(([k, v]) => c.labels[k] === v))
      .map((c) => ({ id: c.id, name: c.name, labels: c.labels, running: c.running, state: c.state }));
  }

  async logs(): Promise<Readable> {
    return Readable.from([Buffer.from(this.logText)]);
  }

  async inspect(id: string): Promise<ContainerState | null> {
    const c = this.containers.get(id);
    return c ? { running: c.running, status: c.state, exitCode: c.running ? null : 137, oomKilled: false } : null;
  }

  /** The container dies (docker kill): its shim's link closes. */
  kill(id: string): void {
    const c = this.containers.get(id)!;
    c.running = false;
    c.state = "exited";
    c.shim?.destroy();
  }

  async containerPid(): Promise<number> {
    throw new Error("a fake container has no pid");
  }

  async pause(id: string): Promise<void> {
    this.calls.push(`pause ${id.slice(0, 8)}`);
    const c = this.containers.get(id);
    if (c) c.state = "paused";
  }

  async unpause(id: string): Promise<void> {
    this.calls.push(`unpause ${id.slice(0, 8)}`);
    const c = this.containers.get(id);
    if (c?.state === "paused") c.state = "running";
  }

  async isPaused(id: string): Promise<boolean> {
    return this.containers.get(id)?.state === "paused";
  }

  /** scripted memory probes, by container id (none: the phase runs without a resource watch) */
  readonly probes = new Map<string, MemoryProbe>();
  /** a probe set before the container exists: given to the next container run */
  nextProbe: MemoryProbe | null = null;

  async memoryProbe(id: string): Promise<MemoryProbe | null> {
    if (this.nextProbe && !this.probes.has(id)) {
      this.probes.set(id, this.nextProbe);
      this.nextProbe = null;
    }
    return this.probes.get(id) ?? null;
  }

  /** A container as a previous daemon left it (for reconcile). */
  add(c: Omit<FakeContainer, "id" | "spec" | "shim"> & { id?: string }): FakeContainer {
    const id = c.id ?? `c${String(this.next++).padStart(63, "0")}`;
    const full: FakeContainer = { ...c, id, spec: null, shim: null };
    this.containers.set(id, full);
    return full;
  }

  /** The container's "shim" connects (again), as a real one does after a daemon restart. */
  async reconnect(id: string, socketPath: string, token: string): Promise<FakeShim> {
    const c = this.containers.get(id)!;
    c.shim = new FakeShim(socketPath, token);
    await c.shim.connect();
    return c.shim;
  }

  shimOf(containerId: string | null): FakeShim | null {
    return containerId ? (this.containers.get(containerId)?.shim ?? null) : null;
  }
}

export interface Harness {
  dir: string;
  stateDir: string;
  project: string;
  runtime: FakeRuntime;
  manager: PhaseManager;
  journal: AuditJournal;
  approvals: ApprovalQueue;
  /** the journal's records, parsed */
  records(): Promise<Array<Record<string, unknown>>>;
  /**
   * A new manager on the same state dir, as a restarted daemon builds it. The
   * old one is left as a killed daemon leaves things: it does nothing more
   * (its links stay open, nobody uses them).
   */
  restart(): Promise<PhaseManager>;
  close(): Promise<void>;
}

let policy: Policy | null = null;

export async function harness(opts: Partial<ManagerOptions> = {}): Promise<Harness> {
  await initShellParser();
  policy ??= await loadPolicy(path.join(ROOT, "policies", "default.yaml"));
  const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-fake-"));
  const stateDir = path.join(dir, "state");
  const project = await mkdtemp(path.join(dir, "proj-"));
  // commands run as the project's owner, and root-owned projects are refused
  await chown(project, 1000, 1000);
  const runtime = new FakeRuntime();
  const { mkdir } = await import("node:fs/promises");
  await mkdir(stateDir, { recursive: true });
  const journal = await AuditJournal.open(stateDir, { clock: systemClock });
  const approvals = await ApprovalQueue.open(stateDir, systemClock);
  const make = () =>
    new PhaseManager({
      runtime,
      stateDir,
      instance: "0123456789abcdef",
      image: "fake:image",
      log: pino({ level: "silent" }),
      clock: systemClock,
      ids: {
        phaseId: () => `ph_${Math.floor(Math.random() * 2 ** 48).toString(16).padStart(12, "0")}`,
        token: () => "t".repeat(64),
      },
      shimConnectTimeoutMs: 2_000,
      approvals,
      journal,
      policy: () => policy!,
      buildLogLocation: "state",
      ...opts,
    });
  const old: PhaseManager[] = [];
  const orphans: FakeShim[] = [];
  const h: Harness = {
    dir,
    stateDir,
    project,
    runtime,
    manager: make(),
    journal,
    approvals,
    async records() {
      const text = await readFile(path.join(stateDir, JOURNAL_FILE), "utf8").catch(() => "");
      return text
        .split("\n")
        .filter(Boolean)
        .map((l) => JSON.parse(l) as Record<string, unknown>);
    },
    async restart() {
      old.push(h.manager);
      // the dead daemon's links stay open (nobody reads them); the new daemon's
      // stops must not close them, or the old manager would react
      for (const c of runtime.containers.values()) {
        if (c.shim) orphans.push(c.shim);
        c.shim = null;
      }
      h.manager = make();
      return h.manager;
    },
    async close() {
      for (const m of [h.manager, ...old]) await m.shutdown().catch(() => undefined);
      for (const c of runtime.containers.values()) c.shim?.destroy();
      for (const shim of orphans) shim.destroy();
      await journal.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
  return h;
}
