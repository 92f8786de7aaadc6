/**
 * What the phase modules share: the daemon's options, the store, the registry
 * of live phases and the few helpers every one of them needs. One object,
 * passed to lifecycle, exec, network and reconcile, so none of them keeps
 * state of its own.
 */
import { readFile } from "node:fs/promises";
import { createHash } from "node:crypto";
import path from "node:path";
import type { Logger } from "pino";
import { BuildLogRegistry, type BuildLog } from "../audit/buildlog.js";
import type { AuditJournal } from "../audit/journal.js";
import { Redactor, findSecrets, secretsFromDotenv, variants, type LogSecrets } from "../audit/redact.js";
import type { GrantStore } from "../approvals/grants.js";
import type { Notify } from "../approvals/notify.js";
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
import { FailFastState, type LimitReached } from "./failfast.js";
import { commandEnv } from "./project.js";
import { PhaseRecorder } from "./recorder.js";
import type { PhaseResources } from "./resources.js";
import { RunTable } from "./runs.js";
import type { ShimChannel } from "./shim-channel.js";
import { PhaseStore } from "./store.js";
import { WarmPool } from "./pool.js";
import { SpareLayer } from "../workspace/spare.js";
import type { PhaseRecord, PhaseView } from "./types.js";
import type { PhaseWorkspace } from "../workspace/index.js";
import { ProjectPackages } from "../workspace/packages.js";

export interface ManagerOptions {
  runtime: ContainerRuntime;
  stateDir: string;
  instance: string;
  image: string;
  log: Logger;
  clock: Clock;
  ids: IdSource;
  shimConnectTimeoutMs?: number;
  /** the shim logs each exec's start and exit (the daemon's own log level is debug or trace) */
  shimDebugLog?: boolean;
  /** operator's additions to the whitelist (settings.extraAllow) */
  extraAllow?: readonly string[];
  approvals: ApprovalQueue;
  /** standing approvals (src/approvals/grants.ts); none: every ask goes to a person */
  grants?: GrantStore;
  /** tells a person that a new request waits (src/approvals/notify.ts) */
  notify?: Notify | undefined;
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
  /**
   * warm pool containers kept per key (src/phases/pool.ts; settings.poolSize);
   * 0 or absent: every phase starts cold
   */
  poolSize?: number;
  /** seconds a pool slot waits for a claim before it is replaced (settings.poolMaxAgeSeconds; default 1800) */
  poolMaxAgeSeconds?: number;
  /**
   * false: no spare layer disk is kept (src/workspace/spare.ts), every cold
   * start makes its own; default true
   */
  spareLayer?: boolean;
  /**
   * false only for the benchmark's side-by-side run (SANDBOXD_BENCH_NO_FAILFAST=1): no
   * category, count or pytest report for commands, no resource watch. Default true.
   */
  failFast?: boolean;
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
  /** the fail-fast counters (src/phases/failfast.ts); in memory: a re-adopted phase starts them again */
  failFast: FailFastState;
  /** the container is paused (escalated, or paused by a person): thawed before it is stopped */
  frozen: boolean;
  /** a limit reached while commands ran (escalation.ts recordAttempt): the phase escalates when the next command ends */
  pendingEscalation?: LimitReached | null;
  /** the resource watch (./resources.ts): memory, OOM kills, the container's end; null when the cgroup cannot be read */
  resources?: PhaseResources | null;
  /**
   * a phase re-adopted frozen (escalated or paused when the daemon restarted): its
   * shim cannot reconnect until the container thaws, so resume finishes the re-adoption
   */
  reattach?: (() => Promise<void>) | null;
  /** the container's first process, as the host sees it (cached for the JUnit read) */
  pid?: number;
  /** the change layer over the project and its iterations (src/workspace) */
  workspace: PhaseWorkspace | null;
  /** the phase's end, once something began it (lifecycle.ts endPhase): later callers wait for it */
  ending: Promise<void> | null;
  /** the phase counts as a user of its project's package disk (src/workspace/packages.ts): released at its end */
  packagesHeld?: boolean;
}

export class PhaseContext {
  readonly phases = new Map<string, LivePhase>();
  /**
   * Starts in their first steps: the phase's record exists (it is listed,
   * `starting`) but it is not live yet — its start record is being made.
   * Settles once it is live or gone; a stop waits for it (lifecycle.ts).
   */
  readonly opening = new Map<string, Promise<void>>();
  /** every command running now, by its id (runs.ts) */
  readonly runs = new RunTable();
  /** every exec call not yet answered (a planned restart waits for their records: detach.ts) */
  readonly inflight = new Set<Promise<unknown>>();
  /**
   * Starts past their `assertServing` gate: a shutdown that began meanwhile
   * did not see their phase (not yet in `phases`), so it waits for them and
   * ends what they made (lifecycle.ts shutdown).
   */
  readonly starts = new Set<Promise<unknown>>();

  track<T>(p: Promise<T>): Promise<T> {
    this.inflight.add(p);
    const done = () => void this.inflight.delete(p);
    p.then(done, done);
    return p;
  }
  readonly store: PhaseStore;
  readonly buildLogs: BuildLogRegistry;
  readonly extraAllow: ReadonlySet<string>;
  readonly connectTimeoutMs: number;
  /** each project's package environment, kept across its phases */
  readonly packages: ProjectPackages;
  /** containers made ahead of the phases that will claim them (./pool.ts) */
  readonly pool: WarmPool;
  /** one phase's layer disk made ahead, for the next cold start (src/workspace/spare.ts) */
  readonly spare: SpareLayer;
  shuttingDown = false;

  constructor(readonly opts: ManagerOptions) {
    this.store = new PhaseStore(opts.stateDir);
    // rotated build logs go to the state dir: next to a state-dir log, or under rotated/ for a project's
    this.buildLogs = new BuildLogRegistry((file) => ({
      ...opts.policy().audit.buildLog,
      dir: file.startsWith(path.join(opts.stateDir, "phases") + path.sep) ? path.dirname(file) : rotatedDir(opts.stateDir, file),
    }));
    this.extraAllow = new Set(opts.extraAllow ?? []);
    this.connectTimeoutMs = opts.shimConnectTimeoutMs ?? 30_000;
    this.packages = new ProjectPackages(opts.stateDir);
    this.pool = new WarmPool(this, opts.poolSize ?? 0, (opts.poolMaxAgeSeconds ?? 1800) * 1000);
    this.spare = new SpareLayer({
      dir: path.join(opts.stateDir, "spare-layer"),
      enabled: opts.spareLayer !== false,
      budgetBytes: () => opts.policy().workspace.disk.layerBytes,
      warn: (msg, err) => opts.log.warn({ err: err.message }, msg),
    });
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
    return new PhaseRecorder(record.id, this.opts.journal, log, redactor, {
      // the policy of the moment (a reload applies), narrowed by the phase's own
      audit: () => this.policyFor(this.phases.get(record.id)?.phasePolicy ?? null).audit,
      clock: this.opts.clock,
      onSpent: (why) => this.opts.log.warn({ phase: record.id, why }, "phase spent its audit budget; it takes no new work"),
    });
  }

  view(record: PhaseRecord): PhaseView {
    const live = this.phases.get(record.id);
    const view: PhaseView = { ...record, runningExecs: live?.channel?.runningExecs ?? 0 };
    if (live?.workspace) view.workspace = live.workspace.summary();
    return view;
  }

  async get(id: string): Promise<PhaseView> {
    const live = this.phases.get(id);
    if (live) return this.view(live.record);
    const { records } = await this.store.loadAll();
    const r = records.find((x) => x.id === id);
    if (!r) throw notFound(id);
    const view = this.view(r);
    // an ended phase's iterations, as it left them
    try {
      const kept = JSON.parse(await readFile(this.store.iterationsPath(id), "utf8")) as { iterations: Array<{ state: string }>; failedIterations: number };
      const count = (s: string) => kept.iterations.filter((i) => i.state === s).length;
      view.workspace = { accepted: count("accepted"), rejected: count("rejected"), pending: count("pending"), failed: kept.failedIterations, iterations: kept.iterations };
    } catch {
      /* no iterations */
    }
    return view;
  }

  assertServing(): void {
    if (this.shuttingDown) throw new SandboxdError("SBX_ERR_SHUTTING_DOWN", "the daemon is shutting down");
    // Fail closed: nothing is done that cannot be recorded.
    const failed = this.opts.journal.failed;
    if (failed) throw failed;
  }

  /**
   * The gate of every mutating call on a phase: a running phase passes; an
   * escalated or paused one answers 423 naming its report or its pause.
   */
  async running(id: string): Promise<LivePhase> {
    const live = this.phases.get(id);
    if (live && live.record.state === "running") return live;
    if (live?.record.state === "escalated") {
      const e = live.record.escalations?.at(-1);
      throw new SandboxdError(
        "SBX_ERR_PHASE_ESCALATED",
        `phase ${id} is escalated (fail-fast: ${e?.summary ?? "limit reached"}); nothing runs until a person decides. Report: ${e?.report ?? "unknown"}`,
        {
          hint: `read the report (\`sandboxd escalations show ${id}\`), then \`sandboxd phase resume ${id} --note …\` or \`sandboxd phase abort ${id}\``,
          details: { state: "escalated", report: e?.report ?? null, category: e?.category ?? null },
        },
      );
    }
    if (live?.record.state === "paused") {
      const p = live.record.pausedBy;
      throw new SandboxdError("SBX_ERR_PHASE_PAUSED", `phase ${id} was paused by a person at ${p?.at ?? "?"}${p?.note ? `: ${p.note}` : ""}`, {
        hint: `wait for the person, or resume it: \`sandboxd phase resume ${id}\``,
        details: { state: "paused", note: p?.note ?? null },
      });
    }
    const view = await this.get(id);
    throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} is ${view.state}, not running`);
  }
}

/** `<state>/rotated/<project dir name>-<8 hex of its path's SHA-256>`: one per project, out of the agent's reach. */
export function rotatedDir(stateDir: string, file: string): string {
  const project = path.dirname(file);
  const tag = createHash("sha256").update(project).digest("hex").slice(0, 8);
  return path.join(stateDir, "rotated", `${path.basename(project).replace(/[^\w.-]/g, "_")}-${tag}`);
}

export function notFound(id: string): SandboxdError {
  return new SandboxdError("SBX_ERR_PHASE_NOT_FOUND", `no phase with id ${id}`);
}
