/**
 * The warm pool: containers made and started, their shims connected and
 * their network confined, before any phase asks for one, so that a phase
 * start only attaches its project (docs/ARCHITECTURE.md "Warm pool").
 *
 * A slot is everything a phase start makes that does not depend on the
 * phase: its id (the claiming phase takes it, so its state folder, run dir,
 * control socket, container name and cgroup folder are already the phase's),
 * its token, the layer's mount points and disk (src/workspace/layer.ts
 * prepareSlotLayer), a shared mount point for the project's package disk,
 * the container (bound to both with `rslave`), the control channel with the
 * shim connected but not welcomed (no owner, no forker, nothing can run:
 * shim-channel.ts), and the namespace's NAT rules with their conntrack
 * watch. What depends on the phase comes at the claim (lifecycle.ts
 * startPooled): the overlay of its project on the view, its package disk on
 * the package mount point, the welcome with its owner, its tunnels.
 *
 * Isolation: a slot serves one phase and is destroyed with it, never put
 * back; before its claim nothing but the shim ran in it. Slots are keyed by
 * everything the container was made with (image, the limits Docker enforces,
 * the layer's budget): a phase whose policy asks for other limits starts
 * cold. An empty pool is a cold start, never a wait.
 *
 * Failures: a fill that fails is recorded (`pool.fill.failed`) and undone;
 * after MAX_CONSECUTIVE_FAILURES in a row the pool stops refilling
 * (`pool.stopped`, state `stopped` in `sandboxd ps`) and every start is cold.
 *
 * Lifecycles are tables: the pool's states in POOL_TRANSITIONS, a slot's in
 * SLOT_TRANSITIONS, each moved only by its guard.
 */
import { mkdir, readFile, rmdir, stat } from "node:fs/promises";
import { SandboxdError } from "../errors.js";
import { timestamp } from "../audit/format.js";
import type { AuditJournal } from "../audit/journal.js";
import { DEAD_PORT } from "../net/stray.js";
import type { Policy } from "../policy/index.js";
import { confineNetwork as confineNamespace, RefusalWatch, type RefusedConnection } from "../runtime/netns.js";
import { LABELS } from "../runtime/types.js";
import { SHIM_ENV, SHIM_PATHS } from "../shim/protocol.js";
import { destroySlotMounts, devString, mountsAt, prepareSlotLayer } from "../workspace/layer.js";
import { PACKAGES_DIR } from "../workspace/packages.js";
import type { PhaseContext } from "./context.js";
import type { PhaseMode } from "./types.js";
import { PHASE_MODES } from "./types.js";
import { ShimChannel } from "./shim-channel.js";
import { execFile } from "node:child_process";
import { promisify } from "node:util";

const run = promisify(execFile);

/** After this many failed fills in a row the pool stops refilling. */
export const MAX_CONSECUTIVE_FAILURES = 3;
/** Between a failed fill and the next try: a little longer after each failure. */
const RETRY_BASE_MS = 250;
/** setTimeout's longest delay (2^31 − 1 ms): a later limit is looked at again then */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** How long the conntrack watch may take to show it sees events (as network.ts). */
const WATCH_READY_MS = 5_000;

/* ------------------------------ the tables ------------------------------ */

/**
 * off: size 0, nothing is made; running: slots are kept filled; stopped:
 * fills failed MAX_CONSECUTIVE_FAILURES times in a row, no more are made
 * (the slots still ready are still claimed); closed: the daemon stops, every
 * unclaimed slot is destroyed.
 */
export type PoolState = "off" | "running" | "stopped" | "closed";
export const POOL_TRANSITIONS: Readonly<Record<PoolState, readonly PoolState[]>> = {
  off: ["closed"],
  running: ["stopped", "closed"],
  stopped: ["closed"],
  closed: [],
};

/**
 * filling: being made; ready: waits for a claim; taken: a start holds it
 * while it checks what it was asked (the project, its .env, its build log),
 * nothing of the phase in it yet — a start refused there gives it back;
 * claimed: handed to a phase (its record is in the slot's folder: the phase
 * owns it now, and ends it as it ends); discarded: undone (a failed fill, a
 * slot whose shim or watch died, the pool closing).
 */
export type SlotState = "filling" | "ready" | "taken" | "claimed" | "discarded";
export const SLOT_TRANSITIONS: Readonly<Record<SlotState, readonly SlotState[]>> = {
  filling: ["ready", "discarded"],
  ready: ["taken", "discarded"],
  taken: ["claimed", "ready", "discarded"],
  claimed: [],
  discarded: [],
};

function guard<S extends string>(table: Readonly<Record<S, readonly S[]>>, what: string, from: S, to: S): void {
  if (!table[from].includes(to)) throw new Error(`${what} is ${from}; it cannot become ${to}`);
}

/* --------------------------------- keys --------------------------------- */

/** Everything a pooled container was made with that a phase could need otherwise. */
export interface PoolKey {
  image: string;
  memoryBytes: number;
  cpus: number;
  pidsLimit: number;
  fileSizeBytes: number;
  tmpfsBytes: number;
  /** the layer's disk (workspace.disk.layerBytes) */
  layerBytes: number;
}

/** The key of a phase of `mode` under `policy` (the daemon's, narrowed by the phase's own). */
export function poolKeyOf(image: string, policy: Policy, mode: PhaseMode): PoolKey {
  const limits = policy.limits[mode];
  return {
    image,
    memoryBytes: limits.memoryBytes,
    cpus: limits.cpus,
    pidsLimit: limits.pidsLimit,
    fileSizeBytes: limits.fileSizeBytes,
    // the policy's workspace.disk.tmpBytes within the limits' ceiling, as a cold start sizes /tmp
    tmpfsBytes: Math.min(limits.tmpfsBytes, policy.workspace.disk.tmpBytes),
    layerBytes: policy.workspace.disk.layerBytes,
  };
}

export function keyString(k: PoolKey): string {
  return JSON.stringify([k.image, k.memoryBytes, k.cpus, k.pidsLimit, k.fileSizeBytes, k.tmpfsBytes, k.layerBytes]);
}

/** The distinct keys of the daemon's policy over every mode: what the pool keeps filled. */
export function poolKeys(image: string, policy: Policy): PoolKey[] {
  const out = new Map<string, PoolKey>();
  for (const mode of PHASE_MODES) {
    const k = poolKeyOf(image, policy, mode);
    out.set(keyString(k), k);
  }
  return [...out.values()];
}

/**
 * The capabilities of every phase container, pooled or not. SETUID/SETGID:
 * drop to the project owner; KILL: signal that owner's process groups;
 * DAC_READ_SEARCH: libuv chdirs into /workspace before it switches uid, and
 * a 0700 project is closed to a capability-less root. A non-root daemon owns
 * the run dir, so the shim then also needs DAC_OVERRIDE to reach its socket.
 * Children keep none of these: they always switch to a non-zero uid
 * (root-owned projects are refused).
 */
export function phaseCapabilities(): string[] {
  return ["SETUID", "SETGID", "KILL", "DAC_READ_SEARCH", ...(process.getuid?.() === 0 ? [] : ["DAC_OVERRIDE"])];
}

/* --------------------------------- slots -------------------------------- */

/** Where the conntrack watch's reports go: nowhere until a phase claims the slot. */
export interface WatchTarget {
  refused(c: RefusedConnection): void;
  end(why: string): void;
  lost(what: string): void;
}

export interface Slot {
  /** the id the claiming phase takes */
  id: string;
  token: string;
  key: string;
  /**
   * The id the image's tag named just before the container was made (the
   * container's is this or newer): a claim checks the tag still names it.
   */
  imageId: string | null;
  state: SlotState;
  filledAt: string;
  /** when it became ready (the injected clock's monotonic ms): a slot older than the pool's max age is replaced */
  readyAtMs: number | null;
  containerId: string | null;
  /** the container's init, as the host sees it */
  pid: number;
  channel: ShimChannel | null;
  watch: RefusalWatch | null;
  /** the confinement's failure (a daemon that cannot enter the namespace): the claiming phase records it */
  confineError: string | null;
  target: WatchTarget;
}

export interface PoolStatus {
  state: PoolState;
  /** slots kept per key */
  size: number;
  keys: number;
  ready: number;
  filling: number;
  /** phase starts served from the pool, and those that started cold while the pool was on */
  hits: number;
  misses: number;
  /** hits / (hits + misses); null before any start */
  hitRate: number | null;
  fills: number;
  /** failed fills in a row (the pool stops at MAX_CONSECUTIVE_FAILURES) */
  failures: number;
  lastError: string | null;
}

/** The shim's log level for a container's env (SHIM_ENV.logLevel): debug when the daemon logs at debug or trace. */
export function shimLogEnv(opts: { shimDebugLog?: boolean }): Record<string, string> {
  return opts.shimDebugLog ? { [SHIM_ENV.logLevel]: "debug" } : {};
}

export class WarmPool {
  private state: PoolState;
  private readonly slots = new Map<string, Slot>();
  private hits = 0;
  private misses = 0;
  private fills = 0;
  private failures = 0;
  private lastError: string | null = null;
  /** the fill loop, while it runs (one fill at a time: the machine is shared with the phases) */
  private pumping: Promise<void> | null = null;
  private wake: (() => void) | null = null;

  constructor(
    private readonly ctx: PhaseContext,
    private readonly size: number,
    /**
     * A ready slot older than this is replaced (recorded as pool.discard):
     * what a slot was made with (the service addresses, the engine, the shim
     * that has idled since) is never older than this at a claim, give or take
     * a fill (the loop sweeps between fills)
     */
    private readonly maxAgeMs = 30 * 60_000,
  ) {
    this.state = size > 0 ? "running" : "off";
  }

  private moveTo(to: PoolState): void {
    guard(POOL_TRANSITIONS, "the warm pool", this.state, to);
    this.state = to;
  }

  private moveSlot(slot: Slot, to: SlotState): void {
    guard(SLOT_TRANSITIONS, `pool slot ${slot.id}`, slot.state, to);
    slot.state = to;
  }

  private get journal(): AuditJournal {
    return this.ctx.opts.journal;
  }

  status(): PoolStatus {
    const all = [...this.slots.values()];
    const total = this.hits + this.misses;
    return {
      state: this.state,
      size: this.size,
      keys: this.state === "off" ? 0 : this.keys().length,
      ready: all.filter((s) => s.state === "ready").length,
      filling: all.filter((s) => s.state === "filling").length,
      hits: this.hits,
      misses: this.misses,
      hitRate: total === 0 ? null : this.hits / total,
      fills: this.fills,
      failures: this.failures,
      lastError: this.lastError,
    };
  }

  private keys(): PoolKey[] {
    return poolKeys(this.ctx.opts.image, this.ctx.opts.policy());
  }

  /** Begin (or go on) filling: after the daemon's reconcile, and after each claim. */
  refill(): void {
    if (this.state !== "running") return;
    if (this.pumping) {
      this.wake?.();
      return;
    }
    this.pumping = this.pump().finally(() => (this.pumping = null));
  }

  /** Fills one slot at a time until every key has `size` ready, then waits for a claim. */
  private async pump(): Promise<void> {
    while (this.state === "running") {
      const want = this.keys();
      // slots of a key the policy no longer has (a reload) are not claimed by anyone: they go
      const wanted = new Set(want.map(keyString));
      const now = this.ctx.opts.clock.monotonicMs();
      for (const s of [...this.slots.values()]) {
        if (s.state !== "ready") continue;
        if (!wanted.has(s.key)) await this.discard(s, "its limits are no longer the policy's");
        // its shim went away between the fill's wait and its readiness: no phase could claim it
        else if (!s.channel?.connected) await this.discard(s, "its shim is not connected");
        else if (s.readyAtMs !== null && now - s.readyAtMs >= this.maxAgeMs) {
          const reason = `it waited ${Math.round((now - s.readyAtMs) / 1000)} s for a claim, the pool's limit is ${Math.round(this.maxAgeMs / 1000)} s (SANDBOXD_POOL_MAX_AGE)`;
          // discarded before the record's await: a start cannot take it meanwhile
          const gone = this.discard(s, reason);
          await this.record("pool.discard", { slot: s.id, container: s.containerId, reason });
          await gone;
        }
      }
      const short = want.find((k) => [...this.slots.values()].filter((s) => s.key === keyString(k)).length < this.size);
      if (!short) {
        // until a claim, or the oldest ready slot's limit
        const ages = [...this.slots.values()].filter((s) => s.state === "ready" && s.readyAtMs !== null).map((s) => s.readyAtMs!);
        const due = ages.length > 0 ? Math.max(0, Math.min(...ages) + this.maxAgeMs - this.ctx.opts.clock.monotonicMs()) : null;
        let timer: NodeJS.Timeout | undefined;
        await new Promise<void>((r) => {
          this.wake = r;
          if (due !== null) timer = setTimeout(r, Math.min(due + 1, MAX_TIMER_MS));
        });
        clearTimeout(timer);
        this.wake = null;
        continue;
      }
      const ok = await this.fill(short);
      if (!ok && this.state === "running") await new Promise((r) => setTimeout(r, RETRY_BASE_MS * this.failures));
    }
  }

  /**
   * A ready slot of `key` for a phase start, or null (cold start). The slot
   * is the caller's from here: it ends with the phase (lifecycle.ts), never
   * comes back. The caller calls `refill` once its start is over.
   */
  async take(key: PoolKey): Promise<Slot | null> {
    if (this.state === "off" || this.state === "closed") return null;
    const k = keyString(key);
    // the tag names other content than a slot was made from (`sandboxd image build`, a pull):
    // a cold start would run the new image, so a pooled one must too
    let current: Promise<string | null> | null = null;
    for (;;) {
      const slot = [...this.slots.values()].find((s) => s.state === "ready" && s.key === k && s.channel?.connected);
      if (!slot) {
        this.misses++;
        return null;
      }
      // taken before the engine is asked: no other start can claim it meanwhile
      this.moveSlot(slot, "taken");
      current ??= this.ctx.opts.runtime.imageId(key.image).catch(() => null);
      const now = await current;
      if (now !== null && now === slot.imageId) {
        // no refill here: the caller asks for it once its phase is ready (or failed),
        // so a fill (a container start, a disk made) never competes with the claim for the CPU
        return slot;
      }
      const reason = `the image ${key.image} is ${now ?? "gone"} now, the slot was made from ${slot.imageId ?? "an unknown image"}`;
      await this.record("pool.discard", { slot: slot.id, container: slot.containerId, reason });
      // its container goes while the start goes on (cold, or with another slot)
      void this.discard(slot, reason);
    }
  }

  /** The start that took `slot` makes it its phase's: from here it is never the pool's again. */
  claimed(slot: Slot): void {
    this.moveSlot(slot, "claimed");
    this.slots.delete(slot.id);
    this.hits++;
  }

  /**
   * A start refused before anything of its phase reached the slot (no record
   * in its folder, no welcome, nothing run): the slot is as it was made, and
   * waits for the next start — or goes, when the pool closed meanwhile.
   */
  async giveBack(slot: Slot): Promise<void> {
    if (slot.state !== "taken") return;
    if (this.state === "closed" || !slot.channel?.connected) {
      this.moveSlot(slot, "ready");
      await this.discard(slot, this.state === "closed" ? "the pool closed" : "its shim is not connected");
      return;
    }
    this.moveSlot(slot, "ready");
  }

  /** One slot made; false when it failed (recorded, undone). */
  private async fill(key: PoolKey): Promise<boolean> {
    const { ctx } = this;
    const t0 = ctx.opts.clock.monotonicMs();
    const slot: Slot = {
      id: ctx.opts.ids.phaseId(),
      token: ctx.opts.ids.token(),
      key: keyString(key),
      imageId: null,
      state: "filling",
      filledAt: timestamp(ctx.opts.clock.now()),
      readyAtMs: null,
      containerId: null,
      pid: 0,
      channel: null,
      watch: null,
      confineError: null,
      target: { refused: () => undefined, end: () => undefined, lost: () => undefined },
    };
    this.slots.set(slot.id, slot);
    try {
      await this.make(slot, key);
      if (slot.state !== "filling") throw new Error("the pool closed while the slot was made");
      this.moveSlot(slot, "ready");
      slot.readyAtMs = ctx.opts.clock.monotonicMs();
      this.fills++;
      this.failures = 0;
      const ms = Math.round(ctx.opts.clock.monotonicMs() - t0);
      await this.record("pool.fill", { slot: slot.id, container: slot.containerId, ms, confined: slot.confineError === null });
      ctx.log.info({ slot: slot.id, ms }, "pool slot ready");
      return true;
    } catch (err) {
      const message = (err as Error).message;
      const closing = this.state === "closed";
      await this.discard(slot, closing ? "the pool closed" : `fill failed: ${message}`);
      if (closing) return false;
      this.failures++;
      this.lastError = message;
      ctx.log.warn({ slot: slot.id, err: message, failures: this.failures }, "pool fill failed");
      await this.record("pool.fill.failed", { slot: slot.id, error: message, consecutive: this.failures });
      if (this.failures >= MAX_CONSECUTIVE_FAILURES && this.state === "running") {
        this.moveTo("stopped");
        await this.record("pool.stopped", { failures: this.failures, error: message, reason: `${this.failures} failed fills in a row; phases start cold` });
        ctx.log.error({ failures: this.failures, err: message }, "the warm pool stopped refilling after repeated failures; phases start cold");
      }
      return false;
    }
  }

  /** The phase-independent part of a start (see the header). */
  private async make(slot: Slot, key: PoolKey): Promise<void> {
    const { ctx } = this;
    const { store } = ctx;
    const { runtime } = ctx.opts;
    await store.createSlot(slot.id, slot.token, { key: slot.key, instance: ctx.opts.instance, filledAt: slot.filledAt });
    const view = (await prepareSlotLayer(store.dir(slot.id), key.layerBytes)).view;
    const pkg = store.packagesMountPoint(slot.id);
    await makeSharedMountPoint(pkg);
    // before the container: a rebuild in between makes the slot look older than it is (discarded at
    // its claim for nothing), never newer
    slot.imageId = await runtime.imageId(key.image);
    slot.channel = new ShimChannel(store.controlSocket(slot.id), slot.token, `pool slot ${slot.id}`, ctx.log, undefined, () => void this.lost(slot, "its shim disconnected"), { pooled: true });
    await slot.channel.listen();
    slot.containerId = await runtime.runPhaseContainer({
      name: `sandboxd-${slot.id}`,
      image: key.image,
      labels: {
        [LABELS.managed]: "1",
        [LABELS.phase]: slot.id,
        [LABELS.instance]: ctx.opts.instance,
        [LABELS.pool]: "1",
      },
      projectDir: view,
      projectPropagation: "rslave",
      runDir: store.runDir(slot.id),
      readOnlyFiles: [],
      writableDirs: [{ host: pkg, container: PACKAGES_DIR, propagation: "rslave" }],
      env: { [SHIM_ENV.token]: slot.token, [SHIM_ENV.socket]: SHIM_PATHS.controlSocket, [SHIM_ENV.pooled]: "1", ...shimLogEnv(ctx.opts) },
      memoryBytes: key.memoryBytes,
      cpus: key.cpus,
      pidsLimit: key.pidsLimit,
      fileSizeBytes: key.fileSizeBytes,
      tmpfsBytes: key.tmpfsBytes,
      capAdd: phaseCapabilities(),
    });
    slot.pid = await runtime.containerPid(slot.containerId);
    const [ready, confined] = await Promise.allSettled([slot.channel.waitReady(ctx.connectTimeoutMs), this.confine(slot)]);
    if (ready.status === "rejected") throw ready.reason;
    if (confined.status === "rejected") slot.confineError = (confined.reason as Error).message;
    if (!slot.channel.pooledShim) {
      throw new Error(`the shim of image ${key.image} does not wait for a claim (no "pool" feature): rebuild the image (\`sandboxd image build\`)`);
    }
  }

  /** The namespace's rules and the conntrack watch, as network.ts does for a cold start. */
  private async confine(slot: Slot): Promise<void> {
    const watch = new RefusalWatch(
      slot.pid,
      DEAD_PORT,
      (c) => slot.target.refused(c),
      (why) => slot.target.end(why),
      (what) => slot.target.lost(what),
    );
    slot.watch = watch;
    // before the claim, a watch that ends takes a ready slot with it; a slot a start holds
    // keeps going, and its phase records the confinement as degraded (adoptConfinement),
    // as a cold phase whose watch ends does (network.ts watchEnded)
    slot.target.end = (why) => {
      if (slot.watch === watch) slot.watch = null;
      slot.confineError = `its conntrack watch ended before the phase took it: ${why}`;
      void this.lost(slot, `its conntrack watch ended: ${why}`);
    };
    const rulesIn = confineNamespace(slot.pid, { deadPort: DEAD_PORT });
    rulesIn.catch(() => watch.stop());
    const [rules, ready] = await Promise.allSettled([rulesIn, watch.ready(WATCH_READY_MS)]);
    if (rules.status === "rejected" || ready.status === "rejected") {
      watch.stop();
      slot.watch = null;
      throw (rules.status === "rejected" ? rules.reason : (ready as PromiseRejectedResult).reason) as Error;
    }
  }

  /** A ready slot's shim or watch died: it goes, and the pool fills another (a failure if it was made just now). */
  private async lost(slot: Slot, why: string): Promise<void> {
    if (slot.state !== "ready") return;
    this.ctx.log.warn({ slot: slot.id, why }, "pool slot lost");
    await this.discard(slot, why);
    this.refill();
  }

  /** Undo a slot that no phase claimed: container, channel, watch, mounts, state folder. */
  private async discard(slot: Slot, why: string): Promise<void> {
    // (a taken slot too, when the pool closes: the start that holds it then fails, and undoes what it made)
    if (slot.state === "discarded" || slot.state === "claimed") return;
    this.moveSlot(slot, "discarded");
    this.slots.delete(slot.id);
    this.ctx.log.debug({ slot: slot.id, why }, "pool slot discarded");
    await destroySlot(this.ctx, slot.id, { containerId: slot.containerId, channel: slot.channel, watch: slot.watch });
  }

  /**
   * The daemon stops (or detaches for a planned restart): no more fills, and
   * every slot no phase claimed is destroyed; nothing of the pool stays running.
   */
  async close(): Promise<void> {
    if (this.state === "closed") return;
    this.moveTo("closed");
    this.wake?.();
    // a fill under way sees the pool closed and undoes its slot
    await this.pumping;
    await Promise.all([...this.slots.values()].map((s) => this.discard(s, "the daemon stops")));
  }

  /** The pool's own records go to the daemon's journal (no phase has them): fills, failures, the stop. */
  private async record(type: string, fields: Record<string, unknown>): Promise<void> {
    const status = this.status();
    await this.journal
      .append({ type, ...fields, pool: { state: status.state, size: status.size, ready: status.ready, hits: status.hits, misses: status.misses, hitRate: status.hitRate } })
      .catch((e: Error) => this.ctx.log.error({ type, err: e.message }, "could not record a pool event"));
  }
}

/** `dir` a shared mount point, so what the daemon mounts on it reaches a container that bound it `rslave`. */
async function makeSharedMountPoint(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o755 });
  const q = `'${dir.replace(/'/g, `'\\''`)}'`;
  await run("sh", ["-ec", `if ! mountpoint -q ${q}; then mount --bind ${q} ${q}; mount --make-shared ${q}; fi`], { timeout: 30_000 });
}

/**
 * The project's package disk, bound on a pooled container's package mount
 * point (packages.ts acquire `bindAt`), checked where it matters: the
 * container's PACKAGES_DIR is that disk now.
 */
export async function checkPackages(hostDir: string, containerPid: number): Promise<void> {
  const want = devString((await stat(hostDir)).dev);
  const info = await readFile(`/proc/${containerPid}/mountinfo`, "utf8").catch(() => null);
  if (info === null) return; // the container is gone: its phase ends by the shim's loss
  const top = mountsAt(info, PACKAGES_DIR).at(-1);
  if (top?.dev !== want) {
    throw new SandboxdError("SBX_ERR_WORKSPACE", `the project's package disk did not reach the pooled container (its ${PACKAGES_DIR} is ${top?.fstype ?? "missing"} ${top?.dev ?? ""}, the disk is ${want})`, {
      hint: "the state dir must be on a mount the Docker engine sees with the same propagation; see docs/WORKSPACE.md",
    });
  }
}

/**
 * Everything of a slot undone: the container (and its cgroup folder), the
 * channel, the watch, the mounts and the state folder. For a slot no phase
 * claimed (the pool's discard, and reconcile after a restart: `containerId`
 * null there, reconcile removes containers by their labels).
 */
export async function destroySlot(
  ctx: PhaseContext,
  id: string,
  held: { containerId: string | null; channel: ShimChannel | null; watch: RefusalWatch | null },
): Promise<void> {
  const warn = (what: string) => (e: Error) => ctx.log.warn({ slot: id, err: e.message }, what);
  held.watch?.stop();
  if (held.containerId) await ctx.opts.runtime.stopAndRemove(held.containerId, 0).catch(warn("could not remove a pool container"));
  await held.channel?.close({ shutdownShim: false });
  await destroySlotMounts(ctx.store.dir(id), [ctx.store.packagesMountPoint(id)]).catch(warn("could not unmount a pool slot"));
  await ctx.store.remove(id).catch(warn("could not remove a pool slot's folder"));
}

/** After a phase that claimed a slot ended: the package mount point is unmounted and goes (the layer's own destroy did the rest). */
export async function releaseSlotMounts(ctx: PhaseContext, id: string): Promise<void> {
  await destroySlotMounts(ctx.store.dir(id), [ctx.store.packagesMountPoint(id)]);
  // eslint-disable-next-line no-restricted-syntax -- an empty mount point left behind is harmless; its folder goes with the phase's
  await rmdir(ctx.store.packagesMountPoint(id)).catch(() => undefined);
}
