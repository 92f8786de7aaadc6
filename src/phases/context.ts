/**
 * What the phase modules share: the daemon's options, the store, the registry
 * of live phases and the few helpers every one of them needs. One object,
 * passed to lifecycle, exec, network and reconcile, so none of them keeps
 * state of its own.
 */
import type { Logger } from "pino";
import { BuildLogRegistry, type BuildLog } from "../audit/buildlog.js";
import type { AuditJournal } from "../audit/journal.js";
import { Redactor, findSecrets, secretsFromDotenv, variants, type LogSecrets } from "../audit/redact.js";
import type { ApprovalQueue } from "../approvals/queue.js";
import { SandboxdError } from "../errors.js";
import type { PhaseServices } from "../net/services.js";
import type { StrayConnections } from "../net/stray.js";
import type { TunnelServer } from "../net/tunnels.js";
import { combine, type Policy } from "../policy/index.js";
import type { PhaseLimits } from "../policy/limits.js";
import type { RefusalWatch } from "../runtime/netns.js";
import type { ContainerRuntime } from "../runtime/types.js";
import type { Clock, IdSource } from "../util/clock.js";
import { commandEnv } from "./project.js";
import { PhaseRecorder } from "./recorder.js";
import type { ShimChannel } from "./shim-channel.js";
import { PhaseStore } from "./store.js";
import type { PhaseRecord, PhaseView } from "./types.js";

export interface ManagerOptions {
  runtime: ContainerRuntime;
  stateDir: string;
  instance: string;
  image: string;
  log: Logger;
  clock: Clock;
  ids: IdSource;
  shimConnectTimeoutMs?: number;
  /** operator's additions to the whitelist (settings.extraAllow) */
  extraAllow?: readonly string[];
  approvals: ApprovalQueue;
  /** the hash-chained audit.jsonl: every decision is recorded here before it is acted on */
  journal: AuditJournal;
  /** the daemon's policy; a getter, so a reload (SIGHUP) applies to the next decision */
  policy: () => Policy;
  /** where build_audit.log lives: the project root (default, mounted read-only in the sandbox) or the state dir */
  buildLogLocation?: "project" | "state";
  /** service URLs overriding the project's .env (settings.serviceOverrides) */
  serviceOverrides?: Readonly<Record<string, string>>;
  /** the daemon log's scrubber: each live phase's secrets are registered here */
  logSecrets?: LogSecrets;
}

/** A phase this daemon supervises: its record and everything it holds while it lives. */
export interface LivePhase {
  record: PhaseRecord;
  channel: ShimChannel | null;
  rec: PhaseRecorder;
  /** the phase's own stricter policy, if any (combined with the daemon's at each decision) */
  phasePolicy: Policy | null;
  /**
   * the project's .env, passed to every command (SKILLS.md Credential Handling: "Read: Environment variables from .env"),
   * with the service URLs replaced by their password-less tunnel URLs (src/net/services.ts)
   */
  dotenv: Record<string, string>;
  /* --- service tunnels (src/net) --- */
  services: PhaseServices;
  tunnels: TunnelServer | null;
  /** connections to destinations that are not services: refused by the kernel, recorded from the conntrack watch */
  stray: StrayConnections | null;
  watch: RefusalWatch | null;
}

export class PhaseContext {
  readonly phases = new Map<string, LivePhase>();
  readonly store: PhaseStore;
  readonly buildLogs = new BuildLogRegistry();
  readonly extraAllow: ReadonlySet<string>;
  readonly connectTimeoutMs: number;
  shuttingDown = false;

  constructor(readonly opts: ManagerOptions) {
    this.store = new PhaseStore(opts.stateDir);
    this.extraAllow = new Set(opts.extraAllow ?? []);
    this.connectTimeoutMs = opts.shimConnectTimeoutMs ?? 30_000;
  }

  get log(): Logger {
    return this.opts.log;
  }

  /** The effective policy: the daemon's, narrowed by the phase's own when it has one. */
  policyFor(phasePolicy: Policy | null): Policy {
    const base = this.opts.policy();
    return phasePolicy ? combine(base, phasePolicy) : base;
  }

  limitsOf(live: LivePhase): PhaseLimits {
    return this.policyFor(live.phasePolicy).limits[live.record.mode];
  }

  recorder(record: PhaseRecord, log: BuildLog, envText: string, env: Record<string, string>): PhaseRecorder {
    // Every value the commands get that could be a secret is scrubbed from every record.
    const findings = [...secretsFromDotenv(envText), ...findSecrets(commandEnv(record, env), "env")];
    const secrets = new Set<string>();
    for (const f of findings) for (const v of variants(f.value)) secrets.add(v);
    const redactor = new Redactor(secrets, {
      onWarning: (m) => this.opts.log.warn({ phase: record.id }, m),
    });
    // the daemon's own log is scrubbed of them too, while the phase lives
    this.opts.logSecrets?.add(record.id, redactor);
    return new PhaseRecorder(record.id, this.opts.journal, log, redactor);
  }

  view(record: PhaseRecord): PhaseView {
    return { ...record, runningExecs: this.phases.get(record.id)?.channel?.runningExecs ?? 0 };
  }

  async get(id: string): Promise<PhaseView> {
    const live = this.phases.get(id);
    if (live) return this.view(live.record);
    const { records } = await this.store.loadAll();
    const r = records.find((x) => x.id === id);
    if (!r) throw notFound(id);
    return this.view(r);
  }

  assertServing(): void {
    if (this.shuttingDown) throw new SandboxdError("SBX_ERR_SHUTTING_DOWN", "the daemon is shutting down");
    // Fail closed: nothing is done that cannot be recorded.
    const failed = this.opts.journal.failed;
    if (failed) throw failed;
  }

  async running(id: string): Promise<LivePhase> {
    const live = this.phases.get(id);
    if (live && live.record.state === "running") return live;
    const view = await this.get(id);
    throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} is ${view.state}, not running`);
  }
}

export function notFound(id: string): SandboxdError {
  return new SandboxdError("SBX_ERR_PHASE_NOT_FOUND", `no phase with id ${id}`);
}
