/**
 * A spare layer disk: the daemon keeps one phase's layer made ahead — the
 * view and stage mount points and an ext4 image of the default budget,
 * formatted and loop-mounted, empty (`prepareSlotLayer`, as a warm pool's
 * slot has) — so a cold phase start whose budget matches takes it with one
 * rename(2) of the folder into its own state folder instead of running
 * `fallocate` + `mkfs.ext4` + a loop mount while its container starts
 * (the two compete for the host's cores: BENCHMARKS.md "Phase start with
 * the layer").
 *
 * On the host: `<stateDir>/spare-layer/s<pid>-<random>-<n>/ws/` (the layout of a phase's
 * `ws/`, src/workspace/layer.ts). A rename of the folder moves the mounts
 * in it with it (they hang on its entries, not on its path), so the phase's
 * `ws/view`, `ws/stage` and `ws/layer` are mounted where its own would be,
 * and its end unmounts and removes them as it removes a layer it made.
 *
 * Never shared: `take` hands the spare out synchronously and forgets it, so
 * two starts in the daemon's one thread cannot both get it; a spare is made
 * in a fresh folder each time. A daemon killed with a spare (or while making
 * one) leaves it in `spare-layer/`: the next daemon's `sweep` unmounts and
 * removes everything there before it makes its own. A stop (`close`) does the
 * same. Disk: the spare's image reserves one layer budget on the state dir's
 * disk (docs/WORKSPACE.md "Disk").
 *
 * States (a table, moved only by the guard): idle — none ready; making;
 * ready; closed — the daemon stops, nothing is made again.
 */
import { randomBytes } from "node:crypto";
import { mkdir, readdir, rmdir } from "node:fs/promises";
import path from "node:path";
import { destroySlotMounts, prepareSlotLayer } from "./layer.js";

export type SpareState = "idle" | "making" | "ready" | "closed";
export const SPARE_TRANSITIONS: Readonly<Record<SpareState, readonly SpareState[]>> = {
  idle: ["making", "closed"],
  making: ["ready", "idle", "closed"],
  ready: ["idle", "closed"],
  closed: [],
};

/** After this many failed makes in a row no more are tried (every start makes its own disk, as without a spare). */
const MAX_FAILURES = 3;

export interface SpareLayerOptions {
  /** `<stateDir>/spare-layer` */
  dir: string;
  /** false: none is made (what a previous daemon left is still swept) */
  enabled: boolean;
  /** the budget a spare is made with: the daemon policy's workspace.disk.layerBytes (read at each make: a reload applies) */
  budgetBytes: () => number;
  /** a make that failed, a spare that could not be removed */
  warn: (msg: string, err: Error) => void;
}

/** A spare's folder unmounted (lazily) and removed; rmdir, not a recursive rm: nothing is removed through a mount left behind. */
async function removeFolder(folder: string): Promise<void> {
  await destroySlotMounts(folder, []);
  await rmdir(folder).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== "ENOENT") throw err;
  });
}

export class SpareLayer {
  private state: SpareState = "idle";
  private ready: { folder: string; budgetBytes: number } | null = null;
  private making: Promise<void> = Promise.resolve();
  private made = 0;
  private failures = 0;
  /** folders handed out by `take`: their phase owns them, `close` leaves them to it */
  private readonly given = new Set<string>();
  /** the folders this one made (a sweep leaves them alone) */
  private readonly own = new Set<string>();
  /** in every folder name: a daemon with a reused pid never makes a name a dead one used */
  private readonly nonce = randomBytes(4).toString("hex");

  constructor(private readonly opts: SpareLayerOptions) {}

  private moveTo(to: SpareState): void {
    if (!SPARE_TRANSITIONS[this.state].includes(to)) throw new Error(`the spare layer is ${this.state}; it cannot become ${to}`);
    this.state = to;
  }

  get status(): { state: SpareState; budgetBytes: number | null; failures: number } {
    return { state: this.state, budgetBytes: this.ready?.budgetBytes ?? null, failures: this.failures };
  }

  /**
   * Everything in `spare-layer/` that this one did not make, unmounted and
   * removed: what a previous daemon left (killed while it held or made a
   * spare). Before every make, not only the first: a daemon killed while it
   * made one leaves its shell running (fallocate, mkfs, the loop mount), and
   * that mount may land after this daemon's first sweep.
   */
  sweep(): Promise<void> {
    return (async () => {
      const names = await readdir(this.opts.dir).catch(() => [] as string[]);
      for (const n of names) if (!this.own.has(n)) await removeFolder(path.join(this.opts.dir, n));
    })();
  }

  /**
   * The spare's `ws/` folder, if one of `budgetBytes` is ready: from here it
   * is the caller's (it renames it into its phase folder, or removes it with
   * destroySlotMounts on `path.dirname`). Synchronous: nothing else can take it.
   */
  take(budgetBytes: number): string | null {
    if (this.state !== "ready" || !this.ready || this.ready.budgetBytes !== budgetBytes) return null;
    const { folder } = this.ready;
    this.ready = null;
    this.given.add(path.basename(folder));
    this.moveTo("idle");
    return path.join(folder, "ws");
  }

  /**
   * Makes a spare if none is ready or being made (in the background: call it
   * after a phase start, never during one). A ready spare of a budget the
   * policy no longer has is replaced.
   */
  refill(): void {
    if (this.state === "ready" && this.ready && this.ready.budgetBytes !== this.opts.budgetBytes()) {
      const stale = this.ready.folder;
      this.ready = null;
      this.moveTo("idle");
      this.making = removeFolder(stale).catch((e: Error) => this.opts.warn("could not remove a spare layer disk of an old budget", e));
    }
    if (!this.opts.enabled) {
      this.making = this.making.then(() => this.sweep()).catch((e: Error) => this.opts.warn("could not remove a previous daemon's spare layer disk", e));
      return;
    }
    if (this.state !== "idle" || this.failures >= MAX_FAILURES) return;
    this.moveTo("making");
    const before = this.making;
    this.making = (async () => {
      await before;
      await this.sweep().catch((e: Error) => this.opts.warn("could not remove a previous daemon's spare layer disk", e));
      // a name no other daemon used: a killed daemon's spare is never mistaken for this one's (the sweep removes it)
      const name = `s${process.pid}-${this.nonce}-${++this.made}`;
      this.own.add(name);
      const folder = path.join(this.opts.dir, name);
      const budgetBytes = this.opts.budgetBytes();
      try {
        await mkdir(this.opts.dir, { recursive: true, mode: 0o700 });
        await prepareSlotLayer(folder, budgetBytes);
      } catch (err) {
        this.failures++;
        this.opts.warn("could not make a spare layer disk; phase starts make their own", err as Error);
        await removeFolder(folder).catch((e: Error) => this.opts.warn("could not remove a spare layer disk that failed", e));
        if (this.state === "making") this.moveTo("idle");
        return;
      }
      this.failures = 0;
      if (this.state !== "making") {
        // closed while it was made
        await removeFolder(folder).catch((e: Error) => this.opts.warn("could not remove the spare layer disk", e));
        return;
      }
      this.ready = { folder, budgetBytes };
      this.moveTo("ready");
    })();
  }

  /** Waits for a make under way (tests, the benchmark). */
  async settled(): Promise<void> {
    await this.making;
  }

  /** The daemon stops: the spare is unmounted and removed, and none is made again. */
  async close(): Promise<void> {
    if (this.state === "closed") return;
    this.moveTo("closed");
    await this.making;
    this.ready = null;
    const names = await readdir(this.opts.dir).catch(() => [] as string[]);
    for (const n of names) {
      // a taken one is its phase's (renamed away, or being renamed); only its empty folder is left here
      // eslint-disable-next-line no-restricted-syntax -- not empty: its phase's rename is under way and the phase removes what it took; the next sweep removes the folder
      if (this.given.has(n)) await rmdir(path.join(this.opts.dir, n)).catch(() => undefined);
      if (this.given.has(n)) continue;
      await removeFolder(path.join(this.opts.dir, n)).catch((e: Error) => this.opts.warn("could not remove the spare layer disk", e));
    }
  }
}
