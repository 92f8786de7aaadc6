/**
 * A file of a phase's view, read or written by the daemon for a harness
 * (GET/PUT /v1/phases/:id/files/<path>). The daemon is root on the host and
 * the view is the agent's, so a path is resolved one component at a time,
 * each opened relative to the folder before it (`/proc/self/fd/N/name`, the
 * openat(2) of a language without it) with O_NOFOLLOW|O_DIRECTORY: a
 * symbolic link anywhere on the way — planted on the host in the project
 * or by the agent in the layer, before or while the call runs — fails the
 * call, it is never followed. The view itself is the overlay the sandbox
 * sees, so hidden paths (`.env`) are absent and read-only ones fail with
 * EROFS, as they do inside.
 *
 * A write is atomic: the bytes go to a temporary file beside the target
 * (O_EXCL|O_NOFOLLOW, owned by the project's owner, fsync'ed), an optional
 * check runs on it (the Python compile check, in the sandbox), and it is
 * renamed over the target — rename(2) replaces a link at the target rather
 * than writing through it. A check that fails removes the temporary file:
 * nothing lands.
 */
import { randomBytes } from "node:crypto";
import { constants as fsc } from "node:fs";
import { lstat, mkdir, open, rename, unlink, type FileHandle } from "node:fs/promises";
import { SandboxdError } from "../errors.js";
import { checkRelPath } from "./apply.js";

const DIR_FLAGS = fsc.O_RDONLY | fsc.O_DIRECTORY | fsc.O_NOFOLLOW;

/** `/proc/self/fd/N/name`: `name` looked up in the folder open as N, never through a link at `name` when opened O_NOFOLLOW. */
const at = (dir: FileHandle, name: string) => `/proc/self/fd/${dir.fd}/${name}`;

function notFound(rel: string, why: string): SandboxdError {
  return new SandboxdError("SBX_ERR_FILE_NOT_FOUND", `${rel}: ${why}`);
}

function viaLink(rel: string, part: string): SandboxdError {
  return new SandboxdError("SBX_ERR_PATH_INVALID", `${rel}: ${part} is a symbolic link or not a folder; sandboxd does not read or write through it`);
}

/**
 * The folder that holds `rel`, opened without following any link, and the
 * file's own name. With `create`, missing folders are made (mode 0755, owned
 * by `owner`).
 */
async function openParent(root: string, rel: string, create: { uid: number; gid: number } | null): Promise<{ dir: FileHandle; name: string }> {
  checkRelPath(rel);
  const parts = rel.split("/");
  const name = parts.pop()!;
  let dir = await open(root, DIR_FLAGS);
  try {
    for (const part of parts) {
      let next: FileHandle;
      try {
        next = await open(at(dir, part), DIR_FLAGS);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === "ENOENT" && create) {
          try {
            // mkdir never follows a link at its last component: a link planted meanwhile is EEXIST, then ELOOP below
            await mkdir(at(dir, part), { mode: 0o755 });
          } catch (e) {
            if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw mapErrno(e, rel);
          }
          next = await open(at(dir, part), DIR_FLAGS).catch((e: NodeJS.ErrnoException) => {
            throw e.code === "ELOOP" || e.code === "ENOTDIR" ? viaLink(rel, part) : mapErrno(e, rel);
          });
          await next.chown(create.uid, create.gid);
          await next.chmod(0o755);
        } else if (code === "ENOENT") throw notFound(rel, `folder ${part} does not exist in the phase's view`);
        else if (code === "ELOOP" || code === "ENOTDIR") throw viaLink(rel, part);
        else throw mapErrno(err, rel);
      }
      await dir.close();
      dir = next;
    }
    return { dir, name };
  } catch (err) {
    await dir.close();
    throw err;
  }
}

function mapErrno(err: unknown, rel: string): Error {
  const e = err as NodeJS.ErrnoException;
  if (e instanceof SandboxdError) return e;
  switch (e.code) {
    case "EROFS":
    case "EACCES":
    case "EPERM":
      return new SandboxdError("SBX_ERR_PATH_PROTECTED", `${rel} cannot be written in the phase's view (${e.code}: read-only there, as for the agent)`);
    case "ENOSPC":
    case "EDQUOT":
      return new SandboxdError("SBX_ERR_FILE_TOO_LARGE", `${rel}: the phase's layer is full (its disk budget, workspace.disk.layerBytes)`, {
        hint: "checkpoint or discard what the phase wrote, or give the phase a larger budget in its policy",
      });
    case "EISDIR":
      return new SandboxdError("SBX_ERR_PATH_INVALID", `${rel} is a folder`);
    default:
      return e;
  }
}

export interface ViewFile {
  bytes: Buffer;
  /** permission bits */
  mode: number;
}

/** A regular file of the view, at most `maxBytes`; links, folders and devices are refused. */
export async function readViewFile(root: string, rel: string, maxBytes: number): Promise<ViewFile> {
  const { dir, name } = await openParent(root, rel, null);
  try {
    let fh: FileHandle;
    try {
      fh = await open(at(dir, name), fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT") throw notFound(rel, "no such file in the phase's view");
      if (code === "ELOOP") throw viaLink(rel, name);
      throw mapErrno(err, rel);
    }
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw new SandboxdError("SBX_ERR_PATH_INVALID", `${rel} is not a regular file`);
      if (st.size > maxBytes) throw new SandboxdError("SBX_ERR_FILE_TOO_LARGE", `${rel} is ${st.size} bytes, more than the ${maxBytes} bytes served`, { hint: "read it from inside the phase, or in the project once accepted" });
      const buf = Buffer.alloc(st.size);
      let off = 0;
      while (off < buf.length) {
        const { bytesRead } = await fh.read(buf, off, buf.length - off, off);
        if (bytesRead === 0) break;
        off += bytesRead;
      }
      return { bytes: buf.subarray(0, off), mode: st.mode & 0o7777 };
    } finally {
      await fh.close();
    }
  } finally {
    await dir.close();
  }
}

export interface WriteOptions {
  uid: number;
  gid: number;
  /** permission bits for a new file (an existing file keeps its own); default 0644 */
  mode?: number;
  /**
   * Runs on the written temporary file before it lands (its view-relative
   * path); a failure thrown here removes it and is the write's error.
   */
  check?(tmpRel: string): Promise<void>;
}

/** What the write did: created the file or replaced it. */
export interface WriteResult {
  created: boolean;
  size: number;
  mode: number;
}

/** Writes `bytes` at `rel` in the view, atomically (see the header). */
export async function writeViewFile(root: string, rel: string, bytes: Buffer, opts: WriteOptions): Promise<WriteResult> {
  const { dir, name } = await openParent(root, rel, { uid: opts.uid, gid: opts.gid });
  const tmpName = `.${name.slice(0, 200)}.sbx-put-${randomBytes(6).toString("hex")}`;
  const tmpRel = rel.includes("/") ? `${rel.slice(0, rel.lastIndexOf("/"))}/${tmpName}` : tmpName;
  let written = false;
  try {
    const old = await lstat(at(dir, name)).catch(() => null);
    if (old?.isDirectory()) throw new SandboxdError("SBX_ERR_PATH_INVALID", `${rel} is a folder`);
    // a link at the target is replaced by the file (rename), never written through; its mode is not the file's
    const mode = old?.isFile() ? old.mode & 0o7777 : (opts.mode ?? 0o644);
    let fh: FileHandle;
    try {
      fh = await open(at(dir, tmpName), fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
    } catch (err) {
      throw mapErrno(err, rel);
    }
    written = true;
    try {
      let off = 0;
      while (off < bytes.length) off += (await fh.write(bytes, off, bytes.length - off)).bytesWritten;
      await fh.chown(opts.uid, opts.gid);
      await fh.chmod(mode);
      await fh.sync();
    } catch (err) {
      throw mapErrno(err, rel);
    } finally {
      await fh.close();
    }
    if (opts.check) await opts.check(tmpRel);
    try {
      await rename(at(dir, tmpName), at(dir, name));
    } catch (err) {
      throw mapErrno(err, rel);
    }
    written = false;
    return { created: !old, size: bytes.length, mode };
  } finally {
    // eslint-disable-next-line no-restricted-syntax -- the write failed and its error is what the caller gets; a temporary file already gone is fine
    if (written) await unlink(at(dir, tmpName)).catch(() => undefined);
    await dir.close();
  }
}

/** What is at `rel` in the view now (never through a link): a file, something else, or nothing. */
export async function viewEntry(root: string, rel: string): Promise<"file" | "other" | null> {
  let opened: { dir: FileHandle; name: string };
  try {
    opened = await openParent(root, rel, null);
  } catch (err) {
    if ((err as SandboxdError).code === "SBX_ERR_FILE_NOT_FOUND") return null;
    throw err;
  }
  try {
    const st = await lstat(at(opened.dir, opened.name)).catch(() => null);
    return st === null ? null : st.isFile() ? "file" : "other";
  } finally {
    await opened.dir.close();
  }
}

/** A file of the view as the diff reads it (never through a link), or null when the path is not a regular file there. */
export async function viewVersion(root: string, rel: string): Promise<{ size: number; mode: number; read(): Promise<Buffer> } | null> {
  let opened: { dir: FileHandle; name: string };
  try {
    opened = await openParent(root, rel, null);
  } catch {
    return null;
  }
  try {
    const st = await lstat(at(opened.dir, opened.name)).catch(() => null);
    if (!st?.isFile()) return null;
    return { size: st.size, mode: st.mode & 0o7777, read: async () => (await readViewFile(root, rel, Math.max(st.size, 1) * 2 + 1024 * 1024)).bytes };
  } finally {
    await opened.dir.close();
  }
}
