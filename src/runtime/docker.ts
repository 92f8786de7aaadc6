/**
 * ContainerRuntime on the Docker Engine API (dockerode), and the one place the
 * sandbox's hardening is written down.
 */
import Docker from "dockerode";
import { mkdir, readdir, readFile, rmdir, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import type { Readable } from "node:stream";
import { SandboxdError } from "../errors.js";
import { SHIM_PATHS } from "../shim/protocol.js";
import { cgroup2Mount } from "../util/dynmods.js";
import { DockerLogDemux } from "./demux.js";
import { memoryProbeOf, type MemoryProbe } from "./cgroup.js";
import type { ContainerRuntime, ContainerState, ContainerSummary, PhaseContainerSpec } from "./types.js";

/** Every phase container's hostname; its /etc/hosts maps it to 127.0.0.1. */
export const SANDBOX_HOSTNAME = "sandbox";

/**
 * The phase container's /etc/hosts, written into the run dir and mounted
 * read-only. With networking disabled Docker writes none (the container gets
 * an empty file in its init layer, over anything the image has), and
 * `localhost` does not resolve: a suite binding ("localhost", port), or a
 * client configured with host=localhost, fails. IPv4 only, as the container
 * is: a `::1 localhost` line would make resolvers that use every address
 * (asyncio's create_server) or the first one (Node's listen) try ::1 and fail
 * with EADDRNOTAVAIL.
 */
export const SANDBOX_HOSTS = `127.0.0.1\tlocalhost ${SANDBOX_HOSTNAME}\n`;
const HOSTS_FILE = "hosts";

/**
 * Where the cgroup v2 hierarchy is mounted on the host (/sys/fs/cgroup on a
 * pure v2 host, /sys/fs/cgroup/unified on a hybrid one like this project's
 * machines), or null.
 */
export async function cgroup2Root(mounts = "/proc/self/mounts"): Promise<string | null> {
  const text = await readFile(mounts, "utf8").catch(() => "");
  return cgroup2Mount(text)?.root ?? null;
}

/** The host directory of a phase container's per-command cgroups (see src/shim/cgroups.ts). */
export function commandCgroupDir(root: string, containerName: string): string {
  return path.join(root, "sandboxd", containerName);
}

/**
 * Makes the phase's cgroup v2 directory, to be mounted read-write in the
 * container: there the shim makes one cgroup per command and kills it when
 * the command ends. Only root on the host can; null otherwise (the shim then
 * falls back to its process-table walk, with its known gap).
 */
async function makeCommandCgroupDir(containerName: string): Promise<string | null> {
  const root = await cgroup2Root();
  if (!root) return null;
  // Only where the v2 hierarchy gives its children no controller (a hybrid host like this
  // project's, whose limits live in v1): there a process moved into a
  // per-command cgroup keeps every limit of its container. On a host whose v2
  // hierarchy has controllers, a directory outside the container's own cgroup
  // would take commands out of its memory, pids and CPU limits; until the
  // directory is placed inside the container's cgroup, such hosts use the
  // shim's process-table fallback.
  const distributed = await readFile(path.join(root, "cgroup.subtree_control"), "utf8").catch(() => "unreadable");
  if (distributed.trim() !== "") return null;
  const dir = commandCgroupDir(root, containerName);
  try {
    await mkdir(dir, { recursive: true });
    // cgroup.kill (Linux 5.14+) is what ends a command's processes
    await stat(path.join(dir, "cgroup.kill"));
    return dir;
  } catch {
    // eslint-disable-next-line no-restricted-syntax -- cleaning up a directory that proved unusable; null already says per-command cgroups are off
    await rmdir(dir).catch(() => undefined);
    return null;
  }
}

/**
 * Removes a phase container's cgroup directory once the container is gone:
 * anything still in a command's cgroup is killed first (cgroup.kill), then
 * the empty cgroups are removed, children before the parent.
 */
export async function removeCommandCgroupDir(containerName: string): Promise<void> {
  const root = await cgroup2Root();
  if (!root) return;
  const dir = commandCgroupDir(root, containerName);
  let entries: string[];
  try {
    entries = (await readdir(dir, { withFileTypes: true })).filter((e) => e.isDirectory()).map((e) => e.name);
  } catch {
    return; // never made, or removed already
  }
  for (const name of entries) {
    const child = path.join(dir, name);
    // eslint-disable-next-line no-restricted-syntax -- the cgroup may be empty and gone already; the rmdir below is what must succeed
    await writeFile(path.join(child, "cgroup.kill"), "1").catch(() => undefined);
    for (let i = 0; i < 100; i++) {
      try {
        await rmdir(child);
        break;
      } catch {
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }
  // eslint-disable-next-line no-restricted-syntax -- the container is gone and its commands were killed above; a directory that is still busy is left behind, never reused (phase ids are unique)
  await rmdir(dir).catch(() => undefined);
}

function statusOf(err: unknown): number | undefined {
  return typeof err === "object" && err !== null && "statusCode" in err
    ? (err as { statusCode?: number }).statusCode
    : undefined;
}

function dockerError(what: string, err: unknown): SandboxdError {
  const message = err instanceof Error ? err.message : String(err);
  return new SandboxdError("SBX_ERR_DOCKER", `Docker engine: ${what} failed: ${message}`, { cause: err });
}

/** The HostConfig every phase container gets. Exported for the hardening tests. */
export function hostConfigFor(spec: PhaseContainerSpec, cgroupDir: string | null = null): Docker.HostConfig {
  return {
    // Loopback only: `--internal` networks can still reach the host's bridge addresses.
    NetworkMode: "none",
    // IPv4 loopback only: the NAT rule and conntrack watch (src/runtime/netns.ts) are IPv4.
    // Ports below 1024 cannot be bound (the engine's default is 0): the dead port stays dead.
    Sysctls: {
      "net.ipv6.conf.all.disable_ipv6": "1",
      "net.ipv6.conf.default.disable_ipv6": "1",
      "net.ipv4.ip_unprivileged_port_start": "1024",
    },
    CapDrop: ["ALL"],
    // The shim needs SETUID/SETGID to drop to the project owner and KILL to
    // signal process groups owned by that uid; its children keep none of them.
    CapAdd: spec.capAdd,
    SecurityOpt: ["no-new-privileges"],
    ReadonlyRootfs: true,
    Tmpfs: { "/tmp": `rw,nosuid,nodev,size=${spec.tmpfsBytes},mode=1777` },
    Binds: [
      `${spec.projectDir}:${SHIM_PATHS.workspace}:rw${spec.projectPropagation ? `,${spec.projectPropagation}` : ""}`,
      `${spec.runDir}:${SHIM_PATHS.runDir}:rw`,
      ...spec.readOnlyFiles.map((f) => `${f.host}:${f.container}:ro`),
      ...(spec.writableDirs ?? []).map((d) => `${d.host}:${d.container}:rw${d.propagation ? `,${d.propagation}` : ""}`),
      `${path.join(spec.runDir, HOSTS_FILE)}:/etc/hosts:ro`,
      ...(cgroupDir ? [`${cgroupDir}:${SHIM_PATHS.commandCgroups}:rw`] : []),
    ],
    Memory: spec.memoryBytes,
    MemorySwap: spec.memoryBytes,
    NanoCpus: Math.round(spec.cpus * 1e9),
    PidsLimit: spec.pidsLimit,
    Ulimits: [{ Name: "fsize", Soft: spec.fileSizeBytes, Hard: spec.fileSizeBytes }],
    IpcMode: "private",
    Privileged: false,
    AutoRemove: false,
    RestartPolicy: { Name: "no" },
  };
}

export class DockerRuntime implements ContainerRuntime {
  readonly docker: Docker;

  constructor(docker?: Docker) {
    this.docker = docker ?? new Docker();
  }

  async ping(): Promise<void> {
    try {
      await this.docker.ping();
    } catch (err) {
      throw new SandboxdError("SBX_ERR_DOCKER", `cannot reach the Docker engine: ${(err as Error).message}`, {
        hint: "start the engine (npm start does it on Debian as root) or set DOCKER_HOST",
        cause: err,
      });
    }
  }

  async imageExists(ref: string): Promise<boolean> {
    try {
      await this.docker.getImage(ref).inspect();
      return true;
    } catch (err) {
      if (statusOf(err) === 404) return false;
      throw dockerError(`inspecting image ${ref}`, err);
    }
  }

  async imageId(ref: string): Promise<string | null> {
    try {
      return (await this.docker.getImage(ref).inspect()).Id;
    } catch (err) {
      if (statusOf(err) === 404) return null;
      throw dockerError(`inspecting image ${ref}`, err);
    }
  }

  async runPhaseContainer(spec: PhaseContainerSpec): Promise<string> {
    let container: Docker.Container;
    try {
      await writeFile(path.join(spec.runDir, HOSTS_FILE), SANDBOX_HOSTS, { mode: 0o644 });
    } catch (err) {
      throw new SandboxdError("SBX_ERR_DOCKER", `cannot write the phase's hosts file in ${spec.runDir}: ${(err as Error).message}`, {
        hint: "the run dir must exist and be writable by the daemon",
        cause: err,
      });
    }
    const cgroupDir = await makeCommandCgroupDir(spec.name);
    try {
      container = await this.docker.createContainer({
        name: spec.name,
        Image: spec.image,
        Labels: spec.labels,
        Env: Object.entries(spec.env).map(([k, v]) => `${k}=${v}`),
        User: "0:0",
        // named in the image's /etc/hosts (runtime/image.ts SANDBOX_HOSTS), so gethostname() resolves
        Hostname: SANDBOX_HOSTNAME,
        // not /workspace: a process whose cwd is in the view would pin the
        // container's copy of the overlay (commands get /workspace as their
        // cwd by path, each time)
        WorkingDir: "/",
        NetworkDisabled: true,
        Tty: false,
        OpenStdin: false,
        HostConfig: hostConfigFor(spec, cgroupDir),
      });
    } catch (err) {
      if (cgroupDir) await removeCommandCgroupDir(spec.name);
      throw dockerError(`creating container ${spec.name}`, err);
    }
    try {
      await container.start();
    } catch (err) {
      // the start's own error is what the caller needs; a container left behind carries its labels and is reaped by reconcile
      // eslint-disable-next-line no-restricted-syntax -- see the line above
      await container.remove({ force: true }).catch(() => undefined);
      if (cgroupDir) await removeCommandCgroupDir(spec.name);
      throw dockerError(`starting container ${spec.name}`, err);
    }
    return container.id;
  }

  async stopAndRemove(id: string, graceSec: number): Promise<void> {
    const c = this.docker.getContainer(id);
    const name = await c.inspect().then(
      (info) => info.Name.replace(/^\//, ""),
      () => null,
    );
    try {
      await c.stop({ t: graceSec });
    } catch (err) {
      const s = statusOf(err);
      if (s !== 304 && s !== 404) throw dockerError(`stopping container ${id}`, err);
    }
    try {
      await c.remove({ force: true, v: true });
    } catch (err) {
      const s = statusOf(err);
      // 409: removal already in progress
      if (s !== 404 && s !== 409) throw dockerError(`removing container ${id}`, err);
    }
    if (name) await removeCommandCgroupDir(name);
  }

  async list(labelFilter: Record<string, string>): Promise<ContainerSummary[]> {
    try {
      const found = await this.docker.listContainers({
        all: true,
        filters: { label: Object.entries(labelFilter).map(([k, v]) => `${k}=${v}`) },
      });
      return found.map((c) => ({
        id: c.Id,
        name: (c.Names[0] ?? "").replace(/^\//, ""),
        labels: c.Labels ?? {},
        running: c.State === "running",
        state: c.State,
      }));
    } catch (err) {
      throw dockerError("listing containers", err);
    }
  }

  async containerPid(id: string): Promise<number> {
    let state: { Pid: number; Running: boolean };
    try {
      state = (await this.docker.getContainer(id).inspect()).State;
    } catch (err) {
      throw dockerError(`inspecting container ${id}`, err);
    }
    if (!state.Running || !(state.Pid > 0)) throw new SandboxdError("SBX_ERR_DOCKER", `container ${id} is not running`);
    return state.Pid;
  }

  async pause(id: string): Promise<void> {
    try {
      await this.docker.getContainer(id).pause();
    } catch (err) {
      // 409: already paused
      if (statusOf(err) !== 409 || !(await this.isPaused(id))) throw dockerError(`pausing container ${id}`, err);
    }
  }

  async unpause(id: string): Promise<void> {
    try {
      await this.docker.getContainer(id).unpause();
    } catch (err) {
      const s = statusOf(err);
      // 409/500 "is not paused", 404 gone: nothing to thaw
      if (s === 404 || !(await this.isPaused(id).catch(() => false))) return;
      throw dockerError(`unpausing container ${id}`, err);
    }
  }

  async isPaused(id: string): Promise<boolean> {
    try {
      return (await this.docker.getContainer(id).inspect()).State.Paused === true;
    } catch (err) {
      throw dockerError(`inspecting container ${id}`, err);
    }
  }

  async inspect(id: string): Promise<ContainerState | null> {
    try {
      const { State } = await this.docker.getContainer(id).inspect();
      return { running: State.Running, status: State.Status, exitCode: State.Running ? null : State.ExitCode, oomKilled: State.OOMKilled };
    } catch (err) {
      if (statusOf(err) === 404) return null;
      throw dockerError(`inspecting container ${id}`, err);
    }
  }

  async memoryProbe(id: string, knownPid?: number): Promise<MemoryProbe | null> {
    const pid = knownPid ?? (await this.containerPid(id));
    try {
      return await memoryProbeOf(pid);
    } catch {
      // /proc of a process this daemon cannot read: no watch, said by the caller
      return null;
    }
  }

  /**
   * The container's log as a stream, followed or not, demultiplexed as it is
   * read (./demux.ts): bounded memory however long the log.
   */
  async logs(id: string, opts: { follow: boolean }): Promise<Readable> {
    let raw: Readable;
    try {
      // dockerode buffers a non-followed log whole; the engine's stream is asked for directly
      raw = await new Promise<Readable>((resolve, reject) => {
        (this.docker.modem as { dial(o: unknown, cb: (err: unknown, stream: Readable) => void): void }).dial(
          {
            path: `/containers/${encodeURIComponent(id)}/logs?`,
            method: "GET",
            isStream: true,
            statusCodes: { 200: true, 404: "no such container", 500: "server error" },
            options: { follow: opts.follow, stdout: true, stderr: true },
          },
          (err, stream) => (err ? reject(err) : resolve(stream)),
        );
      });
    } catch (err) {
      if (statusOf(err) === 404) throw new SandboxdError("SBX_ERR_DOCKER", `container ${id} no longer exists`);
      throw dockerError(`reading logs of ${id}`, err);
    }
    const out = new DockerLogDemux();
    raw.on("error", (e) => out.destroy(e));
    // a consumer that goes away (a closed follow) ends the engine's stream too
    out.on("close", () => raw.destroy());
    return raw.pipe(out);
  }

}
