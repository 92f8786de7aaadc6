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

/** What the cgroups ask of the forker to ready a cgroup for it (forker.ts). */
export interface CgroupTenant {
  /** moves into `cgroup` if idle and nowhere else; false when it did not */
  enter(cgroup: CommandCgroup): boolean;
  /** leaves `cgroup` if it is there and not forking; false when it is still in it */
  leave(cgroup: CommandCgroup): boolean;
}

const SUPERVISOR = "supervisor";
/** how long a readied cgroup waits for its exec before it is undone (the daemon's writes take milliseconds) */
const PREPARED_MS = 2_000;
/** after cgroup.kill, how long the kernel gets to empty the cgroup before the shim stops waiting */
const EMPTY_WAIT_MS = 2_000;
const EMPTY_POLL_MS = 2;

export class CommandCgroups {
  private constructor(private readonly root: string) {}

  /** the cgroup readied for the next exec (prepare), with the forker in it, until that exec takes it */
  private prepared: { execId: number; cgroup: CommandCgroup; tenant: CgroupTenant; timer: NodeJS.Timeout } | null = null;

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

  /**
   * Readies exec `execId`'s cgroup ahead of its message, with the forker in
   * it (the move costs a grace period after a pause; made now, it overlaps
   * the daemon's durable writes). Only when the forker is idle and no other
   * is readied; anything else leaves the exec to make its own. Undone after
   * PREPARED_MS if no exec takes it.
   */
  prepare(execId: number, tenant: CgroupTenant): void {
    if (this.prepared) return;
    const dir = `${this.root}/cmd-${execId}`;
    try {
      mkdirSync(dir);
    } catch {
      return; // a stale one (EEXIST): the exec's own create() empties it
    }
    const cgroup = new CommandCgroup(dir);
    if (!tenant.enter(cgroup)) {
      cgroup.discard();
      return;
    }
    const timer = setTimeout(() => this.unprepare(), PREPARED_MS);
    timer.unref();
    this.prepared = { execId, cgroup, tenant, timer };
  }

  /** No exec took the readied cgroup: the forker leaves it, and it goes (never killed: only the forker was in it). */
  private unprepare(): void {
    const p = this.prepared;
    if (!p) return;
    this.prepared = null;
    clearTimeout(p.timer);
    if (p.tenant.leave(p.cgroup)) p.cgroup.discard();
  }

  /** A new, empty cgroup for one command (the one readied for it, if any). Throws when it cannot be made. */
  create(execId: number): CommandCgroup {
    const p = this.prepared;
    if (p) {
      if (p.execId === execId) {
        this.prepared = null;
        clearTimeout(p.timer);
        return p.cgroup;
      }
      // another exec came first: the readied one is undone (the forker is moved to this exec's when it forks)
      this.unprepare();
    }
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

  /** Removes the cgroup if it is empty, and only then (never a kill). */
  discard(): boolean {
    return this.tryRemove();
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
