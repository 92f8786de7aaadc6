/**
 * How a phase begins and ends: start (container, shim, tunnels, network
 * confinement, the PHASE_START record), stop, finish (the one road out,
 * whatever ends the phase) and the daemon's shutdown. Every state change goes
 * through the guard in ./state.ts.
 */
import { createWriteStream } from "node:fs";
import { stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { pipeline } from "node:stream/promises";
import { actionLine, timestamp } from "../audit/format.js";
import { SandboxdError } from "../errors.js";
import { resolveServices } from "../net/services.js";
import { loadPolicy } from "../policy/index.js";
import { LABELS } from "../runtime/types.js";
import { SHIM_ENV, SHIM_PATHS } from "../shim/protocol.js";
import { DEFAULT_PACKAGES_BYTES, PACKAGES_DIR } from "../workspace/packages.js";
import type { LivePhase, PhaseContext } from "./context.js";
import type { PhaseRecorder } from "./recorder.js";
import { adoptConfinement, confineNetwork, openTunnels } from "./network.js";
import { checkPackages, destroySlot, phaseCapabilities, poolKeyOf, releaseSlotMounts, shimLogEnv, type Slot } from "./pool.js";
import type { BuildLog } from "../audit/buildlog.js";
import { reservedReason, splitDotenv } from "../policy/env.js";
import { BUILD_LOG_NAME, readDotenv, resolveProject } from "./project.js";
import { FailFastState } from "./failfast.js";
import { buildReport, reportLines } from "./report.js";
import { ShimChannel } from "./shim-channel.js";
import { stopWatch, watchResources } from "./resources.js";
import { transition } from "./state.js";
import { destroyWorkspace, endWorkspace, makeWorkspace } from "./workspace.js";
import type { PhaseMode, PhaseRecord, PhaseView } from "./types.js";

export interface StartRequest {
  project: string;
  phase: string;
  mode: PhaseMode;
  /** a stricter policy file (host path) for this phase; it can only narrow the daemon's */
  policy?: string | undefined;
  /** protected paths this phase may change (SKILLS.md "Phase specification"): only `main.py` */
  allow?: string[] | undefined;
}

export async function start(ctx: PhaseContext, req: StartRequest): Promise<PhaseView> {
  const started = startPhase(ctx, req);
  ctx.starts.add(started);
  try {
    return await started;
  } finally {
    ctx.starts.delete(started);
    // the pool makes up for what this start took (or could not find) once the start is over, not during it
    ctx.pool.refill();
    // and the spare layer disk (src/workspace/spare.ts) is made again if this start took it
    ctx.spare.refill();
  }
}

async function startPhase(ctx: PhaseContext, req: StartRequest): Promise<PhaseView> {
  ctx.assertServing();
  const project = await resolveProject(req.project);
  const owner = await stat(project);
  // A phase policy is read and validated before anything exists.
  const phasePolicy = req.policy ? await loadPolicy(req.policy) : null;
  // a warm pool's container made with this phase's limits, when one is ready
  // (pool.ts): the phase takes its id, and only attaches its project to it;
  // from here on the slot is this start's, undone with it whatever happens
  const slot = await ctx.pool.take(poolKeyOf(ctx.opts.image, ctx.policyFor(phasePolicy), req.mode));
  const undoSlot = async () => {
    if (slot) await destroySlot(ctx, slot.id, slot);
  };
  let env: Record<string, string>, envText: string, audit: BuildLog | null;
  const id = slot?.id ?? ctx.opts.ids.phaseId();
  const token = slot?.token ?? ctx.opts.ids.token();
  const inProject = (ctx.opts.buildLogLocation ?? "project") === "project";
  const buildLog = inProject ? path.join(project, BUILD_LOG_NAME) : ctx.store.buildLogPath(id);
  try {
    // a pooled container was made from the image: it exists
    if (!slot && !(await ctx.opts.runtime.imageExists(ctx.opts.image))) {
      throw new SandboxdError("SBX_ERR_IMAGE_MISSING", `the sandbox image ${ctx.opts.image} is not in the Docker engine`);
    }
    ({ vars: env, text: envText } = await readDotenv(project, owner.uid));
    // Opened (and checked) before anything else exists, so an unsafe path leaves nothing behind.
    audit = inProject ? await ctx.buildLogs.acquire(buildLog, id, 0o644) : null;
  } catch (err) {
    // refused before anything of the phase reached the slot: it goes back to the pool as it was
    if (slot) await ctx.pool.giveBack(slot);
    throw err;
  }
  const { kept: envKept, dropped: envReserved } = splitDotenv(env);
  const limits = ctx.policyFor(phasePolicy).limits[req.mode];
  const record: PhaseRecord = {
    id,
    name: req.phase,
    project,
    mode: req.mode,
    state: "starting",
    instance: ctx.opts.instance,
    image: ctx.opts.image,
    // a pooled container exists before the phase does: its record names it from the start
    containerId: slot?.containerId ?? null,
    containerName: `sandboxd-${id}`,
    uid: owner.uid,
    gid: owner.gid,
    createdAt: timestamp(ctx.opts.clock.now()),
    stoppedAt: null,
    policyFile: req.policy ?? null,
    buildLog,
    endReason: null,
    ...(req.allow?.length ? { allow: req.allow } : {}),
    // said in the start's answer, the CLI's output and the trail: a dropped PYTHONPATH is otherwise a puzzling ImportError
    ...(envReserved.length ? { envDropped: envReserved.map((name) => ({ name, why: reservedReason(name) ?? "reserved" })) } : {}),
    ...(slot ? { pooled: { filledAt: slot.filledAt } } : {}),
  };
  let services: ReturnType<typeof resolveServices>;
  try {
    services = resolveServices(req.mode, env, ctx.opts.serviceOverrides, ctx.policyFor(phasePolicy).network);
  } catch (err) {
    if (slot) await ctx.pool.giveBack(slot);
    await ctx.buildLogs.release(buildLog, id).catch((e: Error) => ctx.log.warn({ phase: id, err: e.message }, "releasing the build log failed"));
    throw err;
  }
  let rec: PhaseRecorder;
  let opened!: () => void;
  ctx.opening.set(id, new Promise<void>((r) => (opened = r)));
  const open = () => {
    ctx.opening.delete(id);
    opened();
  };
  try {
    // a slot's folder (run dir, token, mounts) becomes the phase's
    if (slot) {
      ctx.pool.claimed(slot);
      await ctx.store.claimSlot(record);
    }
    else await ctx.store.create(record, token);
    // what the daemon read is what the phase keeps, also across a daemon restart:
    // the project's file is never read again while the phase lives
    await writeFile(ctx.store.dotenvPath(id), envText, { mode: 0o600 });
    rec = ctx.recorder(record, audit ?? (await ctx.buildLogs.acquire(buildLog, id)), envText, env);
    // The start is on record, durably, before anything of the phase exists
    // (its workspace, socket, tunnels, container): from here on the phase
    // ends by the one road below, and that writes its end record — whatever
    // ends it, a failed start, a stop during start, a daemon killed
    // meanwhile (reconcile ends it at the restart).
    await rec.record(...startRecord(record, envReserved, ctx.opts.clock.now()));
  } catch (err) {
    // nothing exists yet, and nothing was recorded: the phase never began
    await ctx.buildLogs.release(buildLog, id).catch((e: Error) => ctx.log.warn({ phase: id, err: e.message }, "releasing the build log failed"));
    if (slot) await undoSlot();
    else await ctx.store.remove(id).catch((e: Error) => ctx.log.error({ phase: id, err: e.message }, "could not remove the record of a start that was not recorded"));
    open();
    throw err;
  }
  const live: LivePhase = {
    record,
    // a pooled container's channel and watch are the phase's from here, so its end closes them whatever happens
    channel: slot?.channel ?? null,
    rec,
    phasePolicy,
    // reserved names dropped (they change what runs or where packages come from); the daemon's services after
    dotenv: { ...envKept, ...services.env },
    services,
    tunnels: null,
    stray: null,
    watch: slot?.watch ?? null,
    failFast: new FailFastState(),
    frozen: false,
    workspace: null,
    ending: null,
  };
  ctx.phases.set(id, live);
  open();
  // Set once the container exists: if the phase was ended while it was being
  // created, the end could not see it, and this start removes it.
  let containerId: string | null = null;
  const stillStarting = () => {
    if (live.ending) throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} was ended while it started`);
    // a shutdown that began after this start's gate: it ends here, by the start's own cleanup
    if (ctx.shuttingDown) throw new SandboxdError("SBX_ERR_SHUTTING_DOWN", `the daemon began shutting down while phase ${id} started`);
  };
  let layerMounted: Promise<void> | null = null;
  let packagesBound: Promise<void> | null = null;
  try {
    // a pooled container gets the project's package disk while the workspace is made
    if (slot) {
      packagesBound = acquirePackages(ctx, live, { bindAt: ctx.store.packagesMountPoint(id) }).then((dir) => checkPackages(dir, slot.pid));
      // eslint-disable-next-line no-restricted-syntax -- only keeps an early failure from being unhandled; awaited in claimSlot, or below when the start fails
      packagesBound.catch(() => undefined);
    }
    live.workspace = await makeWorkspace(ctx, live);
    // ended meanwhile: its end saw no workspace, so none may be mounted now
    stillStarting();
    if (slot) {
      containerId = slot.containerId;
      await claimSlot(ctx, live, slot, token, packagesBound!);
    } else containerId = await coldStart();
    stillStarting();
    transition(record, "running");
    await ctx.store.save(record);
    const ts = timestamp(ctx.opts.clock.now());
    const how = record.pooled ? `from the warm pool (made ${record.pooled.filledAt})` : "";
    await live.rec.record({ type: "phase.ready", name: record.name, container: record.containerId, ...(record.pooled ? { pooled: true } : {}) }, [
      actionLine(ts, "PHASE", "READY", `${record.name} (${id})`, `container ${record.containerId!.slice(0, 12)}${how ? ` ${how}` : ""}; shim connected, network confined`),
    ]);
    ctx.opts.log.info({ phase: id, name: record.name, mode: record.mode, project, pooled: !!slot }, "phase started");
    await watchResources(ctx, live);
    return ctx.view(record);
  } catch (err) {
    return await startFailed(err);
  }

  /** The cold road: workspace, channel, tunnels, package disk, container, view, confinement. */
  async function coldStart(): Promise<string> {
    const workspace = live.workspace!;
    // the view must be a shared mount point before the container binds it; the
    // layer's disk and the overlay are made while the container starts
    await workspace.layer.prepare();
    layerMounted = workspace.layer.mount();
    // eslint-disable-next-line no-restricted-syntax -- only keeps an early failure from being unhandled; the promise is awaited below, where its error is the start's
    layerMounted.catch(() => undefined);
    const channel = openChannel(ctx, live, token);
    await channel.listen();
    await openTunnels(ctx, live, token);
    // the project's package environment, kept from its last phase (src/workspace/packages.ts)
    const packagesDir = await acquirePackages(ctx, live);
    stillStarting();
    containerId = await ctx.opts.runtime.runPhaseContainer({
      name: record.containerName,
      image: ctx.opts.image,
      labels: {
        [LABELS.managed]: "1",
        [LABELS.phase]: id,
        [LABELS.instance]: ctx.opts.instance,
        [LABELS.mode]: req.mode,
        [LABELS.project]: project,
      },
      // the phase's view of the project (src/workspace/layer.ts); what is mounted on it
      // later (the overlay, the read-only protected paths) reaches the container
      projectDir: workspace.layer.paths.view,
      projectPropagation: "rslave",
      runDir: ctx.store.runDir(id),
      // build_audit.log and the other protected paths are read-only binds over the view (the layer's)
      readOnlyFiles: [],
      writableDirs: [{ host: packagesDir, container: PACKAGES_DIR }],
      env: { [SHIM_ENV.token]: token, [SHIM_ENV.socket]: SHIM_PATHS.controlSocket, ...shimLogEnv(ctx.opts) },
      memoryBytes: limits.memoryBytes,
      cpus: limits.cpus,
      pidsLimit: limits.pidsLimit,
      fileSizeBytes: limits.fileSizeBytes,
      // the policy's workspace.disk.tmpBytes (SKILLS.md Resource Limits — Disk), within the limits' ceiling
      tmpfsBytes: Math.min(limits.tmpfsBytes, ctx.policyFor(phasePolicy).workspace.disk.tmpBytes),
      capAdd: phaseCapabilities(),
    });
    stillStarting();
    record.containerId = containerId;
    // the namespace and the view are set up while the shim starts; all before any command can run
    // (all settled before going on, so a failure's cleanup below sees, and stops, the watch)
    const ws = workspace;
    // the container's pid, read once from the engine for the network confinement and the view's check
    const pidRead = ctx.opts.runtime.containerPid(containerId);
    // (the pid only checks that the view reached the container; a runtime without one skips the check)
    const pidForView = pidRead.catch(() => null);
    // the live file-event watcher starts on the upper meanwhile (a failure to watch is recorded, not fatal)
    const viewAttached = layerMounted!.then(async () => {
      await Promise.all([ws.layer.attach(pidForView), ws.watch()]);
    });
    const [ready, confined, attached] = await Promise.allSettled([channel.waitReady(ctx.connectTimeoutMs), confineNetwork(ctx, live, { readopt: false, pid: pidRead }), viewAttached]);
    if (attached.status === "rejected") throw attached.reason;
    if (ready.status === "rejected") throw ready.reason;
    if (confined.status === "rejected") throw confined.reason;
    return containerId;
  }

  async function startFailed(err: unknown): Promise<never> {
    if (live.ending) {
      // Someone else (stop, shutdown, a lost container) ended the phase while it
      // started: that end is the phase's one record; this start only reports it.
      await live.ending;
      if (record.containerId === null && containerId) {
        await ctx.opts.runtime
          .stopAndRemove(containerId, 0)
          .catch((e: Error) => ctx.log.error({ phase: id, container: containerId, err: e.message }, "could not remove the container of an aborted start"));
      }
      // the package disk acquired after that end released what it held
      // eslint-disable-next-line no-restricted-syntax -- the start already failed; this only waits for the acquisition to settle before it is released
      await packagesBound?.catch(() => undefined);
      await releasePackages(ctx, live);
      if (record.pooled) await releaseSlotMounts(ctx, id).catch((e: Error) => ctx.log.warn({ phase: id, err: e.message }, "could not unmount the pooled container's mount points"));
      throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} was ended while it started: ${record.endReason ?? record.state}`, {
        hint: "start a new phase with `sandboxd phase start`",
        cause: err,
      });
    }
    // A start that failed ends by the same road as every phase: what it made
    // is released and removed, and the end is recorded (phase.failed, with the
    // start's error), so its phase.start has its end. The caller gets the error.
    if (record.containerId === null && containerId) record.containerId = containerId;
    // eslint-disable-next-line no-restricted-syntax -- the start already failed with its own error; this only waits for the mounts to settle before they are undone
    await Promise.all([layerMounted?.catch(() => undefined), packagesBound?.catch(() => undefined)]);
    await endPhase(ctx, live, "failed", `the start failed: ${(err as Error).message}`);
    ctx.opts.log.error({ phase: id, err: (err as Error).message }, "phase start failed; cleaned up");
    throw err;
  }
}

/**
 * The warm road (pool.ts): the container runs, its shim is connected and
 * waits, its namespace is confined. What is the phase's is attached: the
 * channel is claimed (the welcome names the phase and its owner), the
 * tunnels open, the overlay of the project is mounted on the view and the
 * project's package disk on the package mount point (both reach the
 * container by propagation, and are checked there), the conntrack watch
 * reports to this phase.
 */
async function claimSlot(ctx: PhaseContext, live: LivePhase, slot: Slot, token: string, packagesBound: Promise<void>): Promise<void> {
  const { record } = live;
  const channel = slot.channel!;
  channel.claim(record.id, { uid: record.uid, gid: record.gid }, () => void containerLost(ctx, live, "its shim disconnected"));
  live.pid = slot.pid;
  await openTunnels(ctx, live, token);
  const ws = live.workspace!;
  const [mounted, packages, ready, confined] = await Promise.allSettled([
    ws.layer.claimMount(slot.pid).then(() => ws.watch()),
    packagesBound,
    channel.waitReady(ctx.connectTimeoutMs),
    adoptConfinement(ctx, live, slot),
  ]);
  if (mounted.status === "rejected") throw mounted.reason;
  if (packages.status === "rejected") throw packages.reason;
  if (ready.status === "rejected") throw ready.reason;
  if (confined.status === "rejected") throw confined.reason;
}

/**
 * The start record: written before anything of the phase exists, so every
 * phase in the trail has it, and (once ended) an end record after it. A
 * record made at a restart for a phase whose start the daemon did not live
 * to record is marked `deferred`.
 */
export function startRecord(record: PhaseRecord, envReserved: readonly string[], now: Date, deferred = false): Parameters<PhaseRecorder["record"]> {
  const ts = timestamp(now);
  const note = deferred ? " (recorded at the daemon's restart: it stopped before it could record the start)" : "";
  return [
    {
      type: "phase.start",
      state: "starting",
      name: record.name,
      mode: record.mode,
      project: record.project,
      uid: record.uid,
      gid: record.gid,
      image: record.image,
      policyFile: record.policyFile,
      // names only, never values
      envReserved: [...envReserved],
      envDropped: record.envDropped ?? [],
      // a warm pool's container (pool.ts), made before the phase; absent: a cold start
      ...(record.pooled ? { pooled: record.pooled, container: record.containerId } : {}),
      ...(deferred ? { deferred: true, createdAt: record.createdAt } : {}),
    },
    [
      actionLine(ts, "PHASE", "START", `${record.name} (${record.id})`, `mode=${record.mode} project=${record.project}${record.pooled ? " container=warm pool" : ""}${note}`),
      ...(envReserved.length
        ? [actionLine(ts, "ENV", "RESERVED", ".env", `not given to commands: ${envReserved.join(", ")} (they change what runs or where packages come from)`)]
        : []),
      `[${ts}] PHASE_START: Phase ${record.name} (${record.id}) mode=${record.mode} uid=${record.uid}:${record.gid}${record.policyFile ? ` policy=${record.policyFile}` : ""}`,
    ],
  ];
}

/** The phase becomes a user of its project's package disk (mounted by the first); the host folder to bind. */
export async function acquirePackages(ctx: PhaseContext, live: LivePhase, opts: { readopted?: boolean; bindAt?: string } = {}): Promise<string> {
  const { record } = live;
  // the daemon's policy sizes it: the disk is the project's, shared by phases with different phase policies
  const budget = ctx.opts.policy().workspace.disk.packagesBytes ?? DEFAULT_PACKAGES_BYTES;
  // a re-adopted phase's container uses the disk already: it is not verified under it
  const { dir, removed } = await ctx.packages.acquire(record.project, { uid: record.uid, gid: record.gid }, budget, {
    verify: !opts.readopted,
    ...(opts.bindAt ? { bindAt: opts.bindAt } : {}),
  });
  live.packagesHeld = true;
  if (removed && removed.length > 0) {
    // what a phase left on the disk outside pip: removed before this phase sees it (src/workspace/packages.ts)
    const shown = removed.slice(0, 50);
    await live.rec.record({ type: "packages.verify", removed: shown, removedCount: removed.length }, [
      actionLine(
        timestamp(ctx.opts.clock.now()),
        "PACKAGES",
        "VERIFY",
        PACKAGES_DIR,
        `removed ${removed.length} entr${removed.length === 1 ? "y" : "ies"} no pip command wrote: ${shown.join(", ")}${removed.length > shown.length ? ", …" : ""}`,
      ),
    ]);
  }
  return dir;
}

/** After the container is gone: the last phase of the project unmounts its package disk. */
async function releasePackages(ctx: PhaseContext, live: LivePhase): Promise<void> {
  if (!live.packagesHeld) return;
  live.packagesHeld = false;
  await ctx.packages.release(live.record.project).catch((e: Error) => ctx.log.warn({ phase: live.record.id, err: e.message }, "could not unmount the project's package disk"));
}

/** The control channel of a phase; its link closing outside a stop is how a lost container shows. */
export function openChannel(ctx: PhaseContext, live: LivePhase, token: string): ShimChannel {
  const { record } = live;
  live.channel = new ShimChannel(ctx.store.controlSocket(record.id), token, record.id, ctx.opts.log, { uid: record.uid, gid: record.gid }, () =>
    // containerLost handles its own errors; nothing waits for it
    void containerLost(ctx, live, "its shim disconnected"),
  );
  return live.channel;
}

/** States in which a lost container ends the phase: a frozen (escalated, paused) one too. */
const LIVE_STATES: ReadonlySet<string> = new Set(["running", "escalated", "paused"]);

/**
 * The shim's link closed while the phase was not being stopped, or the
 * resource watch found the container's cgroup gone (`trigger` says which).
 * If the container is gone or no longer running (killed, removed, out of
 * memory, the shim crashed or was OOM-killed: tini then exits with it), the
 * phase ends `failed` with that cause, its records and report kept. If it
 * still runs, the shim reconnects (it does after a dropped link); if it does
 * not within the connect timeout, the phase ends `failed` too. A frozen
 * phase re-adopted before its shim reconnected waits for its resume.
 */
export async function containerLost(ctx: PhaseContext, live: LivePhase, trigger: string): Promise<void> {
  const { record } = live;
  const deadline = ctx.opts.clock.monotonicMs() + ctx.connectTimeoutMs;
  let cause: string | null = null;
  // Docker may still call a container running for a moment after its processes
  // died; so its state is asked again until the shim is back or the time is up.
  for (;;) {
    if (live.ending || !LIVE_STATES.has(record.state) || !record.containerId) return;
    if (live.channel?.connected) return;
    // a frozen container's shim cannot reconnect before it thaws: only its death ends the phase
    const waitsForThaw = live.frozen || live.reattach;
    try {
      const st = await ctx.opts.runtime.inspect(record.containerId);
      // "removing": Docker is removing it (docker rm -f); the processes are already gone
      if (!st || st.status === "removing") cause = "its container was removed from outside sandboxd";
      else if (!st.running) {
        // Docker's OOMKilled: the kernel's OOM killer acted in the container at some point (the shim, or a command before)
        const how = `${st.exitCode === 137 ? ", killed by SIGKILL" : ""}${st.oomKilled ? "; the OOM killer killed processes in it (out of memory)" : ""}`;
        cause = `its container stopped (${st.status}, exit code ${st.exitCode ?? "unknown"}${how})`;
      }
    } catch (e) {
      cause = `its shim disconnected and the container could not be inspected: ${(e as Error).message}`;
    }
    if (cause) break;
    if (waitsForThaw) return;
    if (ctx.opts.clock.monotonicMs() >= deadline) {
      cause = `its shim disconnected and did not reconnect within ${ctx.connectTimeoutMs} ms`;
      break;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  if (live.ending || !LIVE_STATES.has(record.state) || live.channel?.connected) return;
  ctx.log.warn({ phase: record.id, cause, trigger }, "phase lost its container");
  await endPhase(ctx, live, "failed", cause);
}

export async function stop(ctx: PhaseContext, id: string, why = "stopped by operator"): Promise<PhaseView> {
  // a phase listed as starting whose start record is still being made: it is live in a moment
  // (awaited only then: a stop of a live phase takes it into `stopping` in the same tick)
  const opening = ctx.opening.get(id);
  if (opening) await opening;
  const live = ctx.phases.get(id);
  if (!live) {
    const view = await ctx.get(id);
    throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} is already ${view.state}`, {
      hint: "nothing to stop; `sandboxd ps` lists running phases",
    });
  }
  if (live.ending) {
    throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} is already ${live.record.state}`, {
      hint: "it is ending; `sandboxd phase show` says how it ended",
    });
  }
  await endPhase(ctx, live, "stopped", why);
  return ctx.view(live.record);
}

/**
 * Ends a phase, once. The first caller takes it into `stopping` (through the
 * guard) and runs `finish`; every later caller — a stop racing a shutdown, a
 * lost container during a stop — waits for that same end. Resolves when the
 * phase is `stopped` or `failed`; never rejects.
 */
export function endPhase(ctx: PhaseContext, live: LivePhase, outcome: "stopped" | "failed", why: string): Promise<void> {
  if (live.ending) return live.ending;
  // a record revived in `stopping` (the daemon died while ending it) is already there
  if (live.record.state !== "stopping") transition(live.record, "stopping");
  live.ending = finish(ctx, live, outcome, why);
  return live.ending;
}

/**
 * Release everything the phase holds, keep the container's log, remove the
 * container and close the record. Every step is tried whatever the one
 * before did; a step that fails is logged and, when it leaves something
 * behind (a container Docker would not remove), turns the end into `failed`
 * with the reason — a phase never stays `stopping`.
 */
async function finish(ctx: PhaseContext, live: LivePhase, outcome: "stopped" | "failed", why: string): Promise<void> {
  const { record } = live;
  const warn = (what: string) => (e: Error) => ctx.log.warn({ phase: record.id, err: e.message }, what);
  const running = live.channel?.runningExecs ?? 0;
  // a frozen container cannot hear the shim's shutdown nor a SIGTERM: thaw it first
  if (live.frozen && record.containerId) {
    await ctx.opts.runtime.unpause(record.containerId).catch((e: Error) => ctx.opts.log.warn({ phase: record.id, err: e.message }, "could not unpause"));
    live.frozen = false;
  }
  const open = record.escalations?.at(-1);
  if (open && open.resolved === null) open.resolved = { at: timestamp(ctx.opts.clock.now()), how: "stopped", note: why };
  // the last changes are judged while the sandbox can still compile them
  await endWorkspace(ctx, live, outcome, why);
  await live.channel?.close({ shutdownShim: true });
  await live.tunnels?.close().catch(warn("closing the tunnels failed"));
  live.watch?.stop();
  live.watch = null;
  stopWatch(live);
  live.stray?.close();
  if (record.containerId) {
    await saveContainerLogs(ctx, record).catch(warn("could not keep container logs"));
    try {
      await ctx.opts.runtime.stopAndRemove(record.containerId, 2);
    } catch (e) {
      ctx.log.error({ phase: record.id, container: record.containerId, err: (e as Error).message }, "could not remove the phase's container");
      outcome = "failed";
      why = `${why}; its container could not be removed: ${(e as Error).message}`;
    }
  }
  await destroyWorkspace(ctx, live);
  // a pooled container's mount points (the package disk's bind, a layer the phase did not get to make its own)
  if (record.pooled) await releaseSlotMounts(ctx, record.id).catch(warn("could not unmount the pooled container's mount points"));
  await releasePackages(ctx, live);
  await ctx.store.removeRunDir(record.id).catch(warn("could not remove the run dir"));
  await ctx.opts.approvals.expirePhase(record.id).catch(warn("could not expire the phase's approvals"));
  transition(record, outcome);
  record.stoppedAt = timestamp(ctx.opts.clock.now());
  record.endReason = why;
  await ctx.store.save(record).catch((e: Error) => ctx.log.error({ phase: record.id, err: e.message }, "could not save the end of the phase"));
  const ts = timestamp(ctx.opts.clock.now());
  const report = buildReport(record, live, ctx.opts.approvals.list({ all: true, phaseId: record.id }));
  await ctx.store.saveReport(record.id, report).catch((e: Error) => ctx.opts.log.error({ phase: record.id, err: e.message }, "could not keep the phase report"));
  await live.rec
    .record({ type: outcome === "stopped" ? "phase.complete" : "phase.failed", name: record.name, reason: why, runningCommandsEnded: running, report }, [
      actionLine(ts, "PHASE", "STOP", `${record.name} (${record.id})`, `${why}${running ? `; ${running} running command(s) ended` : ""}${iterationSummary(live)}`),
      ...reportLines(report, ts),
    ])
    .catch((e: Error) => ctx.log.error({ phase: record.id, err: e.message }, "could not record the end of the phase"));
  await ctx.buildLogs.release(record.buildLog, record.id).catch(warn("releasing the build log failed"));
  ctx.phases.delete(record.id);
  ctx.log.info({ phase: record.id, state: outcome, why }, "phase ended");
  ctx.opts.logSecrets?.remove(record.id);
}

function iterationSummary(live: LivePhase): string {
  const s = live.workspace?.summary();
  if (!s || s.iterations.length === 0) return "";
  return `; iterations: ${s.accepted} accepted, ${s.rejected} refused${s.pending ? `, ${s.pending} pending` : ""}`;
}

export async function saveContainerLogs(ctx: PhaseContext, record: PhaseRecord): Promise<void> {
  if (!record.containerId) return;
  const stream = await ctx.opts.runtime.logs(record.containerId, { follow: false });
  await pipeline(stream, createWriteStream(ctx.store.containerLogPath(record.id), { flags: "a", mode: 0o600 }));
}

/** SIGTERM: refuse new work, stop every phase once, leave nothing running. */
export async function shutdown(ctx: PhaseContext): Promise<void> {
  ctx.shuttingDown = true;
  // endPhase never rejects, and a phase already ending is waited for, not ended again;
  // the warm pool's unclaimed containers go with them
  await Promise.all([ctx.pool.close(), ctx.spare.close(), ...[...ctx.phases.values()].map((live) => endPhase(ctx, live, "stopped", "daemon shut down"))]);
  // starts that were past their gate when the shutdown began (a pooled one may hold a slot the
  // pool no longer lists): each fails at its next check, or ends with the rest below
  await Promise.allSettled([...ctx.starts]);
  await Promise.all([...ctx.phases.values()].map((live) => endPhase(ctx, live, "stopped", "daemon shut down")));
}
