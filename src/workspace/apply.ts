/**
 * Applying an accepted iteration to the project: creates, edits, deletes,
 * renames and mode changes read from the layer's upper dir.
 *
 * Runs with the overlay unmounted (src/workspace/layer.ts), so nothing in the
 * sandbox can change the upper or the project meanwhile. The daemon is root
 * on the host; every path is checked so that it never writes or reads through
 * a symbolic link: each parent component of a project path must be a real
 * folder (lstat), files are opened O_NOFOLLOW, a file read from the upper
 * must be on the layer's own file system (so a link swapped in cannot lead
 * to a host file), and a file lands by rename of a temporary file written
 * beside it (readers see the old or the new bytes, never a mix).
 */
import { randomBytes } from "node:crypto";
import { constants as fsc } from "node:fs";
import { chmod, chown, lchown, lstat, mkdir, open, readlink, rename, rm, symlink, unlink } from "node:fs/promises";
import path from "node:path";
import { SandboxdError } from "../errors.js";
import type { ChangeSet, FileChange } from "./changes.js";

export interface ApplyTarget {
  project: string;
  upper: string;
  /** st_dev of the upper's file system */
  upperDev: number;
  /** owner of the project's files */
  uid: number;
  gid: number;
}

/** A project-relative path is accepted only in its plain form. Exported for the API's file routes. */
export function checkRelPath(rel: string): string {
  if (typeof rel !== "string" || rel.length === 0 || rel.length > 4096) throw badPath(rel, "empty or longer than 4096 bytes");
  if (rel.includes("\0")) throw badPath(rel, "contains a NUL byte");
  if (rel.startsWith("/")) throw badPath(rel, "is absolute");
  const parts = rel.split("/");
  for (const p of parts) {
    if (p === "" || p === "." || p === "..") throw badPath(rel, "has an empty, `.` or `..` component");
  }
  return rel;
}

function badPath(rel: string, why: string): SandboxdError {
  return new SandboxdError("SBX_ERR_PATH_INVALID", `path ${JSON.stringify(rel)} ${why}`, {
    hint: "name a file by its project-relative path, e.g. services/risk.py",
  });
}

/**
 * The project path for `rel`, after checking that every folder on the way is
 * a real folder inside the project (no symbolic link, nothing missing).
 */
export async function projectPath(project: string, rel: string): Promise<string> {
  checkRelPath(rel);
  const parts = rel.split("/");
  let cur = project;
  for (const part of parts.slice(0, -1)) {
    cur = path.join(cur, part);
    const st = await lstat(cur).catch(() => null);
    if (!st) throw new SandboxdError("SBX_ERR_PATH_INVALID", `${rel}: folder ${path.relative(project, cur)} does not exist in the project`);
    if (!st.isDirectory()) {
      throw new SandboxdError("SBX_ERR_PATH_INVALID", `${rel}: ${path.relative(project, cur)} is ${st.isSymbolicLink() ? "a symbolic link" : "not a folder"}; sandboxd does not write through it`);
    }
  }
  return path.join(project, rel);
}

const depth = (p: string) => p.split("/").length;

/**
 * Set-user-ID and set-group-ID bits are never applied to a file: the daemon
 * is root on the host and would plant an executable that runs as the
 * project's owner for whoever starts it (the judge refuses them too,
 * `workspace.setuid`; this is the mechanism's own floor).
 */
export const SETID_BITS = 0o6000;

/** An apply that failed part-way: what it had already changed in the project. */
export class ApplyError extends SandboxdError {
  constructor(
    readonly applied: FileChange[],
    readonly failedAt: FileChange,
    cause: unknown,
  ) {
    super("SBX_ERR_WORKSPACE", `applying ${failedAt.path} failed after ${applied.length} change(s) were applied: ${(cause as Error).message}`, { cause });
  }
}

/** Applies `set`; returns the changes in the order they were made. Throws ApplyError with what was applied when a step fails. */
export async function applyChangeSet(set: ChangeSet, t: ApplyTarget): Promise<FileChange[]> {
  const done: FileChange[] = [];
  let current: FileChange | null = null;
  try {
    return await applyInOrder(set, t, done, (c) => (current = c));
  } catch (err) {
    throw new ApplyError(done, current ?? set.changes[0]!, err);
  }
}

async function applyInOrder(set: ChangeSet, t: ApplyTarget, done: FileChange[], step: (c: FileChange) => void): Promise<FileChange[]> {
  const renames = set.changes.filter((c) => c.kind === "rename");
  const deletes = set.changes.filter((c) => c.kind === "delete").sort((a, b) => depth(b.path) - depth(a.path));
  const dirCreates = set.changes.filter((c) => c.kind === "create" && c.isDir).sort((a, b) => depth(a.path) - depth(b.path));
  const writes = set.changes.filter((c) => (c.kind === "create" || c.kind === "modify") && !c.isDir && !c.modeOnly);
  const modes = set.changes.filter((c) => c.kind === "modify" && c.modeOnly).sort((a, b) => depth(b.path) - depth(a.path));

  // renames go through a staging name, so a folder deleted or made in between cannot get in the way
  const staged: Array<{ change: FileChange; tmp: string }> = [];
  for (const r of renames) {
    step(r);
    const src = await projectPath(t.project, r.from!);
    const tmp = path.join(t.project, `.sbx-rename-${randomBytes(6).toString("hex")}`);
    await rename(src, tmp);
    staged.push({ change: r, tmp });
  }
  for (const d of deletes) {
    step(d);
    const p = await projectPath(t.project, d.path);
    const st = await lstat(p).catch(() => null);
    if (!st) continue;
    if (st.isDirectory()) await rm(p, { recursive: true, force: true });
    else await unlink(p);
    done.push(d);
  }
  for (const c of dirCreates) {
    step(c);
    const p = await projectPath(t.project, c.path);
    const st = await lstat(p).catch(() => null);
    if (!st) {
      await mkdir(p, { mode: c.mode ?? 0o755 });
      await chown(p, t.uid, t.gid);
      await chmod(p, c.mode ?? 0o755);
    } else if (!st.isDirectory()) throw new SandboxdError("SBX_ERR_WORKSPACE", `cannot make folder ${c.path}: something else is there`);
    done.push(c);
  }
  for (const { change, tmp } of staged) {
    step(change);
    const dst = await projectPath(t.project, change.path);
    await rename(tmp, dst);
    if (change.mode !== undefined) await chmod(dst, change.mode & ~SETID_BITS);
    done.push(change);
  }
  for (const w of writes) {
    step(w);
    await writeFromUpper(w, t);
    done.push(w);
  }
  for (const m of modes) {
    step(m);
    const p = await projectPath(t.project, m.path);
    const st = await lstat(p);
    if (!st.isSymbolicLink() && m.mode !== undefined) await chmod(p, st.isDirectory() ? m.mode : m.mode & ~SETID_BITS);
    done.push(m);
  }
  return done;
}

/** One file from the upper to the project: a temporary file beside the target, then rename. */
async function writeFromUpper(c: FileChange, t: ApplyTarget): Promise<void> {
  const dst = await projectPath(t.project, c.path);
  const src = path.join(t.upper, c.path);
  // the upper's folders are checked too: a link there must not lead out of the layer
  await projectPath(t.upper, c.path);
  // a name of its own length, not the target's: a 250-byte name plus a suffix would pass NAME_MAX (255) and fail half-way through an iteration
  const tmp = path.join(path.dirname(dst), `.sbx-${randomBytes(6).toString("hex")}`);
  const sst = await lstat(src);
  if (sst.dev !== t.upperDev) throw new SandboxdError("SBX_ERR_WORKSPACE", `${c.path}: not on the layer's file system; not applied`);
  if (sst.isSymbolicLink()) {
    await symlink(await readlink(src), tmp);
    await lchown(tmp, t.uid, t.gid);
    await rename(tmp, dst);
    return;
  }
  if (!sst.isFile()) throw new SandboxdError("SBX_ERR_WORKSPACE", `${c.path}: only regular files and links are applied`);
  const mode = sst.mode & 0o7777 & ~SETID_BITS;
  const from = await open(src, fsc.O_RDONLY | fsc.O_NOFOLLOW);
  try {
    const fst = await from.stat();
    if (fst.dev !== t.upperDev || fst.ino !== sst.ino) throw new SandboxdError("SBX_ERR_WORKSPACE", `${c.path}: changed while being applied`);
    const to = await open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
    try {
      const buf = Buffer.allocUnsafe(1 << 20);
      for (;;) {
        const { bytesRead } = await from.read(buf, 0, buf.length, null);
        if (bytesRead === 0) break;
        let off = 0;
        while (off < bytesRead) off += (await to.write(buf, off, bytesRead - off)).bytesWritten;
      }
      await to.chown(t.uid, t.gid);
      await to.chmod(mode);
      await to.sync();
    } finally {
      await to.close();
    }
    await rename(tmp, dst);
  } catch (err) {
    // eslint-disable-next-line no-restricted-syntax -- the write failed and its error is rethrown below; a temp file already gone is fine
    await unlink(tmp).catch(() => undefined);
    throw err;
  } finally {
    await from.close();
  }
}
