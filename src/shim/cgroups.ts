/**
 * One cgroup per command, so that everything a command started ends with it.
 *
 * The daemon (root on the host) makes a cgroup v2 directory for the phase and
 * bind-mounts it read-write at SHIM_PATHS.commandCgroups (runtime/docker.ts);
 * the rest of the cgroup tree stays read-only in the container. Its files are
 * root's (0644, directories 0755): the shim, uid 0, can create cgroups and
 * move processes; a command, running as the project owner, can do neither, so
 * it cannot leave its cgroup. Children are born in their parent's cgroup, so a
 * command is placed by placing its parent for the moment it forks: the
 * forker (or, on the Node path, the shim itself) is moved into the command's
 * cgroup before the fork and back to `supervisor` right after. A move costs
 * tens of microseconds here.
 *
 * When the command's leader exits, `cgroup.kill` SIGKILLs everything still in
 * its cgroup — atomically with respect to forks, so a double-forked daemon, a
 * process that left the session, or one forking in a loop all end — and the
 * cgroup is removed once empty. No controller is enabled: this is the
 * hierarchy's own membership and kill, not a resource limit (the container's
 * cgroup v1 limits still apply to every process).
 *
 * Absent (a container started by an older daemon, a kernel without
 * cgroup.kill, a daemon that is not root), the shim falls back to the
 * process-table walk in procs.ts, with its known gap.
 */
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from "node:fs";
import { errorFields, log } from "./log.js";

const SUPERVISOR = "supervisor";
/** after cgroup.kill, how long the kernel gets to empty the cgroup before the shim stops waiting */
const EMPTY_WAIT_MS = 2_000;
const EMPTY_POLL_MS = 2;

export class CommandCgroups {
  private constructor(private readonly root: string) {}

  /**
   * Opens the phase's cgroup directory and moves the shim into its
   * `supervisor` cgroup (which proves it writable); null when per-command
   * cgroups cannot be had here.
   */
  static open(root: string): CommandCgroups | null {
    if (!existsSync(`${root}/cgroup.kill`)) {
      log("info", "no per-command cgroups (no writable cgroup v2 directory from the daemon); leftovers are found by the process table", {
        root,
      });
      return null;
    }
    try {
      mkdirSync(`${root}/${SUPERVISOR}`, { recursive: true });
      writeFileSync(`${root}/${SUPERVISOR}/cgroup.procs`, String(process.pid));
    } catch (err) {
      log("warn", "per-command cgroups unusable; leftovers are found by the process table", { root, ...errorFields(err) });
      return null;
    }
    log("info", "per-command cgroups", { root });
    return new CommandCgroups(root);
  }

  /** Moves `pid` (the shim or the forker) back out of any command's cgroup. */
  home(pid: number): void {
    writeFileSync(`${this.root}/${SUPERVISOR}/cgroup.procs`, String(pid));
  }

  /** A new, empty cgroup for one command. Throws when it cannot be made. */
  create(execId: number): CommandCgroup {
    const dir = `${this.root}/cmd-${execId}`;
    try {
      mkdirSync(dir);
    } catch (err) {
      // left by an earlier connection's exec of the same id: empty it and use it
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      const stale = new CommandCgroup(dir);
      stale.kill();
    }
    return new CommandCgroup(dir);
  }
}

export class CommandCgroup {
  private removed = false;

  constructor(readonly dir: string) {}

  /** Moves `pid` (a whole process) into this cgroup: its children are born here. */
  place(pid: number): void {
    writeFileSync(`${this.dir}/cgroup.procs`, String(pid));
  }

  /** Processes in the cgroup now. */
  pids(): number[] {
    try {
      return readFileSync(`${this.dir}/cgroup.procs`, "utf8").split("\n").filter(Boolean).map(Number);
    } catch {
      return [];
    }
  }

  /** SIGKILLs every process in the cgroup, including those forked while it happens. */
  kill(): void {
    if (this.removed) return;
    try {
      writeFileSync(`${this.dir}/cgroup.kill`, "1");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") log("warn", "cgroup.kill failed", { dir: this.dir, ...errorFields(err) });
    }
  }

  /**
   * Ends the command: kills whatever is left in its cgroup, waits until the
   * kernel has emptied it, and removes it. Resolves with how many processes
   * were left (0 on the common path, which costs one rmdir).
   */
  async end(): Promise<number> {
    if (this.removed) return 0;
    if (this.tryRemove()) return 0;
    const left = this.pids().length;
    this.kill();
    const deadline = Date.now() + EMPTY_WAIT_MS;
    while (!this.tryRemove()) {
      if (Date.now() > deadline) {
        log("warn", "a command's cgroup did not empty after cgroup.kill; left in place", { dir: this.dir, pids: this.pids() });
        return left;
      }
      await new Promise((resolve) => setTimeout(resolve, EMPTY_POLL_MS));
    }
    return left;
  }

  /** rmdir succeeds only on an empty cgroup (EBUSY otherwise). */
  private tryRemove(): boolean {
    try {
      rmdirSync(this.dir);
      this.removed = true;
      return true;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT") {
        this.removed = true;
        return true;
      }
      if (code !== "EBUSY") log("warn", "could not remove a command's cgroup", { dir: this.dir, ...errorFields(err) });
      return false;
    }
  }
}
