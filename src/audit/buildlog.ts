/**
 * Append-only writer for a phase's build_audit.log.
 *
 * Appends are serialised through one promise chain and each is durable
 * before the returned promise resolves: a caller that awaits `append` before
 * acting knows the record is on disk. The file is opened O_APPEND | O_DSYNC
 * (each write returns once its data and the file's size are on disk, one
 * call where a write and an fdatasync would be two) and is never truncated
 * but by rotation.
 */
import { constants, write } from "node:fs";
import { mkdir, open, rename, unlink, type FileHandle } from "node:fs/promises";
import path from "node:path";
import { SandboxdError } from "../errors.js";

/**
 * When and where a build log is rotated (policy `audit.buildLog`). Rotated
 * files go to `dir` — in the daemon's state dir, out of the agent's reach
 * (the project root, where the live log is by default, is the agent's to
 * rename and delete in).
 */
export interface Rotation {
  rotateBytes: number;
  keep: number;
  dir: string;
}

const O_LOG = constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT | constants.O_DSYNC;

/** write(2) through the callback API: about a third of the event loop's time of FileHandle.write */
function appendTo(fd: number, data: Buffer, off: number): Promise<number> {
  return new Promise((resolve, reject) => write(fd, data, off, data.length - off, null, (e, n) => (e ? reject(e) : resolve(n))));
}

/**
 * Open a log for appending without trusting the directory it is in.
 *
 * The daemon (root) writes build_audit.log into the operator's project, a
 * folder the supervised agent can write. A symlink or hard link planted there
 * must not make the daemon append to another file, and a file the agent made
 * must not pass for the daemon's record: O_NOFOLLOW refuses a symlink, and the
 * opened file must be a regular file with one link, owned by the daemon's uid.
 */
export async function openAppendSafely(path: string, mode = 0o600): Promise<FileHandle> {
  let fh: FileHandle;
  try {
    fh = await open(path, O_LOG | constants.O_NOFOLLOW, mode);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ELOOP") {
      throw new SandboxdError("SBX_ERR_BUILD_LOG_UNSAFE", `${path} is a symbolic link; sandboxd will not write through it`);
    }
    throw err;
  }
  const st = await fh.stat();
  const uid = process.getuid?.() ?? st.uid;
  const problem = !st.isFile()
    ? "is not a regular file"
    : st.nlink !== 1
      ? `has ${st.nlink} hard links`
      : st.uid !== uid
        ? `is owned by uid ${st.uid}, not by the daemon (uid ${uid})`
        : null;
  if (problem) {
    await fh.close();
    throw new SandboxdError("SBX_ERR_BUILD_LOG_UNSAFE", `${path} ${problem}; sandboxd will not append its audit trail to it`);
  }
  return fh;
}

export class BuildLog {
  private handle: Promise<FileHandle>;
  private tail: Promise<void> = Promise.resolve();
  private closed = false;
  /** bytes in the live file, once known */
  private size: number | null = null;

  constructor(
    readonly path: string,
    handle?: Promise<FileHandle>,
    private readonly rotation?: () => Rotation | null,
  ) {
    this.handle = handle ?? open(path, O_LOG, 0o600);
    // Surface an open failure on the first append, not as an unhandled rejection.
    // eslint-disable-next-line no-restricted-syntax -- the same promise is awaited by every append, which sees the failure
    this.handle.catch(() => undefined);
  }

  /** Opened with openAppendSafely; rejects (nothing created in memory) when the path is unsafe. */
  static async openSafely(path: string, mode = 0o600, rotation?: () => Rotation | null): Promise<BuildLog> {
    const fh = await openAppendSafely(path, mode);
    return new BuildLog(path, Promise.resolve(fh), rotation);
  }

  append(lines: readonly string[]): Promise<void> {
    if (this.closed) return Promise.reject(new Error(`audit log ${this.path} is closed`));
    const data = Buffer.from(lines.map((l) => `${l}\n`).join(""), "utf8");
    const next = this.tail.then(async () => {
      const fh = await this.handle;
      const rot = this.rotation?.() ?? null;
      if (rot) {
        this.size ??= (await fh.stat()).size;
        if (this.size > 0 && this.size + data.length > rot.rotateBytes) {
          await this.rotate(fh, rot);
          this.size = 0;
        }
      }
      // durable when written: O_DSYNC
      let off = 0;
      while (off < data.length) {
        const n = await appendTo(fh.fd, data, off);
        if (n <= 0) throw Object.assign(new Error("write returned 0 bytes"), { code: "EIO" });
        off += n;
      }
      if (this.size !== null) this.size += data.length;
    });
    // Keep the chain alive after a failure; the failing caller still sees its own rejection.
    // eslint-disable-next-line no-restricted-syntax -- the failing caller gets the rejection from `next`
    this.tail = next.catch(() => undefined);
    return next;
  }

  /**
   * The live file's bytes become `<dir>/<name>.1` (older ones shift to .2 …
   * .keep; the oldest is dropped), then the live file is emptied in place.
   * In place, not renamed: the sandbox sees the live file through a bind
   * mount of its inode, which must stay the one the daemon writes. The copy
   * is made durable (temp file, fsync, rename, fsync of the dir) before the
   * live file is cut, so a crash in between leaves lines twice, never none.
   * The copy is read through a fresh O_NOFOLLOW descriptor checked to be the
   * same inode as the one written.
   */
  private async rotate(fh: FileHandle, rot: Rotation): Promise<void> {
    await mkdir(rot.dir, { recursive: true, mode: 0o700 });
    const base = path.basename(this.path);
    const nth = (i: number) => path.join(rot.dir, `${base}.${i}`);
    const ignoreMissing = (e: NodeJS.ErrnoException) => {
      if (e.code !== "ENOENT") throw e;
    };
    const st = await fh.stat();
    const src = await open(this.path, constants.O_RDONLY | constants.O_NOFOLLOW);
    const tmp = path.join(rot.dir, `${base}.rotating`);
    try {
      const sst = await src.stat();
      if (sst.ino !== st.ino || sst.dev !== st.dev) {
        throw new SandboxdError("SBX_ERR_BUILD_LOG_UNSAFE", `${this.path} is no longer the file sandboxd writes; not rotating it`);
      }
      const out = await open(tmp, "w", 0o600);
      try {
        const buf = Buffer.alloc(1024 * 1024);
        for (let pos = 0; pos < st.size; ) {
          const { bytesRead } = await src.read(buf, 0, Math.min(buf.length, st.size - pos), pos);
          if (bytesRead === 0) break;
          await out.write(buf, 0, bytesRead);
          pos += bytesRead;
        }
        await out.sync();
      } finally {
        await out.close();
      }
    } catch (e) {
      // eslint-disable-next-line no-restricted-syntax -- the copy failed and its error is rethrown below; a temp file already gone is fine
      await unlink(tmp).catch(() => undefined);
      throw e;
    } finally {
      await src.close();
    }
    await unlink(nth(rot.keep)).catch(ignoreMissing);
    for (let i = rot.keep - 1; i >= 1; i--) await rename(nth(i), nth(i + 1)).catch(ignoreMissing);
    await rename(tmp, nth(1));
    const dfd = await open(rot.dir, constants.O_RDONLY);
    try {
      await dfd.sync();
    } finally {
      await dfd.close();
    }
    await fh.truncate(0);
    await fh.sync();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.tail;
    await (await this.handle.catch(() => null))?.close();
  }
}

/**
 * One writer per log file, shared by the phases that use it (several phases
 * of one project append to the same build_audit.log), closed with the last.
 */
export class BuildLogRegistry {
  private readonly open = new Map<string, { log: Promise<BuildLog>; users: Set<string> }>();

  /** `rotation(path)`: where and when the log at `path` is rotated (none when absent) */
  constructor(private readonly rotation?: (path: string) => Rotation | null) {}

  async acquire(path: string, user: string, mode = 0o600): Promise<BuildLog> {
    let entry = this.open.get(path);
    if (!entry) {
      const rotation = this.rotation;
      const log = BuildLog.openSafely(path, mode, rotation ? () => rotation(path) : undefined);
      entry = { log, users: new Set() };
      this.open.set(path, entry);
      log.catch(() => this.open.delete(path));
    }
    const log = await entry.log;
    entry.users.add(user);
    return log;
  }

  async release(path: string, user: string): Promise<void> {
    const entry = this.open.get(path);
    if (!entry) return;
    entry.users.delete(user);
    if (entry.users.size > 0) return;
    this.open.delete(path);
    await (await entry.log).close();
  }
}
