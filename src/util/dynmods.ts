/**
 * `favordynmods` on the host's cgroup v2 hierarchy, where the shim makes a
 * cgroup per command (src/shim/cgroups.ts).
 *
 * Each command is born in its own cgroup because the forker is moved into it
 * for the fork (a write to cgroup.procs). A move takes the kernel's
 * cgroup_threadgroup_rwsem for writing, and that waits an RCU grace period
 * unless another move ran within the last one. Back to back, moves are cheap;
 * after an idle moment, which is how an agent works (it thinks between
 * commands), the wait was 11.8 ms here: half of an `exec true` that took
 * 21.1 ms. With favordynmods a move never waits: 0.18 ms, and the exec
 * 10.4 ms (BENCHMARKS.md "Issue 14: a command after an idle moment"). From
 * Linux 6.0 to 6.17 it keeps the global lock's readers on their slow path
 * for good; from 6.18 a move of a process locks only that process's own
 * thread group instead, and that switch cannot be undone until a reboot
 * (clearing the option later only clears the flag). Its stated cost, forks
 * and exits a little dearer, did not show here: 666 against 678 µs per
 * fork+exit+wait, where copying page tables dominates.
 *
 * It is a setting of the whole hierarchy, so the daemon turns it on at start
 * (unless SANDBOXD_CGROUP_FAVORDYNMODS=0) and leaves it on when it stops:
 * other daemons on the host may rely on it, and it changes no limit and no
 * membership, only how long a move waits.
 */
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { promisify } from "node:util";

export const DYNMODS_OPTION = "favordynmods";

export type DynmodsState =
  /** on already (set by the host, or by an earlier daemon) */
  | "on"
  /** this call turned it on */
  | "turned-on"
  /** off, and left so (SANDBOXD_CGROUP_FAVORDYNMODS=0) */
  | "off"
  /** off, and it could not be turned on (an older kernel, not root): `error` says why */
  | "failed"
  /** no per-command cgroups on this host (no cgroup v2 mount, or one whose hierarchy has controllers): nothing moves */
  | "not-used";

export interface DynmodsOutcome {
  state: DynmodsState;
  /** where the cgroup v2 hierarchy is mounted */
  root: string | null;
  error?: string;
}

/** The cgroup v2 mount and its options, from /proc/self/mounts text; null when there is none. */
export function cgroup2Mount(mounts: string): { root: string; options: string[] } | null {
  for (const line of mounts.split("\n")) {
    const [, target, type, options] = line.split(" ");
    if (type === "cgroup2" && target) return { root: target.replace(/\\040/g, " "), options: (options ?? "").split(",") };
  }
  return null;
}

export interface DynmodsHost {
  /** /proc/self/mounts */
  mounts(): Promise<string>;
  /** the hierarchy root's cgroup.subtree_control ("" when it hands out no controller) */
  subtreeControl(root: string): Promise<string>;
  /** remounts `root` with favordynmods (mount(8) keeps the options it has) */
  remount(root: string): Promise<void>;
}

const run = promisify(execFile);

export const linuxDynmodsHost: DynmodsHost = {
  mounts: () => readFile("/proc/self/mounts", "utf8"),
  subtreeControl: (root) => readFile(`${root}/cgroup.subtree_control`, "utf8"),
  remount: async (root) => {
    await run("mount", ["-o", `remount,${DYNMODS_OPTION}`, root], { timeout: 10_000 });
  },
};

/**
 * Makes sure a command's cgroup move does not wait for a grace period: turns
 * favordynmods on where the shim's per-command cgroups are used (the same
 * test as runtime/docker.ts makeCommandCgroupDir), unless `enable` is false.
 * Never throws: what it could not do is in the outcome, for the log and
 * `sandboxd doctor`.
 */
export async function favorDynmods(enable: boolean, host: DynmodsHost = linuxDynmodsHost): Promise<DynmodsOutcome> {
  let mount: ReturnType<typeof cgroup2Mount>;
  try {
    mount = cgroup2Mount(await host.mounts());
  } catch (e) {
    return { state: "failed", root: null, error: `cannot read the mount table: ${(e as Error).message}` };
  }
  if (!mount) return { state: "not-used", root: null };
  const { root } = mount;
  const controllers = await host.subtreeControl(root).catch(() => "unreadable");
  if (controllers.trim() !== "") return { state: "not-used", root };
  if (mount.options.includes(DYNMODS_OPTION)) return { state: "on", root };
  if (!enable) return { state: "off", root };
  try {
    await host.remount(root);
  } catch (e) {
    const err = e as Error & { stderr?: string };
    return { state: "failed", root, error: (err.stderr?.trim() || err.message).split("\n")[0]! };
  }
  // the kernel takes options it does not know on a remount without a word on some versions: look
  const after = cgroup2Mount(await host.mounts().catch(() => ""));
  if (after?.options.includes(DYNMODS_OPTION)) return { state: "turned-on", root };
  return { state: "failed", root, error: `the remount succeeded but ${root} does not show ${DYNMODS_OPTION} (a kernel before 6.0?)` };
}
