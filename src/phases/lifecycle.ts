/**
 * How a phase begins and ends: start (container, shim, tunnels, network
 * confinement, the PHASE_START record), stop, finish (the one road out,
 * whatever ends the phase) and the daemon's shutdown. Every state change goes
 * through the guard in ./state.ts.
 */
import { createWriteStream } from "node:fs";
import { stat } from "node:fs/promises";
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
import type { PhaseMode, PhaseRecord, PhaseView } from "./types.js";

export interface StartRequest {
  project: string;
  phase: string;
  mode: PhaseMode;
  /** a stricter policy file (host path) for this phase; it can only narrow the daemon's */
  policy?: string | undefined;
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
  };
  await ctx.store.create(record, token);
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
  };
  ctx.phases.set(id, live);
  try {
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
      projectDir: project,
      runDir: ctx.store.runDir(id),
      // the agent reads its audit trail but can neither change nor replace it
      readOnlyFiles: inProject ? [{ host: buildLog, container: `${SHIM_PATHS.workspace}/${BUILD_LOG_NAME}` }] : [],
      env: { [SHIM_ENV.token]: token, [SHIM_ENV.socket]: SHIM_PATHS.controlSocket },
      memoryBytes: limits.memoryBytes,
      cpus: limits.cpus,
      pidsLimit: limits.pidsLimit,
      fileSizeBytes: limits.fileSizeBytes,
      tmpfsBytes: limits.tmpfsBytes,
      // SETUID/SETGID: drop to the project owner; KILL: signal that owner's
      // process groups; DAC_READ_SEARCH: libuv chdirs into /workspace before
      // it switches uid, and a 0700 project is closed to a capability-less
      // root. A non-root daemon owns the run dir, so the shim then also needs
      // DAC_OVERRIDE to reach its socket. Children keep none of these: they
      // always switch to a non-zero uid (root-owned projects are refused).
      capAdd: ["SETUID", "SETGID", "KILL", "DAC_READ_SEARCH", ...(process.getuid?.() === 0 ? [] : ["DAC_OVERRIDE"])],
    });
    // the namespace is set up while the shim starts; both before any command can run
    // (both settled before going on, so a failure's cleanup below sees, and stops, the watch)
    const [ready, confined] = await Promise.allSettled([live.channel.waitReady(ctx.connectTimeoutMs), confineNetwork(ctx, live)]);
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
        ? `[${ts}] PHASE_COMPLETE: Phase ${record.name} (${record.id}) — ${why}${running ? `; ${running} running command(s) ended` : ""}`
        : `[${ts}] PHASE_FAILED: Phase ${record.name} (${record.id}) — ${why}`,
    ])
    .catch((e: Error) => ctx.opts.log.error({ phase: record.id, err: e.message }, "could not record the end of the phase"));
  await ctx.buildLogs.release(record.buildLog, record.id).catch(() => undefined);
  ctx.phases.delete(record.id);
  ctx.opts.log.info({ phase: record.id, state, why }, "phase ended");
  ctx.opts.logSecrets?.remove(record.id);
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

