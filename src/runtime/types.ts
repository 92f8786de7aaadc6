/**
 * The container runtime seam. The phase manager talks only to this interface;
 * runtime/docker.ts implements it on the Docker Engine API, and a Kubernetes
 * backend can stand beside it.
 */
import type { Readable } from "node:stream";
import type { MemoryProbe } from "./cgroup.js";

export type { MemoryProbe, MemorySample } from "./cgroup.js";

export const LABELS = {
  managed: "sandboxd.managed",
  phase: "sandboxd.phase",
  instance: "sandboxd.instance",
  mode: "sandboxd.mode",
  project: "sandboxd.project",
  /**
   * set on a warm pool's container (src/phases/pool.ts): made before any phase
   * claimed it, so it carries no mode or project label; its phase label is the
   * id the claiming phase takes
   */
  pool: "sandboxd.pool",
} as const;

export interface PhaseContainerSpec {
  name: string;
  image: string;
  labels: Record<string, string>;
  /** host path bind-mounted read-write at /workspace */
  projectDir: string;
  /**
   * mount propagation of that bind: "rslave" when projectDir is a shared
   * mount point the daemon mounts the phase's view on (src/workspace/layer.ts)
   */
  projectPropagation?: "rslave";
  /** host path bind-mounted at /run/sandboxd (the control socket lives here) */
  runDir: string;
  /** host files mounted read-only at a path inside /workspace (over the rw project mount) */
  readOnlyFiles: Array<{ host: string; container: string }>;
  /**
   * host folders bound read-write (the project's package disk, src/workspace/packages.ts);
   * "rslave" for a shared mount point the daemon mounts the real folder on later (a warm pool's)
   */
  writableDirs?: Array<{ host: string; container: string; propagation?: "rslave" }>;
  /** environment of the shim process (not of the commands it runs) */
  env: Record<string, string>;
  memoryBytes: number;
  cpus: number;
  pidsLimit: number;
  fileSizeBytes: number;
  tmpfsBytes: number;
  /** capabilities on top of an empty set */
  capAdd: string[];
}

export interface ContainerSummary {
  id: string;
  name: string;
  labels: Record<string, string>;
  running: boolean;
  state: string;
}

/** What became of a container, for a phase that lost its shim: running, or how it ended. */
export interface ContainerState {
  running: boolean;
  /** Docker's word: running, exited, dead, paused … */
  status: string;
  exitCode: number | null;
  oomKilled: boolean;
}

export interface ContainerRuntime {
  /** throws SBX_ERR_DOCKER when the engine cannot be reached */
  ping(): Promise<void>;
  imageExists(ref: string): Promise<boolean>;
  /** the id of the image `ref` names now (a rebuild moves the tag); null when there is none */
  imageId(ref: string): Promise<string | null>;
  /** create and start; returns the container id */
  runPhaseContainer(spec: PhaseContainerSpec): Promise<string>;
  /** stop (SIGTERM, then SIGKILL after graceSec) and remove; a missing container is not an error */
  stopAndRemove(id: string, graceSec: number): Promise<void>;
  list(labelFilter: Record<string, string>): Promise<ContainerSummary[]>;
  /** the container's stdout and stderr, interleaved as they were written */
  logs(id: string, opts: { follow: boolean }): Promise<Readable>;
  /**
   * The host pid of the running container's first process: its namespaces
   * are where src/runtime/netns.ts works. Throws when the container is gone.
   */
  containerPid(id: string): Promise<number>;
  /** freeze every process of the container (cgroup freezer), state kept for a person to inspect */
  pause(id: string): Promise<void>;
  /** thaw a paused container; a container that is not paused is not an error */
  unpause(id: string): Promise<void>;
  /** whether the container is paused (docker inspect State.Paused) */
  isPaused(id: string): Promise<boolean>;
  /** The container's state; null when it no longer exists. */
  inspect(id: string): Promise<ContainerState | null>;
  /**
   * The running container's memory as its cgroup reports it (src/runtime/cgroup.ts):
   * for the resource watch. Null when it cannot be read here (a daemon that is not
   * root, an engine on another host). `knownPid`: the container's init when the
   * caller knows it already (a warm pool's container), sparing the engine a round trip.
   */
  memoryProbe(id: string, knownPid?: number): Promise<MemoryProbe | null>;
}
