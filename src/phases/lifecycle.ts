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
import type { LivePhase, PhaseContext } from "./context.js";
import { confineNetwork, openTunnels } from "./network.js";
import { BUILD_LOG_NAME, readDotenv, resolveProject } from "./project.js";
import { ShimChannel } from "./shim-channel.js";
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
  ctx.assertServing();
  const project = await resolveProject(req.project);
  const owner = await stat(project);
  // A phase policy is read and validated before anything exists.
  const phasePolicy = req.policy ? await loadPolicy(req.policy) : null;
  if (!(await ctx.opts.runtime.imageExists(ctx.opts.image))) {
    throw new SandboxdError("SBX_ERR_IMAGE_MISSING", `the sandbox image ${ctx.opts.image} is not in the Docker engine`);
  }
  const { vars: env, text: envText } = await readDotenv(project, owner.uid);
  const id = ctx.opts.ids.phaseId();
  const token = ctx.opts.ids.token();
  const limits = ctx.policyFor(phasePolicy).limits[req.mode];
  const inProject = (ctx.opts.buildLogLocation ?? "project") === "project";
  const buildLog = inProject ? path.join(project, BUILD_LOG_NAME) : ctx.store.buildLogPath(id);
  // Opened (and checked) before anything else exists, so an unsafe path leaves nothing behind.
  const audit = inProject ? await ctx.buildLogs.acquire(buildLog, id, 0o644) : null;
  const record: PhaseRecord = {
    id,
    name: req.phase,
    project,
    mode: req.mode,
    state: "starting",
    instance: ctx.opts.instance,
    image: ctx.opts.image,
    containerId: null,
    containerName: `sandboxd-${id}`,
    uid: owner.uid,
    gid: owner.gid,
    createdAt: timestamp(ctx.opts.clock.now()),
    stoppedAt: null,
    policyFile: req.policy ?? null,
    buildLog,
    endReason: null,
    ...(req.allow?.length ? { allow: req.allow } : {}),
  };
  await ctx.store.create(record, token);
  // what the daemon read is what the phase keeps, also across a daemon restart:
  // the project's file is never read again while the phase lives
  await writeFile(ctx.store.dotenvPath(id), envText, { mode: 0o600 });
  const services = resolveServices(req.mode, env, ctx.opts.serviceOverrides, ctx.policyFor(phasePolicy).network);
  const live: LivePhase = {
    record,
    channel: null,
    rec: ctx.recorder(record, audit ?? (await ctx.buildLogs.acquire(buildLog, id)), envText, env),
    phasePolicy,
    dotenv: { ...env, ...services.env },
    services,
    tunnels: null,
    stray: null,
    watch: null,
    workspace: null,
  };
  ctx.phases.set(id, live);
  let layerMounted: Promise<void> | null = null;
  try {
    live.workspace = await makeWorkspace(ctx, live);
    // the view must be a shared mount point before the container binds it; the
    // layer's disk and the overlay are made while the container starts
    await live.workspace.layer.prepare();
    layerMounted = live.workspace.layer.mount();
    layerMounted.catch(() => undefined);
    live.channel = new ShimChannel(ctx.store.controlSocket(id), token, id, ctx.opts.log, { uid: record.uid, gid: record.gid });
    await live.channel.listen();
    await openTunnels(ctx, live, token);
    record.containerId = await ctx.opts.runtime.runPhaseContainer({
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
      projectDir: live.workspace.layer.paths.view,
      projectPropagation: "rslave",
      runDir: ctx.store.runDir(id),
      // build_audit.log and the other protected paths are read-only binds over the view (the layer's)
      readOnlyFiles: [],
      env: { [SHIM_ENV.token]: token, [SHIM_ENV.socket]: SHIM_PATHS.controlSocket },
      memoryBytes: limits.memoryBytes,
      cpus: limits.cpus,
      pidsLimit: limits.pidsLimit,
      fileSizeBytes: limits.fileSizeBytes,
      // the policy's workspace.disk.tmpBytes (SKILLS.md Resource Limits — Disk), within the limits' ceiling
      tmpfsBytes: Math.min(limits.tmpfsBytes, ctx.policyFor(phasePolicy).workspace.disk.tmpBytes),
      // SETUID/SETGID: drop to the project owner; KILL: signal that owner's
      // process groups; DAC_READ_SEARCH: libuv chdirs into /workspace before
      // it switches uid, and a 0700 project is closed to a capability-less
      // root. A non-root daemon owns the run dir, so the shim then also needs
      // DAC_OVERRIDE to reach its socket. Children keep none of these: they
      // always switch to a non-zero uid (root-owned projects are refused).
      capAdd: ["SETUID", "SETGID", "KILL", "DAC_READ_SEARCH", ...(process.getuid?.() === 0 ? [] : ["DAC_OVERRIDE"])],
    });
    // the namespace and the view are set up while the shim starts; all before any command can run
    // (all settled before going on, so a failure's cleanup below sees, and stops, the watch)
    const ws = live.workspace;
    // (the container's pid only checks that the view reached it; a runtime without one skips the check)
    const viewAttached = layerMounted.then(async () => ws.layer.attach(await ctx.opts.runtime.containerPid(record.containerId!).catch(() => null)));
    const [ready, confined, attached] = await Promise.allSettled([live.channel.waitReady(ctx.connectTimeoutMs), confineNetwork(ctx, live), viewAttached]);
    if (attached.status === "rejected") throw attached.reason;
    if (ready.status === "rejected") throw ready.reason;
    if (confined.status === "rejected") throw confined.reason;
    transition(record, "running");
    await ctx.store.save(record);
    const ts = timestamp(ctx.opts.clock.now());
    await live.rec.record(
      {
        type: "phase.start",
        name: record.name,
        mode: record.mode,
        project,
        uid: record.uid,
        gid: record.gid,
        image: record.image,
        container: record.containerId,
        policyFile: record.policyFile,
      },
      [
        actionLine(ts, "PHASE", "START", `${record.name} (${id})`, `mode=${record.mode} project=${project}`),
        `[${ts}] PHASE_START: Phase ${record.name} (${id}) mode=${record.mode} uid=${record.uid}:${record.gid}${record.policyFile ? ` policy=${record.policyFile}` : ""}`,
      ],
    );
    ctx.opts.log.info({ phase: id, name: record.name, mode: record.mode, project }, "phase started");
    return ctx.view(record);
  } catch (err) {
    // A phase that failed to start leaves nothing behind.
    if (record.state === "starting") transition(record, "stopping");
    ctx.phases.delete(id);
    await live.channel?.close({ shutdownShim: false }).catch(() => undefined);
    await live.tunnels?.close().catch(() => undefined);
    live.watch?.stop();
    if (record.containerId) await ctx.opts.runtime.stopAndRemove(record.containerId, 0).catch(() => undefined);
    await layerMounted?.catch(() => undefined);
    if (live.workspace) await live.workspace.layer.destroy(null).catch(() => undefined);
    await ctx.buildLogs.release(buildLog, id).catch(() => undefined);
    await ctx.store.remove(id).catch(() => undefined);
    ctx.opts.log.error({ phase: id, err: (err as Error).message }, "phase start failed; cleaned up");
    ctx.opts.logSecrets?.remove(id);
    throw err;
  }
}

export async function stop(ctx: PhaseContext, id: string, why = "stopped by operator"): Promise<PhaseView> {
  const live = ctx.phases.get(id);
  if (!live) {
    const view = await ctx.get(id);
    throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${id} is already ${view.state}`, {
      hint: "nothing to stop; `sandboxd ps` lists running phases",
    });
  }
  transition(live.record, "stopping");
  await finish(ctx, live, "stopped", why);
  return ctx.view(live.record);
}

/**
 * Stop the container, keep its logs, close the record. The phase is taken
 * into `stopping` here unless its caller already did (stop's guard, or a
 * record that was `stopping` when the daemon died).
 */
export async function finish(ctx: PhaseContext, live: LivePhase, state: "stopped" | "failed", why: string): Promise<void> {
  const { record } = live;
  if (record.state !== "stopping") transition(record, "stopping");
  const running = live.channel?.runningExecs ?? 0;
  // the last changes are judged while the sandbox can still compile them
  await endWorkspace(ctx, live, state, why);
  await live.channel?.close({ shutdownShim: true }).catch(() => undefined);
  await live.tunnels?.close().catch(() => undefined);
  live.watch?.stop();
  live.watch = null;
  live.stray?.close();
  if (record.containerId) {
    await saveContainerLogs(ctx, record).catch((e: Error) =>
      ctx.opts.log.warn({ phase: record.id, err: e.message }, "could not keep container logs"),
    );
    await ctx.opts.runtime.stopAndRemove(record.containerId, 2);
  }
  await destroyWorkspace(ctx, live);
  await ctx.store.removeRunDir(record.id).catch(() => undefined);
  await ctx.opts.approvals.expirePhase(record.id).catch(() => undefined);
  transition(record, state);
  record.stoppedAt = timestamp(ctx.opts.clock.now());
  record.endReason = why;
  await ctx.store.save(record);
  const ts = timestamp(ctx.opts.clock.now());
  await live.rec
    .record({ type: state === "stopped" ? "phase.complete" : "phase.failed", name: record.name, reason: why, runningCommandsEnded: running }, [
      actionLine(ts, "PHASE", "STOP", `${record.name} (${record.id})`, why),
      state === "stopped"
        ? `[${ts}] PHASE_COMPLETE: Phase ${record.name} (${record.id}) — ${why}${running ? `; ${running} running command(s) ended` : ""}${iterationSummary(live)}`
        : `[${ts}] PHASE_FAILED: Phase ${record.name} (${record.id}) — ${why}`,
    ])
    .catch((e: Error) => ctx.opts.log.error({ phase: record.id, err: e.message }, "could not record the end of the phase"));
  await ctx.buildLogs.release(record.buildLog, record.id).catch(() => undefined);
  ctx.phases.delete(record.id);
  ctx.opts.log.info({ phase: record.id, state, why }, "phase ended");
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



/** SIGTERM: refuse new work, stop every phase, leave nothing running. */
export async function shutdown(ctx: PhaseContext): Promise<void> {
  ctx.shuttingDown = true;
  await Promise.all(
    [...ctx.phases.values()].map((live) =>
      finish(ctx, live, "stopped", "daemon shut down").catch((e: Error) =>
        ctx.opts.log.error({ phase: live.record.id, err: e.message }, "stopping phase at shutdown failed"),
      ),
    ),
  );
}

