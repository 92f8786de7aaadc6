/**
 * What a phase takes from its project: the project directory itself (checked
 * once, at start), its `.env` (read without trusting the project) and the
 * environment every command gets.
 */
import { constants as fsc } from "node:fs";
import { open as openFile, realpath, stat } from "node:fs/promises";
import path from "node:path";
import dotenv from "dotenv";
import type { ProjectFile } from "../approvals/binding.js";
import { SandboxdError } from "../errors.js";
import type { PhaseRecord } from "./types.js";
import { PACKAGES_ENV } from "../workspace/packages.js";

export const BUILD_LOG_NAME = "build_audit.log";

/**
 * Environment of every command (the shim gives commands nothing of its own):
 * the phase's variables — the project's .env without its reserved names
 * (src/policy/env.ts splitDotenv), then the daemon's service and proxy
 * variables — and the daemon's plumbing last, so nothing overrides it.
 */
export function commandEnv(record: Pick<PhaseRecord, "id" | "mode">, phaseVars: Record<string, string> = {}): Record<string, string> {
  return {
    ...phaseVars,
    // the image's programs first: a bare `pytest` or `python3` is the image's, never a file of the
    // package disk (the agent writes there); its console scripts after (src/workspace/packages.ts)
    PATH: `/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PACKAGES_ENV.bin}`,
    HOME: "/tmp",
    LANG: "C.UTF-8",
    PYTHONUNBUFFERED: "1",
    // no __pycache__ churn in the operator's tree
    PYTHONDONTWRITEBYTECODE: "1",
    // `pip install NAME` (SKILLS.md §2) works: the image's Python is Debian's and
    // read-only, so pip installs into the user site; without this, PEP 668
    // refuses every install outside a venv
    PIP_BREAK_SYSTEM_PACKAGES: "1",
    // the user site and pip's cache on the project's package disk, kept for its
    // next phases (src/workspace/packages.ts), not on /tmp, which every stop loses
    PYTHONUSERBASE: PACKAGES_ENV.PYTHONUSERBASE,
    PIP_CACHE_DIR: PACKAGES_ENV.PIP_CACHE_DIR,
    SANDBOXD_PHASE: record.id,
    SANDBOXD_MODE: record.mode,
  };
}

/**
 * The project's .env, read without trusting the project: the agent could have
 * replaced it with a symlink to a file only root may read, and the daemon
 * (root) must not pass that file's contents to the agent's commands.
 */
export async function readDotenv(project: string, ownerUid: number): Promise<{ vars: Record<string, string>; text: string }> {
  let fh;
  try {
    fh = await openFile(path.join(project, ".env"), fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return { vars: {}, text: "" };
    if (code === "ELOOP") throw new SandboxdError("SBX_ERR_VALIDATION", `${project}/.env is a symbolic link; sandboxd reads only a regular .env file`, {
      hint: "replace the link with the file itself",
    });
    throw err;
  }
  try {
    const st = await fh.stat();
    if (!st.isFile() || (st.uid !== ownerUid && st.uid !== 0) || st.size > 1024 * 1024) {
      throw new SandboxdError("SBX_ERR_VALIDATION", `${project}/.env must be a regular file under 1 MiB owned by the project's owner`, {
        hint: "fix the file's type, owner or size",
      });
    }
    const text = await fh.readFile("utf8");
    return { vars: dotenv.parse(text), text };
  } finally {
    await fh.close();
  }
}

/** The project's real path, refused when it is missing, not a directory, or root's. */
export async function resolveProject(project: string): Promise<string> {
  let real: string;
  try {
    real = await realpath(project);
  } catch {
    throw new SandboxdError("SBX_ERR_PROJECT_NOT_FOUND", `project path ${project} does not exist`);
  }
  const s = await stat(real);
  if (!s.isDirectory()) {
    throw new SandboxdError("SBX_ERR_PROJECT_NOT_DIR", `project path ${project} is not a directory`);
  }
  if (s.uid === 0) {
    // Commands run as the project's owner. As uid 0 they would keep the shim's
    // capabilities (root keeps its bounding set across execve) and could read
    // the shim's secret; so root-owned projects are refused outright.
    throw new SandboxdError("SBX_ERR_PROJECT_ROOT_OWNED", `project ${real} is owned by root; its commands would run as root`);
  }
  return real;
}

/** Files larger than this are not hashed for an approval (SKILLS.md: no files larger than 10 MB). */
const MAX_PROJECT_FILE = 10 * 1024 * 1024;

/**
 * A file of the phase's project, read by the daemon (root) without trusting
 * the project: a path that leaves the project, or a symbolic link that
 * resolves outside it, is "outside" and not read; only regular files are.
 * The one place the daemon reads a project file for a phase (approval
 * bindings), so that it can read the phase's own view of the workspace once
 * it has one.
 */
export async function readProjectFile(phase: Pick<PhaseRecord, "project">, relPath: string): Promise<ProjectFile> {
  const root = phase.project;
  const joined = path.resolve(root, relPath);
  if (!joined.startsWith(root + path.sep)) return { kind: "outside" };
  let real: string;
  try {
    real = await realpath(joined);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT" || code === "ENOTDIR") return { kind: "absent" };
    if (code === "ELOOP") return { kind: "not-regular" };
    throw err;
  }
  if (!real.startsWith(root + path.sep)) return { kind: "outside" };
  let fh;
  try {
    // the link was resolved above; a link put in its place since is not followed
    fh = await openFile(real, fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return { kind: "absent" };
    if (code === "ELOOP") return { kind: "not-regular" };
    throw err;
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) return { kind: "not-regular" };
    if (st.size > MAX_PROJECT_FILE) return { kind: "too-large" };
    return { kind: "file", data: await fh.readFile() };
  } finally {
    await fh.close();
  }
}
