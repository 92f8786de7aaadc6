/**
 * A phase's change layer: the project seen through overlayfs, with every write
 * landing in a per-phase upper dir on a size-capped file system of its own.
 *
 * On the host, in the phase's state dir (`<phase>/ws/`):
 *
 *   layer.img   the layer's disk: an ext4 image of `budgetBytes`, space
 *               reserved (fallocate), loop-mounted at layer/ — its size is the
 *               phase's hard disk budget: a full layer is ENOSPC inside this
 *               phase only, never on the disk the audit journal lives on
 *   layer/upper the overlay's upper dir = the pending iteration's changes
 *   layer/work  overlayfs' work dir
 *   view/       a shared mount point (bind-mounted onto itself, made shared);
 *               the container gets it at /workspace with `rslave` propagation,
 *               so mounts the daemon makes here on the host appear inside
 *               the running container
 *   stage/      where the view is put together before it is moved onto view/
 *
 * The view is the overlay (lower = the project, which it never writes) with
 * read-only bind mounts of the protected paths on top (`.git`,
 * `build_audit.log`, …), so writes there fail with EROFS inside. Credential
 * files (`.env`) are whited out in the upper before each mount, so they are
 * not in the view at all.
 *
 * Measured (kernel 6.18, docs/WORKSPACE.md) and relied on:
 *   - the container must bind view/ while nothing is mounted on it: Docker
 *     binds the top mount of a path, and a copy of the overlay made that way
 *     is the container's /workspace itself, which no host unmount removes.
 *     So the overlay goes on only after the container exists (`attach`).
 *   - a read-only remount does not propagate: a bind made on view/ and then
 *     remounted ro stays rw in the container. So the tree is built in stage/
 *     (a private mount), made read-only there, and moved onto view/ in one
 *     `mount --move`; the propagated copies keep the flags.
 *   - a lazy unmount on the host propagates into the container even when a
 *     process there holds its cwd in the view.
 *
 * overlayfs does not allow the lower to change under a mounted overlay, so an
 * iteration is accepted or discarded with the overlay unmounted: unmount
 * (lazily, so a stale reference cannot block it), apply the upper to the
 * project (src/workspace/apply.ts) or not, empty the upper, mount again. A
 * process that still holds its cwd inside the container's copy of the overlay
 * stops the unmount from propagating into the container; `reset` checks the
 * container's mount table afterwards and detaches such a copy there itself.
 */
import { execFile } from "node:child_process";
import { chmodSync, chownSync, constants as fsc, lstatSync, mkdirSync, readFileSync, statSync } from "node:fs";
import { chmod, chown, lstat, mkdir, open, readFile, readdir, realpath, rename, rm, rmdir, stat } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { SandboxdError } from "../errors.js";
import { MAX_CHANGES, MAX_CHANGE_PATH_BYTES, type ChangeSet, type FileChange } from "./changes.js";
import { HelperUnavailable, hostHelper, stepsToShell, type HostStep } from "./hosthelper.js";

const run = promisify(execFile);
const COMMAND_TIMEOUT_MS = 30_000;

export interface LayerSpec {
  /** the phase's state folder (`<stateDir>/phases/<id>`) */
  phaseDir: string;
  /** the project (real path): the overlay's lower dir */
  project: string;
  /** project-relative paths not visible in the view (credential files) */
  hidden: readonly string[];
  /**
   * more of them, found by a walk of the project that runs while the
   * container starts: awaited before the upper is first made (so before the
   * view is mounted) and before the upper is first read
   */
  findHidden?: () => Promise<readonly string[]>;
  /** project-relative paths mounted read-only over the view, where they exist as a file or folder */
  readOnly: readonly string[];
  /** size of the layer's file system: the phase's disk budget for project writes */
  budgetBytes: number;
  /**
   * A spare layer (src/workspace/spare.ts) of `budgetBytes`, if one is ready:
   * its `ws/` folder, the caller's from then on. `prepare` renames it into
   * the phase's folder, so `mount` has no disk to make.
   */
  takeSpare?: (budgetBytes: number) => string | null;
  /**
   * false: every mount step and xattr read starts its own process (`sh`,
   * mount(8), getfattr), as before the host helper — kept for a host without
   * python3 and for the benchmark's side-by-side; default true
   */
  hostHelper?: boolean;
}

export interface LayerPaths {
  root: string;
  image: string;
  layerMnt: string;
  upper: string;
  work: string;
  view: string;
  stage: string;
}

export function layerPaths(phaseDir: string): LayerPaths {
  const root = path.join(phaseDir, "ws");
  const layerMnt = path.join(root, "layer");
  return {
    root,
    image: path.join(root, "layer.img"),
    layerMnt,
    upper: path.join(layerMnt, "upper"),
    work: path.join(layerMnt, "work"),
    view: path.join(root, "view"),
    stage: path.join(root, "stage"),
  };
}

function endedWhileMounting(): SandboxdError {
  return new SandboxdError("SBX_ERR_WORKSPACE", "workspace layer: the phase ended while its view was being mounted");
}

/** overlayfs' mount options take `,` `:` and `\` as syntax; a project path holding them cannot be a lower dir. */
const OVERLAY_UNSAFE = /[,:\\\s]/;

function quote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

async function sh(script: string, what: string): Promise<void> {
  try {
    await run("sh", ["-ec", script], { timeout: COMMAND_TIMEOUT_MS });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new SandboxdError("SBX_ERR_WORKSPACE", `workspace layer: ${what} failed: ${(e.stderr || e.message).trim()}`, { cause: err });
  }
}

/** Which mounts sit at `target` in a mount table (/proc/<pid>/mountinfo), bottom to top. */
export interface MountEntry {
  id: number;
  dev: string;
  fstype: string;
  /** per-mount options (rw/ro, …) */
  options: string;
  /** the file system's options (an overlay's upperdir=…) */
  superOptions: string;
}

export function mountsAt(mountinfo: string, target: string): MountEntry[] {
  const found: MountEntry[] = [];
  for (const line of mountinfo.split("\n")) {
    if (!line) continue;
    const [left, right] = line.split(" - ");
    if (!left || !right) continue;
    const f = left.split(" ");
    // mountinfo escapes space, tab, newline and backslash as octal
    const mp = (f[4] ?? "").replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    if (mp !== target) continue;
    const r = right.split(" ");
    found.push({ id: Number(f[0]), dev: f[2] ?? "", fstype: r[0] ?? "", options: f[5] ?? "", superOptions: r[2] ?? "" });
  }
  return found;
}

/**
 * st_dev → "major:minor" as in mountinfo: glibc's gnu_dev_major/minor, in
 * BigInt because JS shifts count modulo 32 (`dev >>> 32` is `dev`, which
 * once made anonymous devices past minor 255 — many overlays on the host —
 * read as major 1048576 and failed every phase start).
 */
export function devString(dev: number): string {
  const d = BigInt(dev);
  const major = ((d >> 8n) & 0xfffn) | ((d >> 32n) & 0xfffff000n);
  const minor = (d & 0xffn) | ((d >> 12n) & 0xffffff00n);
  return `${major}:${minor}`;
}

async function makeDirs(p: LayerPaths): Promise<void> {
  await mkdir(p.view, { recursive: true, mode: 0o755 });
  await mkdir(p.stage, { recursive: true, mode: 0o755 });
  await mkdir(p.layerMnt, { recursive: true, mode: 0o700 });
}

/** view/ a shared mount point, stage/ a private one (each made once). */
function mountPointsScript(p: LayerPaths): string[] {
  return [
    `if ! mountpoint -q ${quote(p.view)}; then mount --bind ${quote(p.view)} ${quote(p.view)}; mount --make-shared ${quote(p.view)}; fi`,
    // private whatever the host's / is (systemd makes it shared): flags set here stay local until the move
    `if ! mountpoint -q ${quote(p.stage)}; then mount --bind ${quote(p.stage)} ${quote(p.stage)}; mount --make-private ${quote(p.stage)}; fi`,
  ];
}

/** The layer's disk of `budgetBytes`, made and mounted at layer/ unless it is mounted there already. */
function diskScript(p: LayerPaths, budgetBytes: number): string[] {
  const mib = Math.max(16, Math.ceil(budgetBytes / (1024 * 1024)));
  // fallocate reserves the budget on the state dir's disk (a sparse image could
  // find the disk full before the budget); nodiscard keeps the reservation.
  //
  // With a journal, though nothing here needs one: ext4 without a journal
  // skips every inode number freed in the last 5 s (305 s while its inode
  // table block is not yet written back) when it makes a file, checking
  // each one — so after a checkpoint empties the upper, or a test suite
  // deletes its output, every create walks the thousands of freed inodes
  // (ext4's recently_deleted(), over half the CPU time under perf; a
  // write-heavy suite ran about 3× slower than with a journal:
  // bench/workspace-suite.mjs, BENCHMARKS.md).
  // The journal is small (16 MiB at a 1 GiB budget and up, mkfs's
  // default below); data=writeback and barrier=0 because the layer need
  // not survive a host crash: a layer found unmounted is made anew
  // (reattach), so no flush to the disk is ever worth its wait.
  const journal = mib >= 1024 ? "-J size=16 " : "";
  return [
    `if ! mountpoint -q ${quote(p.layerMnt)}; then`,
    `  rm -f ${quote(p.image)}`,
    `  fallocate -l ${mib}M ${quote(p.image)} 2>/dev/null || truncate -s ${mib}M ${quote(p.image)}`,
    `  mkfs.ext4 -q -F -m 0 ${journal}-E nodiscard,lazy_itable_init=1,lazy_journal_init=1 ${quote(p.image)}`,
    `  mount -o loop,nosuid,nodev,data=writeback,barrier=0 ${quote(p.image)} ${quote(p.layerMnt)}`,
    `fi`,
  ];
}

function unsupportedDisk(err: SandboxdError): never {
  throw new SandboxdError("SBX_ERR_WORKSPACE_UNSUPPORTED", `${err.message}`, {
    hint: "the daemon needs root, a loop device (losetup), mkfs.ext4 and room for the layer's budget in the state dir",
    cause: err,
  });
}

/**
 * A warm pool's slot (src/phases/pool.ts), before any project is known: the
 * mount points and the layer's disk, in one shell, so the phase that claims
 * it only mounts its view (`WorkspaceLayer.claimMount`).
 */
export async function prepareSlotLayer(phaseDir: string, budgetBytes: number): Promise<LayerPaths> {
  const p = layerPaths(phaseDir);
  await makeDirs(p);
  await sh([...mountPointsScript(p), ...diskScript(p, budgetBytes)].join("\n"), "preparing a pooled layer").catch(unsupportedDisk);
  return p;
}

/**
 * Everything a slot or a phase mounted under `phaseDir` unmounted (lazily)
 * and removed: the layer's view, stage and disk, and `extra` mount points
 * (a pooled container's package mount point). For a slot no phase claimed,
 * and for the end of a phase that claimed one before its layer was made.
 */
export async function destroySlotMounts(phaseDir: string, extra: readonly string[]): Promise<void> {
  const p = layerPaths(phaseDir);
  await sh(
    [p.view, p.stage, p.layerMnt, ...extra].map((m) => `while mountpoint -q ${quote(m)}; do umount -l ${quote(m)}; done`).join("\n"),
    "unmounting a pooled layer",
  );
  await rm(p.root, { recursive: true, force: true });
}

export class WorkspaceLayer {
  readonly paths: LayerPaths;
  /** st_dev of the layer's own file system: every file read from the upper must be on it */
  private upperDev = -1;
  /** a mount or attach under way: destroy waits for it, so nothing is mounted after the layer is gone */
  private inFlight: Promise<unknown> = Promise.resolve();

  private track<T>(p: Promise<T>): Promise<T> {
    this.inFlight = Promise.allSettled([this.inFlight, p]);
    return p;
  }

  constructor(readonly spec: LayerSpec) {
    this.paths = layerPaths(spec.phaseDir);
  }

  private hiddenFound: Promise<readonly string[]> | null = null;

  /** spec.hidden and what findHidden found (the walk runs once, on first need). */
  private hidden(): Promise<readonly string[]> {
    const find = this.spec.findHidden;
    if (!find) return Promise.resolve(this.spec.hidden);
    this.hiddenFound ??= find().then((more) => [...new Set([...this.spec.hidden, ...more])]);
    return this.hiddenFound;
  }

  /**
   * Step 1, before the container is created: the view mount point exists and
   * is shared, so the container's rslave bind follows what is mounted on it.
   * Cheap (one `sh`); the disk and overlay come in `mount()`, which may run
   * while the container starts.
   */
  prepare(): Promise<void> {
    // tracked like every mount: a destroy that comes while it runs waits for it
    return this.track(this.takeSpareOrMakeMountPoints());
  }

  /** the disk is mounted at layer/ already (a spare taken): `mount` makes no disk */
  private diskReady = false;

  /** The spare layer, when one of the phase's budget is ready, renamed into place; else the mount points made here. */
  private async takeSpareOrMakeMountPoints(): Promise<void> {
    if (this.destroyed) throw endedWhileMounting();
    this.checkProject();
    const spare = this.spec.takeSpare?.(this.spec.budgetBytes) ?? null;
    if (spare) {
      try {
        await mkdir(this.spec.phaseDir, { recursive: true });
        // the mounts in the folder move with it: view/ (shared), stage/ (private), layer/ (the disk) are this phase's
        await rename(spare, this.paths.root);
        // eslint-disable-next-line no-restricted-syntax -- the folder that held it is empty now; the spare's sweep removes it if this fails
        await rmdir(path.dirname(spare)).catch(() => undefined);
        this.diskReady = true;
        return;
      } catch {
        // (a ws/ already here: not a fresh phase) the spare is removed; the phase makes its own
        // eslint-disable-next-line no-restricted-syntax -- a spare that cannot be removed is swept at the next daemon start
        await destroySlotMounts(path.dirname(spare), []).catch(() => undefined);
      }
    }
    await this.makeMountPoints();
  }

  private async makeMountPoints(): Promise<void> {
    if (this.destroyed) throw endedWhileMounting();
    this.checkProject();
    await makeDirs(this.paths);
    // private whatever the host's / is (systemd makes it shared): flags set in stage/ stay local until the move
    await this.steps(
      [
        { op: "mount-point", target: this.paths.view, propagation: "shared" },
        { op: "mount-point", target: this.paths.stage, propagation: "private" },
      ],
      "making the view a shared mount point",
    );
  }

  private checkProject(): void {
    if (OVERLAY_UNSAFE.test(this.spec.project)) {
      throw new SandboxdError(
        "SBX_ERR_WORKSPACE_UNSUPPORTED",
        `project path ${this.spec.project} contains a comma, colon, backslash or white space, which overlayfs cannot take as a lower dir`,
        { hint: "move or link the project to a path without those characters" },
      );
    }
  }

  /**
   * For a phase that claimed a warm pool's container (src/phases/pool.ts):
   * the mount points and the layer's disk were made when the pool filled its
   * slot, and the container runs; what is left is the project's part — an
   * empty upper with its whiteouts and the view staged and moved onto view/
   * in one shell — checked in the container.
   */
  claimMount(containerPid: number | null): Promise<void> {
    if (this.destroyed) return Promise.reject(endedWhileMounting());
    return this.track(
      (async () => {
        this.checkProject();
        this.upperDev = (await stat(this.paths.layerMnt)).dev;
        const hiding = await this.freshUpper(true);
        if (this.destroyed) throw endedWhileMounting();
        // the whiteouts, the overlay, the read-only binds and the move onto view/: one request to the host helper
        await this.stageView(true, hiding);
        if (containerPid) await this.verifyInContainer(containerPid);
      })(),
    );
  }

  /**
   * Step 2, while the container starts: the layer's file system, an empty
   * upper, and the view put together in stage/.
   */
  mount(): Promise<void> {
    // a phase ended (destroy ran) before its disk was made gets no disk: nothing would unmount it
    if (this.destroyed) return Promise.reject(endedWhileMounting());
    return this.track(this.makeDisk());
  }

  private async makeDisk(): Promise<void> {
    const p = this.paths;
    // the walk for credential files (findHidden) runs while the disk is made; freshUpper awaits it
    // eslint-disable-next-line no-restricted-syntax -- only keeps a failure from being unhandled while the disk is made: freshUpper awaits the same promise and gets its error
    this.hidden().catch(() => undefined);
    if (!this.diskReady) await sh(diskScript(p, this.spec.budgetBytes).join("\n"), "creating the layer's disk").catch(unsupportedDisk);
    this.upperDev = (await stat(p.layerMnt)).dev;
    // the whiteouts, the overlay and the read-only binds: one request to the host helper
    const hiding = await this.freshUpper(true);
    await this.stageView(false, hiding);
  }

  /**
   * Step 3, once the container exists: the staged view is moved onto view/
   * and so appears at the container's /workspace (checked there when its
   * init's pid is given). The pid may still be on its way: the move does not
   * need it, only the check after it.
   */
  attach(containerPid: number | null | Promise<number | null>): Promise<void> {
    if (this.destroyed) return Promise.reject(endedWhileMounting());
    return this.track(
      (async () => {
        await this.steps([{ op: "move", source: this.paths.stage, target: this.paths.view }], "mounting the view");
        const pid = await containerPid;
        if (pid) await this.verifyInContainer(pid);
      })(),
    );
  }

  private destroyed = false;

  /**
   * Privileged host steps in order, stopping at the first failure: through
   * the daemon's one host helper (no process start-up), or as a shell script
   * where the helper cannot run (or `hostHelper: false`).
   */
  private async steps(steps: HostStep[], what: string): Promise<void> {
    if (steps.length === 0) return;
    if (this.spec.hostHelper !== false) {
      try {
        await hostHelper().run(steps);
        return;
      } catch (err) {
        if (!(err instanceof HelperUnavailable)) {
          if (err instanceof SandboxdError) throw err;
          throw new SandboxdError("SBX_ERR_WORKSPACE", `workspace layer: ${what} failed: ${(err as Error).message}`, { cause: err });
        }
      }
    }
    await sh(stepsToShell(steps), what);
  }

  /** The extended attribute `name` of each path (not following links); null where absent. Never a silent null on an error. */
  private async xattrs(paths: string[], name: string): Promise<(string | null)[]> {
    if (this.spec.hostHelper !== false) {
      try {
        return await hostHelper().xattrs(paths, name);
      } catch (err) {
        if (!(err instanceof HelperUnavailable)) {
          throw new SandboxdError("SBX_ERR_WORKSPACE", `workspace layer: reading ${name} failed: ${(err as Error).message}`, { cause: err });
        }
      }
    }
    const out: (string | null)[] = [];
    for (const p of paths) out.push(await xattr(p, name));
    return out;
  }

  /** After a daemon restart: the mounts outlive the daemon; put back what is missing. */
  async reattach(): Promise<void> {
    // its own mount points, never a spare: the phase's ws/ is there already
    await this.track(this.makeMountPoints());
    const info = await readFile("/proc/self/mountinfo", "utf8");
    const layerMounted = mountsAt(info, this.paths.layerMnt).length > 0;
    if (!layerMounted) {
      // the disk is gone (host reboot): the pending iteration is lost with it
      await this.mount();
      return;
    }
    this.upperDev = (await stat(this.paths.layerMnt)).dev;
    const top = mountsAt(info, this.paths.view).at(-1);
    if (top && this.isOurs(top)) return;
    // the daemon died between unmount and mount: the upper is what it was
    const staged = mountsAt(info, this.paths.stage).some((m) => this.isOurs(m));
    if (!staged) await this.stageView();
    await this.steps([{ op: "move", source: this.paths.stage, target: this.paths.view }], "mounting the view");
  }

  /** this phase's overlay (a mount table entry naming our upper dir) */
  private isOurs(m: MountEntry): boolean {
    return m.fstype === "overlay" && m.superOptions.split(",").includes(`upperdir=${this.paths.upper}`);
  }

  private overlayOptions(): string {
    const p = this.paths;
    // redirect_dir=off: a folder of the project renamed inside is copied, not
    // recorded as a redirect we would have to follow; metacopy=off: a chmod
    // copies the whole file up, so the upper alone says what the file is now.
    return `lowerdir=${this.spec.project},upperdir=${p.upper},workdir=${p.work},redirect_dir=off,metacopy=off,index=off`;
  }

  /** The overlay and the read-only binds, in stage/ (a private mount point, so the ro flags are set before anything is propagated). */
  private async stageView(thenMove = false, before: readonly HostStep[] = []): Promise<void> {
    const p = this.paths;
    const steps: HostStep[] = [...before, { op: "overlay", target: p.stage, options: this.overlayOptions() }];
    const hidden = await this.hidden();
    for (const rel of this.spec.readOnly) {
      // only a real file or folder of the project: a symbolic link there would
      // make mount(8) bind whatever it points to on the host
      const src = path.join(this.spec.project, rel);
      // (a few names, at the start: sync, no trip through the thread pool)
      const st = lstatSync(src, { throwIfNoEntry: false });
      if (!st || !(st.isFile() || st.isDirectory())) continue;
      const dst = path.join(p.stage, rel);
      // a folder holding a credential file (.git/id_rsa) is bound from the overlay, whose whiteout hides it; the project's own folder would show it
      const source = st.isDirectory() && hidden.some((h) => h.startsWith(`${rel}/`)) ? dst : src;
      steps.push({ op: "bind", source, target: dst }, { op: "remount-ro", target: dst });
    }
    // at a remount, the move onto view/ (attach) in the same request
    if (thenMove) steps.push({ op: "move", source: p.stage, target: p.view });
    await this.steps(steps, "mounting the overlay").catch((err: SandboxdError) => {
      throw new SandboxdError(
        "SBX_ERR_WORKSPACE_UNSUPPORTED",
        `${err.message} (project ${this.spec.project})`,
        { hint: "the project must be on a local file system overlayfs accepts as a lower layer (ext4, xfs, btrfs, tmpfs…), and the state dir on one with d_type and trusted xattrs", cause: err },
      );
    });
  }

  /**
   * An empty upper and work dir, with the whiteouts that hide credential
   * files; `deferHiding`: the whiteouts are returned, to go in the caller's
   * own request to the host helper with the overlay (one round trip fewer at a pooled claim).
   */
  private async freshUpper(deferHiding = false): Promise<HostStep[]> {
    const p = this.paths;
    // a used upper (an iteration's files) is removed off the event loop; a new disk has none
    if (lstatSync(p.upper, { throwIfNoEntry: false })) {
      await rm(p.upper, { recursive: true, force: true }).catch(async (err: NodeJS.ErrnoException) => {
        if (err.code !== "ENAMETOOLONG") throw err;
        // a tree deeper than PATH_MAX, made in the sandbox with relative paths: rm(1) walks it by descriptor
        await run("rm", ["-rf", "--one-file-system", p.upper], { timeout: COMMAND_TIMEOUT_MS });
      });
    }
    if (lstatSync(p.work, { throwIfNoEntry: false })) await rm(p.work, { recursive: true, force: true });
    // the rest is a few metadata calls on the layer's own disk, made sync: at a start each
    // trip through the thread pool costs a wake-up of one of its threads
    mkdirSync(p.upper, { mode: 0o755 });
    mkdirSync(p.work, { mode: 0o700 });
    // the view's root takes the upper's owner and mode: make them the project's
    const root = statSync(this.spec.project);
    chownSync(p.upper, root.uid, root.gid);
    chmodSync(p.upper, root.mode & 0o7777);
    const whiteouts: HostStep[] = [];
    const made = new Set<string>();
    for (const rel of await this.hidden()) {
      // a folder on the way takes the project's owner and mode, so the view shows it as it is
      const parts = rel.split("/");
      for (let i = 1; i < parts.length; i++) {
        const dir = parts.slice(0, i).join("/");
        if (made.has(dir)) continue;
        made.add(dir);
        const up = path.join(p.upper, dir);
        const low = statSync(path.join(this.spec.project, dir));
        mkdirSync(up);
        chownSync(up, low.uid, low.gid);
        chmodSync(up, low.mode & 0o7777);
      }
      whiteouts.push({ op: "whiteout", path: path.join(p.upper, rel) });
    }
    if (deferHiding) return whiteouts;
    await this.steps(whiteouts, "hiding credential files");
    return [];
  }

  /**
   * Unmount the view on the host and in the container, so neither the project
   * nor the upper can change under the caller. `containerPid` is the
   * container's init (its mount namespace); null when the container is gone.
   */
  async unmount(containerPid: number | null): Promise<void> {
    const p = this.paths;
    const info = await readFile("/proc/self/mountinfo", "utf8");
    // lazily: the overlay and the binds on it go at once, whoever still looks
    const steps: HostStep[] = [p.view, p.stage].filter((where) => mountsAt(info, where).some((m) => this.isOurs(m))).map((target) => ({ op: "umount-lazy", target }));
    await this.steps(steps, "unmounting the view");
    if (containerPid) await this.detachStale(containerPid);
  }

  /** A copy of the overlay that stayed in the container (a process's cwd pinned it) is detached there. */
  private async detachStale(pid: number): Promise<void> {
    for (let i = 0; i < 8; i++) {
      let info: string;
      try {
        info = await readFile(`/proc/${pid}/mountinfo`, "utf8");
      } catch {
        return; // container gone
      }
      const top = mountsAt(info, "/workspace").at(-1);
      if (!top || !this.isOurs(top)) return;
      // -p as well: umount(8) reads /proc/self/mountinfo, which only resolves inside the container's pid namespace
      await sh(`nsenter -t ${pid} -m -p umount -l /workspace`, "detaching a stale view in the container");
    }
    throw new SandboxdError("SBX_ERR_WORKSPACE", "workspace layer: the container's /workspace could not be detached");
  }

  /**
   * Empty the upper and mount the view again: the container sees the project
   * as it is now (after an accept: with the iteration applied). Checks that
   * the new overlay reached the container.
   */
  async reset(containerPid: number | null): Promise<void> {
    await this.unmount(containerPid);
    await this.freshUpper();
    if (this.destroyed) throw endedWhileMounting();
    await this.track(
      (async () => {
        await this.stageView(true);
        if (containerPid) await this.verifyInContainer(containerPid);
      })(),
    );
  }

  private async verifyInContainer(pid: number): Promise<void> {
    // sync: a stat and a small procfs file (readFile is four trips through the thread pool)
    const want = devString(statSync(this.paths.view).dev);
    let info: string;
    try {
      info = readFileSync(`/proc/${pid}/mountinfo`, "utf8");
    } catch {
      return;
    }
    const top = mountsAt(info, "/workspace").at(-1);
    if (top?.dev !== want) {
      throw new SandboxdError("SBX_ERR_WORKSPACE", `workspace layer: the remounted view did not reach the container (its /workspace is ${top?.fstype ?? "missing"} ${top?.dev ?? ""}, the view is ${want})`, {
        hint: "the state dir must be on a mount the Docker engine sees with the same propagation; see docs/WORKSPACE.md",
      });
    }
  }

  /** Everything unmounted and removed (phase end). */
  async destroy(containerPid: number | null): Promise<void> {
    const p = this.paths;
    this.destroyed = true;
    await this.inFlight;
    // eslint-disable-next-line no-restricted-syntax -- destroy goes on whatever the unmount says: the lazy unmounts below detach what is left
    await this.unmount(containerPid).catch(() => undefined);
    await sh(
      [
        `while mountpoint -q ${quote(p.view)}; do umount -l ${quote(p.view)}; done`,
        `while mountpoint -q ${quote(p.stage)}; do umount -l ${quote(p.stage)}; done`,
        `while mountpoint -q ${quote(p.layerMnt)}; do umount -l ${quote(p.layerMnt)}; done`,
      ].join("\n"),
      "unmounting the layer",
    );
    await rm(p.root, { recursive: true, force: true });
  }

  /* ------------------------------ reading ------------------------------ */

  /**
   * The pending iteration: walks the upper dir only, so it costs time in the
   * number of changes, not in the size of the project.
   */
  async changes(): Promise<ChangeSet> {
    if (this.upperDev < 0) this.upperDev = (await stat(this.paths.layerMnt)).dev;
    // every folder that could be opaque, read in one request: the walk asks for each such folder
    const upper = this.paths.upper;
    const candidates = await opaqueCandidates(upper, this.spec.project);
    const values = await this.xattrs(candidates.map((rel) => path.join(upper, rel)), OPAQUE);
    const known = new Map(candidates.map((rel, i) => [rel, values[i] === "y"]));
    const isOpaque = async (rel: string): Promise<boolean> => known.get(rel) ?? (await this.xattrs([path.join(upper, rel)], OPAQUE))[0] === "y";
    const w = new UpperWalk(upper, this.spec.project, new Set(await this.hidden()), isOpaque);
    await w.walk("", true);
    const changes = await pairRenames(w.out, this.paths.upper, this.spec.project, this.upperDev);
    const limits = { tooLong: w.tooLong, notUtf8: w.notUtf8, truncated: w.truncated };
    return w.tooLong.length > 0 || w.notUtf8.length > 0 || w.truncated ? { changes, limits } : { changes };
  }

  /**
   * The bytes of a changed file as the phase wrote it, read from the upper
   * without following any link and only from the layer's own file system.
   */
  async readUpper(rel: string, maxBytes: number): Promise<Buffer | null> {
    return readRegular(this.paths.upper, rel, maxBytes, this.upperDev);
  }

  /** The file's bytes in the project (the last accepted state), never through a link. */
  async readProject(rel: string, maxBytes: number): Promise<Buffer | null> {
    return readRegular(this.spec.project, rel, maxBytes, null);
  }

  /**
   * The view as the host sees it (the overlay, the phase's changes over the
   * project): what a command in the sandbox reads at /workspace. The real
   * path, for prefix checks.
   */
  async viewRoot(): Promise<string> {
    return realpath(this.paths.view);
  }

  async upperDevice(): Promise<number> {
    if (this.upperDev < 0) this.upperDev = (await stat(this.paths.layerMnt)).dev;
    return this.upperDev;
  }

  /** Bytes used on the layer's disk. */
  async usedBytes(): Promise<number> {
    const { stdout } = await run("df", ["-B1", "--output=used", this.paths.layerMnt]);
    return Number(stdout.trim().split("\n").at(-1) ?? 0);
  }
}

/* --------------------------- the upper walk --------------------------- */

/**
 * Folders tools write as a by-product (pytest's cache, bytecode, mypy's
 * cache): never part of an iteration, never applied; they live in the layer
 * until the next checkpoint empties it.
 */
export const TOOL_CACHES: ReadonlySet<string> = new Set(["__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"]);

const WHITEOUT = (st: { isCharacterDevice(): boolean; rdev: number }) => st.isCharacterDevice() && st.rdev === 0;

const OPAQUE = "trusted.overlay.opaque";

/**
 * The upper's folders whose project counterpart is a folder too (the ones
 * an opaque mark changes the meaning of), below folders of the same kind;
 * tool caches left out as the walk leaves them. A folder made after this
 * list is asked for on its own by the walk.
 */
async function opaqueCandidates(upper: string, lower: string): Promise<string[]> {
  const out: string[] = [];
  const visit = async (rel: string): Promise<void> => {
    const entries = await readdir(path.join(upper, rel), { withFileTypes: true, encoding: "buffer" });
    for (const e of entries) {
      const name = e.name.toString("utf8");
      // a name that is not UTF-8 has no string that names it: the walk leaves it out (and the judge refuses the iteration)
      if (!e.isDirectory() || TOOL_CACHES.has(name) || !Buffer.from(name).equals(e.name)) continue;
      const r = rel ? `${rel}/${name}` : name;
      const low = await lstat(path.join(lower, r)).catch(() => null);
      if (!low?.isDirectory()) continue;
      out.push(r);
      await visit(r);
    }
  };
  await visit("");
  return out;
}

/** One attribute with one process (getfattr, else python3): the path without the host helper. */
async function xattr(file: string, name: string): Promise<string | null> {
  // Node has no getxattr; getfattr is one process per opaque candidate
  // (folders only, and only those in the upper)
  try {
    const { stdout } = await run("getfattr", ["--absolute-names", "--only-values", "-h", "-n", name, file]);
    return stdout;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") return null; // no such attribute
  }
  // no getfattr on this host: Python's os.getxattr. Never a silent "not
  // opaque": a folder removed and made again would hide its lost files from
  // the judge (and the apply would keep them)
  try {
    const { stdout } = await run("python3", ["-I", "-c", XATTR_PY, file, name]);
    return stdout === "" ? null : stdout.slice(1);
  } catch (err) {
    throw new SandboxdError("SBX_ERR_WORKSPACE_UNSUPPORTED", `cannot read ${name} of ${file}: neither getfattr nor python3 works`, {
      hint: "install getfattr (Debian/Ubuntu: apt-get install attr) on the daemon's host",
      cause: err,
    });
  }
}

/** Prints "=" and the value, or nothing when the attribute is absent; fails on any other error. */
const XATTR_PY = [
  "import errno, os, sys",
  "try:",
  "    v = os.getxattr(sys.argv[1], sys.argv[2], follow_symlinks=False)",
  "except OSError as e:",
  "    if e.errno == errno.ENODATA: sys.exit(0)",
  "    raise",
  "sys.stdout.write('=' + v.decode('latin-1'))",
].join("\n");

class UpperWalk {
  readonly out: FileChange[] = [];
  /** paths over MAX_CHANGE_PATH_BYTES, not descended into (a few kept) */
  readonly tooLong: string[] = [];
  /** stopped at MAX_CHANGES */
  truncated = false;
  /** names that are not UTF-8 (a few), shown with U+FFFD, not read */
  readonly notUtf8: string[] = [];
  constructor(
    private readonly upper: string,
    private readonly lower: string,
    private readonly hidden: ReadonlySet<string>,
    private readonly isOpaque: (rel: string) => Promise<boolean>,
  ) {}

  /** `lowerVisible`: the lower at this folder still shows through (not a new or opaque folder). */
  async walk(rel: string, lowerVisible: boolean): Promise<void> {
    const dir = path.join(this.upper, rel);
    const names = await this.names(dir, rel);
    for (const name of names) {
      const r = rel ? `${rel}/${name}` : name;
      const up = await lstat(path.join(dir, name));
      if (up.isDirectory() && TOOL_CACHES.has(name)) continue;
      if (WHITEOUT(up) && this.hidden.has(r)) continue; // planted by the daemon
      if (this.full()) return;
      if (this.tooLongPath(r)) continue;
      // a hidden path is absent from the view: whatever is there now was created
      const low = lowerVisible && !this.hidden.has(r) ? await lstat(path.join(this.lower, r)).catch(() => null) : null;
      if (WHITEOUT(up)) {
        if (this.hidden.has(r)) continue; // planted by the daemon
        if (low) await this.deleted(r, low.isDirectory());
        continue;
      }
      if (up.isDirectory()) {
        if (low && !low.isDirectory()) {
          await this.deleted(r, false);
          this.out.push({ kind: "create", path: r, isDir: true, sizeBytes: 0, mode: up.mode & 0o7777 });
          await this.walk(r, false);
          continue;
        }
        if (!low) {
          this.out.push({ kind: "create", path: r, isDir: true, sizeBytes: 0, mode: up.mode & 0o7777 });
          await this.walk(r, false);
          continue;
        }
        const opaque = await this.isOpaque(r);
        if (opaque) {
          // removed and made again: what the lower had and the upper lacks is gone
          const inUpper = new Set(await this.names(path.join(dir, name), r));
          for (const child of await this.names(path.join(this.lower, r), r)) {
            if (inUpper.has(child)) continue;
            const cst = await lstat(path.join(this.lower, r, child));
            await this.deleted(`${r}/${child}`, cst.isDirectory());
          }
        }
        if ((up.mode & 0o7777) !== (low.mode & 0o7777)) {
          this.out.push({ kind: "modify", path: r, isDir: true, sizeBytes: 0, mode: up.mode & 0o7777, modeOnly: true });
        }
        await this.walk(r, !opaque);
        continue;
      }
      // a file, link or special file
      const mode = up.mode & 0o7777;
      if (low && low.isDirectory()) {
        await this.deleted(r, true);
        this.out.push({ kind: "create", path: r, isDir: false, sizeBytes: up.size, mode });
        continue;
      }
      if (!low) {
        this.out.push({ kind: "create", path: r, isDir: false, sizeBytes: up.size, mode });
        continue;
      }
      const sameKind = (low.isFile() && up.isFile()) || (low.isSymbolicLink() && up.isSymbolicLink());
      if (sameKind && low.size === up.size && (await sameContent(path.join(this.upper, r), path.join(this.lower, r), up.isSymbolicLink()))) {
        // copied up without a change in content (opened for writing, touched, chmod)
        if ((up.mode & 0o7777) !== (low.mode & 0o7777)) {
          this.out.push({ kind: "modify", path: r, isDir: false, sizeBytes: up.size, mode, modeOnly: true });
        }
        continue;
      }
      this.out.push({ kind: "modify", path: r, isDir: false, sizeBytes: up.size, mode });
    }
  }

  /**
   * A folder's entries, sorted. A name that is not UTF-8 (`b'\xff.py'`) has
   * no string that names it — Node would hand back U+FFFD, another file — so
   * it is noted (the judge refuses the iteration for it) and left out.
   */
  private async names(dir: string, rel: string): Promise<string[]> {
    const out: string[] = [];
    for (const b of await readdir(dir, { encoding: "buffer" })) {
      const name = b.toString("utf8");
      if (Buffer.from(name).equals(b)) out.push(name);
      else if (this.notUtf8.length < 10) this.notUtf8.push(rel ? `${rel}/${name}` : name);
    }
    return out.sort();
  }

  /** The change cap is reached: the walk stops (the judge refuses the iteration for it). */
  private full(): boolean {
    if (this.out.length < MAX_CHANGES) return false;
    this.truncated = true;
    return true;
  }

  /** `r` is longer than the daemon reads: noted (a few), not read nor descended into (the judge refuses the iteration for it). */
  private tooLongPath(r: string): boolean {
    if (Buffer.byteLength(r) <= MAX_CHANGE_PATH_BYTES) return false;
    if (this.tooLong.length < 10) this.tooLong.push(Buffer.from(r).subarray(0, MAX_CHANGE_PATH_BYTES).toString("utf8"));
    return true;
  }

  /** A deletion; a folder's is listed file by file (deepest first), so the judge counts what was lost. */
  private async deleted(rel: string, isDir: boolean): Promise<void> {
    if (this.full() || this.tooLongPath(rel)) return;
    if (isDir) {
      for (const child of await this.names(path.join(this.lower, rel), rel)) {
        const cst = await lstat(path.join(this.lower, rel, child));
        await this.deleted(`${rel}/${child}`, cst.isDirectory());
      }
    }
    this.out.push({ kind: "delete", path: rel, isDir, sizeBytes: 0 });
  }
}

async function sameContent(a: string, b: string, links: boolean): Promise<boolean> {
  if (links) {
    const { readlink } = await import("node:fs/promises");
    return (await readlink(a)) === (await readlink(b));
  }
  const fa = await open(a, fsc.O_RDONLY | fsc.O_NOFOLLOW);
  const fb = await open(b, fsc.O_RDONLY | fsc.O_NOFOLLOW).catch(async (e) => {
    await fa.close();
    throw e;
  });
  try {
    const ba = Buffer.allocUnsafe(1 << 20);
    const bb = Buffer.allocUnsafe(1 << 20);
    for (;;) {
      const [ra, rb] = await Promise.all([fa.read(ba, 0, ba.length, null), fb.read(bb, 0, bb.length, null)]);
      if (ra.bytesRead !== rb.bytesRead) return false;
      if (ra.bytesRead === 0) return true;
      if (ba.compare(bb, 0, rb.bytesRead, 0, ra.bytesRead) !== 0) return false;
    }
  } finally {
    await fa.close();
    await fb.close();
  }
}

/** File comparisons pairRenames makes at most per change set. */
const MAX_RENAME_COMPARISONS = 2000;

/**
 * overlayfs records a file's rename as a whiteout at the old path and a copy
 * at the new one: a deleted file and a created file with the same bytes are
 * shown as one rename. Only unambiguous pairs (one candidate each way).
 */
async function pairRenames(changes: FileChange[], upper: string, lower: string, upperDev: number): Promise<FileChange[]> {
  const deletes = changes.filter((c) => c.kind === "delete" && !c.isDir);
  const creates = changes.filter((c) => c.kind === "create" && !c.isDir);
  if (deletes.length === 0 || creates.length === 0) return changes;
  const sizeOf = new Map<string, number>();
  for (const d of deletes) {
    const st = await lstat(path.join(lower, d.path)).catch(() => null);
    if (st?.isFile()) sizeOf.set(d.path, st.size);
  }
  const used = new Set<FileChange>();
  const renamed = new Map<FileChange, FileChange>();
  // many same-size deletes and creates would cost deletes × creates file reads
  // while the checkpoint holds the gate; past the budget a rename stays a
  // delete and a create (each judged as such: never looser)
  let budget = MAX_RENAME_COMPARISONS;
  for (const c of creates) {
    const candidates = deletes.filter((d) => !used.has(d) && sizeOf.get(d.path) === c.sizeBytes);
    const matches: FileChange[] = [];
    for (const d of candidates) {
      if (budget-- <= 0) break;
      const up = await lstat(path.join(upper, c.path)).catch(() => null);
      if (!up?.isFile() || up.dev !== upperDev) break;
      if (await sameContent(path.join(upper, c.path), path.join(lower, d.path), false).catch(() => false)) matches.push(d);
      if (matches.length > 1) break;
    }
    if (matches.length === 1) {
      used.add(matches[0]!);
      renamed.set(c, matches[0]!);
    }
  }
  const out: FileChange[] = [];
  for (const ch of changes) {
    if (used.has(ch)) continue;
    const from = renamed.get(ch);
    if (from) {
      const lowMode = (await lstat(path.join(lower, from.path))).mode & 0o7777;
      const r: FileChange = { kind: "rename", path: ch.path, from: from.path, isDir: false, sizeBytes: ch.sizeBytes };
      if (ch.mode !== undefined && ch.mode !== lowMode) r.mode = ch.mode;
      out.push(r);
    } else out.push(ch);
  }
  return out;
}

/**
 * Reads a regular file under `root` at a project-relative path, never through
 * a symbolic link (every component is checked), at most `maxBytes`. null when
 * the path does not name a regular file there.
 */
export async function readRegular(root: string, rel: string, maxBytes: number, requireDev: number | null): Promise<Buffer | null> {
  const parts = rel.split("/");
  let cur = root;
  for (const part of parts.slice(0, -1)) {
    cur = path.join(cur, part);
    const st = await lstat(cur).catch(() => null);
    if (!st?.isDirectory()) return null;
  }
  let fh;
  try {
    fh = await open(path.join(root, rel), fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch {
    return null;
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) return null;
    if (requireDev !== null && st.dev !== requireDev) return null;
    const buf = Buffer.alloc(Math.min(st.size, maxBytes));
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}
