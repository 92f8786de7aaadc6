/**
 * Live file events of a phase: a chokidar watcher on the phase's upper
 * directory (the change layer holds only what the phase changed, so this
 * watches a handful of entries, not the project's 100k files).
 *
 * Event mapping (overlayfs upper semantics):
 * - a character device 0/0 appearing at a path is a whiteout: the path was
 *   deleted in the view → delete;
 * - a file appearing → modify when the accepted project (lowerDir) has the
 *   path (a copy-up), create otherwise; a change → modify;
 * - a file or directory leaving the upper → delete (a file the phase created
 *   and removed, or a layer being discarded);
 * - a directory appearing → create (isDir).
 * The checkpoint's change set, read from the layer, is the record of what
 * changed; these events are what a human watching the audit stream sees
 * as it happens.
 *
 * Options chosen for this job: `atomic: false` (chokidar otherwise holds
 * every unlink 100 ms to fold editor saves into a change, and hides dot
 * files such as .env), no awaitWriteFinish (latency), `followSymlinks:
 * false` (a symlink the agent plants in the layer must not make the daemon
 * watch, or stat, anything outside it), `ignoreInitial` (what is already in
 * the layer at start is the change set's business).
 *
 * Bounded: events are coalesced per path for `coalesceMs` (a burst of
 * writes to one file is one event; create then modify stays create; create
 * then delete of a new file is nothing), at most `maxPending` distinct paths
 * wait at once, and at most `maxEventsPerSecond` are delivered per second;
 * whatever is over either bound is counted, and the count is delivered
 * once per second through onDropped. Memory is O(maxPending) whatever the
 * phase does. close() stops chokidar's watchers and the timers.
 */
import { lstat } from "node:fs/promises";
import path from "node:path";
import type { Stats } from "node:fs";
import { watch, type FSWatcher } from "chokidar";
import type { FileEventKind } from "./audit.js";

export interface LayerEvent {
  kind: FileEventKind;
  /** project-relative, POSIX */
  path: string;
  isDir: boolean;
  /** when the watcher saw it (ms, from the injected clock) */
  at: number;
}

export interface LayerWatcherOptions {
  /** the phase's overlayfs upper directory */
  upperDir: string;
  /** the accepted project, to tell a copy-up (modify) from a new file (create); without it every new file is "create" */
  lowerDir?: string;
  onEvents(batch: LayerEvent[]): void;
  /** folder names not watched at any depth (tool caches: never part of an iteration) */
  ignoreNames?: ReadonlySet<string>;
  /** events over the bounds in the last window, delivered at most once per window */
  onDropped?(count: number, windowMs: number): void;
  onError?(err: Error): void;
  /** default 25 ms */
  coalesceMs?: number;
  /** default 200 */
  maxEventsPerSecond?: number;
  /** default 1000 */
  maxPending?: number;
  clock?: () => number;
}

const WINDOW_MS = 1000;

/** overlayfs marks a deleted path in the upper with a character device 0/0 */
export function isWhiteout(st: Pick<Stats, "isCharacterDevice" | "rdev">): boolean {
  return st.isCharacterDevice() && st.rdev === 0;
}

/**
 * Merge a new event for a path into the one waiting. Returns null when the
 * two cancel out (a file created and removed within the window).
 */
export function coalesce(prev: FileEventKind | undefined, next: FileEventKind): FileEventKind | null {
  if (prev === undefined) return next;
  if (prev === "create") return next === "delete" ? null : "create";
  if (prev === "delete") return next === "delete" ? "delete" : "modify"; // deleted then written again: changed
  return next; // modify then modify/delete
}

/** A path inside an ignored folder, or the folder itself (a file that happens to bear the name is watched). */
function ignoredBy(names: ReadonlySet<string>, rel: string, st: Stats | undefined): boolean {
  const segs = rel.split(path.sep);
  if (segs.slice(0, -1).some((s) => names.has(s))) return true;
  return names.has(segs.at(-1) ?? "") && st?.isDirectory() === true;
}

export class LayerWatcher {
  private readonly pending = new Map<string, { kind: FileEventKind; isDir: boolean; at: number }>();
  /** per path, the event still being classified (bounded by maxPending) */
  private readonly inflight = new Map<string, Promise<void>>();
  private flushTimer: NodeJS.Timeout | null = null;
  private windowTimer: NodeJS.Timeout | null = null;
  private sentInWindow = 0;
  private dropped = 0;
  private closed = false;
  private readonly coalesceMs: number;
  private readonly maxPerSecond: number;
  private readonly maxPending: number;
  private readonly now: () => number;

  private constructor(
    private readonly opts: LayerWatcherOptions,
    private readonly fsw: FSWatcher,
  ) {
    this.coalesceMs = opts.coalesceMs ?? 25;
    this.maxPerSecond = opts.maxEventsPerSecond ?? 200;
    this.maxPending = opts.maxPending ?? 1000;
    this.now = opts.clock ?? (() => performance.now());
  }

  static async start(opts: LayerWatcherOptions): Promise<LayerWatcher> {
    const names = opts.ignoreNames;
    const fsw = watch(opts.upperDir, {
      ...(names && names.size > 0 ? { ignored: (p: string, st?: Stats) => ignoredBy(names, path.relative(opts.upperDir, p), st) } : {}),
      persistent: true,
      ignoreInitial: true,
      followSymlinks: false,
      atomic: false,
      awaitWriteFinish: false,
      alwaysStat: true,
      ignorePermissionErrors: true,
    });
    const w = new LayerWatcher(opts, fsw);
    fsw.on("all", (event, file, stats) => w.onRaw(event, file, stats));
    fsw.on("error", (err) => opts.onError?.(err instanceof Error ? err : new Error(String(err))));
    await new Promise<void>((resolve) => fsw.once("ready", () => resolve()));
    return w;
  }

  private rel(file: string): string | null {
    const r = path.relative(this.opts.upperDir, file);
    if (r === "" || r.startsWith("..") || path.isAbsolute(r)) return null;
    return r.split(path.sep).join("/");
  }

  private onRaw(event: string, file: string, stats: Stats | undefined): void {
    if (this.closed) return;
    const rel = this.rel(file);
    if (rel === null) return;
    let kind: FileEventKind | "add";
    let isDir = false;
    switch (event) {
      case "add":
        kind = stats && isWhiteout(stats) ? "delete" : this.opts.lowerDir ? "add" : "create";
        break;
      case "change":
        kind = stats && isWhiteout(stats) ? "delete" : "modify";
        break;
      case "unlink":
        kind = "delete";
        break;
      case "addDir":
        kind = "create";
        isDir = true;
        break;
      case "unlinkDir":
        kind = "delete";
        isDir = true;
        break;
      default:
        return;
    }
    // Events of one path stay in order even when one of them needs a look at the lower layer.
    const before = this.inflight.get(rel);
    if (kind !== "add" && !before) {
      this.push(rel, kind, isDir);
      return;
    }
    if (!before && this.inflight.size >= this.maxPending) {
      this.drop(1);
      return;
    }
    const k = kind;
    const next = (before ?? Promise.resolve())
      .then(async () => {
        const resolved = k === "add" ? ((await this.inLower(rel)) ? "modify" : "create") : k;
        if (!this.closed) this.push(rel, resolved, isDir);
      })
      .finally(() => {
        if (this.inflight.get(rel) === next) this.inflight.delete(rel);
      });
    this.inflight.set(rel, next);
  }

  /** Whether the accepted project has the path: a file appearing in the upper is then a copy-up (modify), else new (create). */
  private async inLower(rel: string): Promise<boolean> {
    try {
      await lstat(path.join(this.opts.lowerDir!, rel));
      return true;
    } catch {
      return false;
    }
  }

  private push(rel: string, kind: FileEventKind, isDir: boolean): void {
    const prev = this.pending.get(rel);
    if (!prev && this.pending.size >= this.maxPending) {
      this.drop(1);
      return;
    }
    const merged = coalesce(prev?.kind, kind);
    if (merged === null) this.pending.delete(rel);
    else this.pending.set(rel, { kind: merged, isDir: isDir || (prev?.isDir ?? false), at: prev?.at ?? this.now() });
    this.flushTimer ??= setTimeout(() => this.flush(), this.coalesceMs);
  }

  private flush(): void {
    this.flushTimer = null;
    if (this.closed || this.pending.size === 0) return;
    this.ensureWindow();
    const room = Math.max(0, this.maxPerSecond - this.sentInWindow);
    const batch: LayerEvent[] = [];
    for (const [p, e] of this.pending) {
      if (batch.length >= room) break;
      batch.push({ kind: e.kind, path: p, isDir: e.isDir, at: e.at });
    }
    this.drop(this.pending.size - batch.length);
    this.pending.clear();
    this.sentInWindow += batch.length;
    if (batch.length > 0) {
      try {
        this.opts.onEvents(batch);
      } catch (err) {
        this.opts.onError?.(err as Error);
      }
    }
  }

  private drop(n: number): void {
    if (n <= 0) return;
    this.dropped += n;
    this.ensureWindow();
  }

  /** The one-second window of the rate cap; at its end the dropped count is reported. */
  private ensureWindow(): void {
    this.windowTimer ??= setTimeout(() => {
      this.windowTimer = null;
      this.sentInWindow = 0;
      const n = this.dropped;
      this.dropped = 0;
      if (n > 0 && !this.closed) this.opts.onDropped?.(n, WINDOW_MS);
    }, WINDOW_MS);
  }

  /** Stops watching; nothing is delivered after the returned promise resolves. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.flushTimer) clearTimeout(this.flushTimer);
    if (this.windowTimer) clearTimeout(this.windowTimer);
    this.flushTimer = null;
    this.windowTimer = null;
    this.pending.clear();
    await this.fsw.close();
    await Promise.allSettled([...this.inflight.values()]);
  }

  /** For tests and `sandboxd` diagnostics: what the watcher holds right now. */
  stats(): { pending: number; watchedDirs: number } {
    return { pending: this.pending.size, watchedDirs: Object.keys(this.fsw.getWatched()).length };
  }
}
