/**
 * ContainerRuntime on the Docker Engine API (dockerode), and the one place the
 * sandbox's hardening is written down.
 */
import Docker from "dockerode";
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { PassThrough, type Readable } from "node:stream";
import { SandboxdError } from "../errors.js";
import { SHIM_PATHS } from "../shim/protocol.js";
import type { ContainerRuntime, ContainerSummary, PhaseContainerSpec } from "./types.js";

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
export function hostConfigFor(spec: PhaseContainerSpec): Docker.HostConfig {
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
      `${spec.projectDir}:${SHIM_PATHS.workspace}:rw`,
      `${spec.runDir}:${SHIM_PATHS.runDir}:rw`,
      ...spec.readOnlyFiles.map((f) => `${f.host}:${f.container}:ro`),
      `${path.join(spec.runDir, HOSTS_FILE)}:/etc/hosts:ro`,
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
    try {
      container = await this.docker.createContainer({
        name: spec.name,
        Image: spec.image,
        Labels: spec.labels,
        Env: Object.entries(spec.env).map(([k, v]) => `${k}=${v}`),
        User: "0:0",
        // named in the image's /etc/hosts (runtime/image.ts SANDBOX_HOSTS), so gethostname() resolves
        Hostname: SANDBOX_HOSTNAME,
        WorkingDir: SHIM_PATHS.workspace,
        NetworkDisabled: true,
        Tty: false,
        OpenStdin: false,
        HostConfig: hostConfigFor(spec),
      });
    } catch (err) {
      throw dockerError(`creating container ${spec.name}`, err);
    }
    try {
      await container.start();
    } catch (err) {
      await container.remove({ force: true }).catch(() => undefined);
      throw dockerError(`starting container ${spec.name}`, err);
    }
    return container.id;
  }

  async stopAndRemove(id: string, graceSec: number): Promise<void> {
    const c = this.docker.getContainer(id);
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

  async logs(id: string, opts: { follow: boolean }): Promise<Readable> {
    const c = this.docker.getContainer(id);
    const out = new PassThrough();
    try {
      if (opts.follow) {
        const raw = await c.logs({ follow: true, stdout: true, stderr: true });
        this.docker.modem.demuxStream(raw, out, out);
        raw.on("end", () => out.end());
        raw.on("error", (e) => out.destroy(e));
        out.on("close", () => (raw as unknown as { destroy?: () => void }).destroy?.());
      } else {
        const buf = await c.logs({ follow: false, stdout: true, stderr: true });
        const src = new PassThrough();
        this.docker.modem.demuxStream(src, out, out);
        src.on("end", () => out.end());
        src.end(buf);
      }
    } catch (err) {
      if (statusOf(err) === 404) throw new SandboxdError("SBX_ERR_DOCKER", `container ${id} no longer exists`);
      throw dockerError(`reading logs of ${id}`, err);
    }
    return out;
  }
}
