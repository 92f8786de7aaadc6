/**
 * Append-only writer for a phase's build_audit.log.
 *
 * Appends are serialised through one promise chain and each is fdatasync'd
 * before the returned promise resolves: a caller that awaits `append` before
 * acting knows the record is on disk. The file is opened O_APPEND and never
 * truncated. (The hash-chained audit.jsonl arrives with the policy engine.)
 */
import { constants } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";
import { SandboxdError } from "../errors.js";

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
    fh = await open(path, constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT | constants.O_NOFOLLOW, mode);
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

  constructor(
    readonly path: string,
    handle?: Promise<FileHandle>,
  ) {
    this.handle = handle ?? open(path, "a", 0o600);
    // Surface an open failure on the first append, not as an unhandled rejection.
    // eslint-disable-next-line no-restricted-syntax -- the same promise is awaited by every append, which sees the failure
    this.handle.catch(() => undefined);
  }

  /** Opened with openAppendSafely; rejects (nothing created in memory) when the path is unsafe. */
  static async openSafely(path: string, mode = 0o600): Promise<BuildLog> {
    const fh = await openAppendSafely(path, mode);
    return new BuildLog(path, Promise.resolve(fh));
  }

  append(lines: readonly string[]): Promise<void> {
    if (this.closed) return Promise.reject(new Error(`audit log ${this.path} is closed`));
    const data = Buffer.from(lines.map((l) => `${l}\n`).join(""), "utf8");
    const next = this.tail.then(async () => {
      const fh = await this.handle;
      let off = 0;
      while (off < data.length) {
        const { bytesWritten } = await fh.write(data, off, data.length - off);
        off += bytesWritten;
      }
      await fh.datasync();
    });
    // Keep the chain alive after a failure; the failing caller still sees its own rejection.
    // eslint-disable-next-line no-restricted-syntax -- the failing caller gets the rejection from `next`
    this.tail = next.catch(() => undefined);
    return next;
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

  async acquire(path: string, user: string, mode = 0o600): Promise<BuildLog> {
    let entry = this.open.get(path);
    if (!entry) {
      const log = BuildLog.openSafely(path, mode);
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
