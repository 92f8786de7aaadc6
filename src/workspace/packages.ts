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
 *
 * What persists is what pip wrote, nothing else. The disk is writable by
 * the project's owner in the sandbox, and it is not the workspace: no
 * iteration judges it, no diff shows it. Left as it was, a phase could plant
 * a `usercustomize.py`, a `.pth` or a console script named `pytest` there
 * and have it run at every Python start of the project's later phases,
 * unseen. So the daemon keeps a manifest of the disk in the state dir
 * (`projects/<key>/packages.manifest.json`, out of the sandbox's reach):
 * after every pip command (`pip …`, `python -m pip …`) it records each entry
 * pip created or changed (the inode's ctime is at or after the command's
 * start: ctime is the kernel's, no utime() sets it) or that was in the
 * manifest unchanged (same inode, same ctime); anything else is left out.
 * When a project's disk is mounted for the first of its phases (no phase of
 * it runs), every entry not in the manifest as it was recorded — planted,
 * edited, replaced or renamed outside pip — is removed, on the host, without
 * following links, and the phase's trail says what (`packages.verify`). A
 * disk with no manifest (made before this) is emptied once.
 *
 * What this does not close (docs/POLICY-MATRIX.md "Not yet enforced"): what
 * pip itself installs is kept whatever it is (a wheel the agent built itself
 * may carry a `.pth`), as is what another command of the phase, or another
 * phase of the same project, writes there while a pip command runs; and
 * within a phase, and between phases of one project running at the same
 * time, the disk is shared as it is.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { constants } from "node:fs";
import { chown, lstat, mkdir, open, readFile, readdir, rm } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { SandboxdError } from "../errors.js";
import { JsonFileWriter } from "../util/fs.js";
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

/** One entry of the disk as the manifest knows it: its type, inode and change time (ns), as strings (bigints). */
interface ManifestEntry {
  t: "f" | "d" | "l" | "o";
  ino: string;
  c: string;
}
type Manifest = Record<string, ManifestEntry>;

/** The folders the daemon itself makes (and mkfs' lost+found): always kept. */
const OWN_DIRS = new Set(["user", "cache", "lost+found"]);

/**
 * pip's arguments when argv is a pip command (what may write the package
 * disk and be kept): `pip …`, `pip3 …`, `python3 [-flags] -m pip …`; null
 * for anything else.
 */
export function pipArgs(argv: readonly string[]): string[] | null {
  const prog = path.basename(argv[0] ?? "");
  if (/^pip(3(\.\d+)?)?$/.test(prog)) return argv.slice(1);
  if (!/^python(3(\.\d+)?)?$/.test(prog)) return null;
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!;
    if (!a.startsWith("-") || a.startsWith("--") || a === "-") return null;
    const m = a.indexOf("m");
    // flags before m must be value-less ones (-I, -s, -E, -B, -u …); -c, -W, -X take a value
    if (/[cWX]/.test(m < 0 ? a : a.slice(0, m))) return null;
    if (m < 0) continue;
    const mod = a.slice(m + 1) || argv[i + 1];
    const restAt = a.slice(m + 1) ? i + 1 : i + 2;
    return mod === "pip" ? argv.slice(restAt) : null;
  }
  return null;
}

/**
 * What runs for a pip command: Debian's pip, under the image's own Python,
 * whatever lies on the package disk or in the workspace. `-s` keeps the
 * user site's start-up hooks (`.pth` lines, `usercustomize`) from running,
 * `-P` keeps the working directory off sys.path (a `pip/` folder in the
 * project), and the user site is appended after the system's packages, so
 * pip sees what is installed there (list, uninstall, upgrades) but imports
 * itself from the image.
 */
export const PIP_BOOTSTRAP = [
  "import runpy, site, sys",
  "site.ENABLE_USER_SITE = True",
  "sys.path.append(site.getusersitepackages())",
  "sys.argv[0] = 'pip'",
  "runpy.run_module('pip', run_name='__main__', alter_sys=True)",
].join("\n");

export function pipRunArgv(args: readonly string[]): string[] {
  return ["/usr/bin/python3", "-s", "-P", "-c", PIP_BOOTSTRAP, ...args];
}

/**
 * Start-up hooks: files Python runs at every start when they lie in the user
 * site (a `.pth` file's `import` lines, `usercustomize`, `sitecustomize`).
 * Never kept, even when pip wrote them: a wheel built in the sandbox can
 * carry one.
 */
export function isStartupHook(rel: string, pthText?: string): boolean {
  const m = /^user\/lib\/python[^/]+\/site-packages\/([^/]+)$/.exec(rel);
  if (!m) return false;
  const name = m[1]!;
  if (/^(usercustomize|sitecustomize)(\.py|\.pyc|\..*\.so|)$/.test(name) || name === "usercustomize" || name === "sitecustomize") return true;
  if (name.endsWith(".pth")) return pthText === undefined || pthText.split("\n").some((l) => /^import[ \t]/.test(l));
  return false;
}

/** A small file's text, read without following a link (a .pth file); undefined when it is not one. */
async function readSmall(file: string): Promise<string | undefined> {
  let fh;
  try {
    fh = await open(file, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    const st = await fh.stat();
    if (!st.isFile() || st.size > 1024 * 1024) return undefined;
    return await fh.readFile("utf8");
  } catch {
    return undefined;
  } finally {
    await fh?.close();
  }
}

/** The disk's entries by relative path, from lstat (links never followed), walked without recursion. */
async function walkDisk(root: string): Promise<Map<string, { t: ManifestEntry["t"]; ino: bigint; c: bigint }>> {
  const out = new Map<string, { t: ManifestEntry["t"]; ino: bigint; c: bigint }>();
  const stack: string[] = [""];
  while (stack.length > 0) {
    const rel = stack.pop()!;
    let names: string[];
    try {
      names = await readdir(path.join(root, rel));
    } catch {
      continue;
    }
    for (const name of names) {
      const r = rel ? `${rel}/${name}` : name;
      let st;
      try {
        st = await lstat(path.join(root, r), { bigint: true });
      } catch {
        continue;
      }
      const t = st.isDirectory() ? "d" : st.isFile() ? "f" : st.isSymbolicLink() ? "l" : "o";
      out.set(r, { t, ino: st.ino, c: st.ctimeNs });
      if (t === "d") stack.push(r);
    }
  }
  return out;
}

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

  paths(project: string): { root: string; image: string; mnt: string; manifest: string } {
    const root = path.join(this.stateDir, "projects", projectKey(project));
    return { root, image: path.join(root, "packages.img"), mnt: path.join(root, "packages"), manifest: path.join(root, "packages.manifest.json") };
  }

  private async readManifest(file: string): Promise<Manifest> {
    try {
      const m = JSON.parse(await readFile(file, "utf8")) as { entries?: Manifest };
      return m.entries ?? {};
    } catch {
      return {};
    }
  }

  /**
   * A pip command of a phase of `project` ended; it started at `sinceNs`
   * (wall clock, ns). The manifest becomes: what it held unchanged, plus what
   * changed since then (see the top of this file).
   */
  notePip(project: string, sinceNs: bigint): Promise<void> {
    const key = projectKey(project);
    return this.locked(key, async () => {
      const p = this.paths(project);
      const info = await readFile("/proc/self/mountinfo", "utf8");
      if (mountsAt(info, p.mnt).length === 0) return;
      const old = await this.readManifest(p.manifest);
      const entries: Manifest = {};
      for (const [rel, e] of await walkDisk(p.mnt)) {
        const was = old[rel];
        // a folder is its entries: its own ctime moves with every entry made in it, by pip or not
        const unchanged = was !== undefined && was.t === e.t && (e.t === "d" || (was.ino === String(e.ino) && was.c === String(e.c)));
        if (!(unchanged || e.c >= sinceNs)) continue;
        if (isStartupHook(rel, rel.endsWith(".pth") && e.t === "f" ? await readSmall(path.join(p.mnt, rel)) : undefined)) continue;
        entries[rel] = { t: e.t, ino: String(e.ino), c: String(e.c) };
      }
      await new JsonFileWriter(p.manifest).write({ version: 1, entries });
    });
  }

  /**
   * The disk of a project none of whose phases runs: every entry the
   * manifest does not hold as it was recorded is removed (links are removed,
   * never followed). Returns the removed paths.
   */
  private async verify(p: { mnt: string; manifest: string }): Promise<string[]> {
    const m = await this.readManifest(p.manifest);
    const removed: string[] = [];
    const cur = [...(await walkDisk(p.mnt))].sort(([a], [b]) => a.split("/").length - b.split("/").length || a.localeCompare(b));
    for (const [rel, e] of cur) {
      if (removed.some((r) => rel.startsWith(r + "/"))) continue;
      if (e.t === "d" && OWN_DIRS.has(rel)) continue;
      const was = m[rel];
      if (was !== undefined && was.t === e.t && (e.t === "d" || (was.ino === String(e.ino) && was.c === String(e.c)))) continue;
      await rm(path.join(p.mnt, rel), { recursive: true, force: true });
      removed.push(rel);
    }
    return removed;
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
  acquire(project: string, owner: { uid: number; gid: number }, budgetBytes: number, opts: { verify?: boolean; bindAt?: string } = {}): Promise<{ dir: string; removed: string[] | null }> {
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
      // no phase of the project runs (a re-adopted one may: its disk is left as it is): only what pip wrote stays
      const removed = (opts.verify ?? true) && (this.users.get(key) ?? 0) === 0 ? await this.verify(p) : null;
      // the project's owner writes it (pip runs as that uid); the same owner for every phase of the project
      for (const dir of [p.mnt, path.join(p.mnt, "user"), path.join(p.mnt, "cache")]) {
        await mkdir(dir, { recursive: true });
        await chown(dir, owner.uid, owner.gid);
      }
      // a warm pool's container: the disk, verified, also on its package mount point (src/phases/pool.ts)
      if (opts.bindAt) {
        await run("mount", ["--bind", p.mnt, opts.bindAt], { timeout: COMMAND_TIMEOUT_MS }).catch((err: Error & { stderr?: string }) => {
          throw new SandboxdError("SBX_ERR_WORKSPACE", `the project's package disk could not be bound into the pooled container: ${(err.stderr || err.message).trim()}`, {
            hint: "the state dir must be on a mount the Docker engine sees with the same propagation; see docs/WORKSPACE.md",
            cause: err,
          });
        });
      }
      this.users.set(key, (this.users.get(key) ?? 0) + 1);
      return { dir: p.mnt, removed };
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
