/**
 * A project's package environment: what `pip install` puts in the user site,
 * and pip's cache, kept from one phase of the project to the next.
 *
 * Without it every install lands on the phase's /tmp (HOME) and is lost at
 * stop. With it, each project has, in the state dir:
 *
 *   projects/<key>/packages.img   an ext4 image of the project's package
 *                                 budget (workspace.disk.packagesBytes), made
 *                                 at the project's first phase
 *   projects/<key>/packages/      where it is loop-mounted while a phase of
 *                                 the project runs; bound into each of its
 *                                 containers at PACKAGES_DIR
 *
 * `<key>` is the SHA-256 of the project's real path: one image per project,
 * never shared with another (a phase sees only its own project's packages).
 * The image is the budget: a full one is ENOSPC for pip in this project only.
 *
 * The disk is mounted by the first phase of a project and unmounted when its
 * last one ends (users counted here, per project, every change under that
 * project's lock). A daemon that restarts finds the mount in place and
 * counts re-adopted phases again; mounting an image that is already attached
 * reuses its loop device (util-linux), so the file system is never mounted
 * twice through two devices.
 *
 * What lands there is the agent's: the daemon never runs or imports it on the
 * host, it only mounts the image (nosuid,nodev; not noexec, which a bind
 * would carry into the container, where compiled extensions must load).
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { chown, mkdir, readFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { SandboxdError } from "../errors.js";
import { mountsAt } from "./layer.js";

const run = promisify(execFile);
const COMMAND_TIMEOUT_MS = 60_000;

/** Inside the container: the project's package disk (PYTHONUSERBASE and PIP_CACHE_DIR below it). */
export const PACKAGES_DIR = "/opt/sandboxd-packages";
export const PACKAGES_ENV = {
  PYTHONUSERBASE: `${PACKAGES_DIR}/user`,
  PIP_CACHE_DIR: `${PACKAGES_DIR}/cache`,
  /** console scripts of installed packages (pip puts them in PYTHONUSERBASE/bin) */
  bin: `${PACKAGES_DIR}/user/bin`,
} as const;

export const DEFAULT_PACKAGES_BYTES = 1024 * 1024 * 1024;

export function projectKey(project: string): string {
  return createHash("sha256").update(project).digest("hex").slice(0, 24);
}

function quote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

export class ProjectPackages {
  /** phases using each project's disk now, by key */
  private users = new Map<string, number>();
  /** one change at a time per project */
  private locks = new Map<string, Promise<unknown>>();

  constructor(private readonly stateDir: string) {}

  paths(project: string): { root: string; image: string; mnt: string } {
    const root = path.join(this.stateDir, "projects", projectKey(project));
    return { root, image: path.join(root, "packages.img"), mnt: path.join(root, "packages") };
  }

  private locked<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(key) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    this.locks.set(
      key,
      next.then(
        () => undefined,
        () => undefined,
      ),
    );
    return next;
  }

  /**
   * A phase of `project` will run (or was re-adopted): its disk is mounted
   * (made first, of `budgetBytes`, at the project's first phase) and owned by
   * the project's owner. Returns the host folder to bind at PACKAGES_DIR.
   * `bindAt`: a shared mount point it is bound on as well (a pooled container's).
   */
  acquire(project: string, owner: { uid: number; gid: number }, budgetBytes: number, opts: { bindAt?: string } = {}): Promise<string> {
    const key = projectKey(project);
    return this.locked(key, async () => {
      const p = this.paths(project);
      await mkdir(p.mnt, { recursive: true, mode: 0o700 });
      const mib = Math.max(16, Math.ceil(budgetBytes / (1024 * 1024)));
      try {
        await run(
          "sh",
          [
            "-ec",
            [
              `if ! mountpoint -q ${quote(p.mnt)}; then`,
              `  if [ ! -f ${quote(p.image)} ]; then`,
              `    fallocate -l ${mib}M ${quote(p.image)}.new 2>/dev/null || truncate -s ${mib}M ${quote(p.image)}.new`,
              `    mkfs.ext4 -q -F -m 0 -O ^has_journal -E nodiscard,lazy_itable_init=1 ${quote(p.image)}.new`,
              `    mv ${quote(p.image)}.new ${quote(p.image)}`,
              `  fi`,
              `  mount -o loop,nosuid,nodev ${quote(p.image)} ${quote(p.mnt)}`,
              `fi`,
              // a warm pool's container: the disk also on its package mount point (src/phases/pool.ts), in the same shell
              ...(opts.bindAt ? [`mount --bind ${quote(p.mnt)} ${quote(opts.bindAt)}`] : []),
            ].join("\n"),
          ],
          { timeout: COMMAND_TIMEOUT_MS },
        );
      } catch (err) {
        const e = err as { stderr?: string; message: string };
        throw new SandboxdError("SBX_ERR_WORKSPACE_UNSUPPORTED", `the project's package disk could not be mounted: ${(e.stderr || e.message).trim()}`, {
          hint: "the daemon needs root, a loop device (losetup), mkfs.ext4 and room for workspace.disk.packagesBytes in the state dir",
          cause: err,
        });
      }
      // the project's owner writes it (pip runs as that uid); the same owner for every phase of the project
      for (const dir of [p.mnt, path.join(p.mnt, "user"), path.join(p.mnt, "cache")]) {
        await mkdir(dir, { recursive: true });
        await chown(dir, owner.uid, owner.gid);
      }
      this.users.set(key, (this.users.get(key) ?? 0) + 1);
      return p.mnt;
    });
  }

  /** A phase of `project` ended (its container is gone): the last one unmounts the disk. */
  release(project: string): Promise<void> {
    const key = projectKey(project);
    return this.locked(key, async () => {
      const n = (this.users.get(key) ?? 1) - 1;
      if (n > 0) {
        this.users.set(key, n);
        return;
      }
      this.users.delete(key);
      const p = this.paths(project);
      const info = await readFile("/proc/self/mountinfo", "utf8");
      if (mountsAt(info, p.mnt).length === 0) return;
      // lazy: a container being removed may still hold it for a moment; the loop device is freed with the last holder
      await run("umount", ["-l", p.mnt], { timeout: COMMAND_TIMEOUT_MS });
    });
  }

  /**
   * After a restart's reconcile: every package disk mounted under the state
   * dir that no phase counts as a user (their phases ended while no daemon
   * ran, or in a start a crash cut short) is unmounted.
   */
  async sweep(): Promise<void> {
    const root = path.join(this.stateDir, "projects") + path.sep;
    const info = await readFile("/proc/self/mountinfo", "utf8");
    const mounted = new Set<string>();
    for (const line of info.split("\n")) {
      const mp = (line.split(" ")[4] ?? "").replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
      if (mp.startsWith(root) && path.basename(mp) === "packages") mounted.add(mp);
    }
    for (const mnt of mounted) {
      const key = path.basename(path.dirname(mnt));
      await this.locked(key, async () => {
        if ((this.users.get(key) ?? 0) > 0) return;
        await run("umount", ["-l", mnt], { timeout: COMMAND_TIMEOUT_MS });
      });
    }
  }

  /** Bytes used on a project's package disk (0 when it is not mounted). */
  async usedBytes(project: string): Promise<number> {
    const p = this.paths(project);
    const info = await readFile("/proc/self/mountinfo", "utf8");
    if (mountsAt(info, p.mnt).length === 0) return 0;
    const { stdout } = await run("df", ["-B1", "--output=used", p.mnt], { timeout: COMMAND_TIMEOUT_MS });
    return Number(stdout.trim().split("\n").pop() ?? 0);
  }
}
