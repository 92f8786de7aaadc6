/**
 * Building the sandbox image (sandbox/Dockerfile + the shim bundle) on the
 * Docker Engine API, with no docker CLI involved.
 *
 * No container registry is reachable where sandboxd runs, so the base image
 * may have to be made here: `debootstrap --variant=minbase` into a temp dir,
 * then imported as OFFLINE_BASE_IMAGE. Containers on the default bridge do
 * reach the Debian mirror, so the Dockerfile's `apt-get install` works on top.
 *
 * The built image carries a hash of its whole context (Dockerfile, shim bytes,
 * base name) as a label, so "is the image up to date?" is one inspect call and
 * an unchanged context never triggers a build.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtemp, readFile, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import type Docker from "dockerode";
import { pack } from "tar-stream";
import { SandboxdError } from "../errors.js";

export const DEFAULT_SANDBOX_IMAGE = "sandboxd-sandbox:latest";
export const DEFAULT_BASE_IMAGE = "debian:bookworm-slim";
export const OFFLINE_BASE_IMAGE = "sandboxd-base:bookworm";
export const CONTEXT_HASH_LABEL = "sandboxd.context-hash";
export const BASE_LABEL = "sandboxd.base";

/** A registry that does not answer must not hold the build up. */
const PULL_TIMEOUT_MS = 20_000;
const OFFLINE_SUITE = "bookworm";

export type ImageLog = (line: string) => void;
export type ImageStatus = "absent" | "stale" | "current";

export interface ContextHashInput {
  dockerfile: Buffer | string;
  shim: Buffer | string;
  base: string;
}

/**
 * sha256 over everything that determines the built image. Each part is
 * length-prefixed so that bytes cannot move from one part to the next
 * without changing the hash.
 */
export function contextHash(input: ContextHashInput): string {
  const h = createHash("sha256");
  for (const part of [input.dockerfile, input.shim, input.base]) {
    const bytes = typeof part === "string" ? Buffer.from(part, "utf8") : part;
    const len = Buffer.alloc(8);
    len.writeBigUInt64BE(BigInt(bytes.length));
    h.update(len);
    h.update(bytes);
  }
  return h.digest("hex");
}

function statusOf(err: unknown): number | undefined {
  return typeof err === "object" && err !== null && "statusCode" in err
    ? (err as { statusCode?: number }).statusCode
    : undefined;
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function dockerError(what: string, err: unknown, hint?: string): SandboxdError {
  return new SandboxdError("SBX_ERR_DOCKER", `Docker engine: ${what} failed: ${messageOf(err)}`, {
    ...(hint === undefined ? {} : { hint }),
    cause: err,
  });
}

async function inspectImage(docker: Docker, ref: string): Promise<Docker.ImageInspectInfo | undefined> {
  try {
    return await docker.getImage(ref).inspect();
  } catch (err) {
    if (statusOf(err) === 404) return undefined;
    throw dockerError(`inspecting image ${ref}`, err, "check that the Docker engine is running (`docker info`)");
  }
}

export async function imageStatus(docker: Docker, tag: string, hash: string): Promise<ImageStatus> {
  const info = await inspectImage(docker, tag);
  if (info === undefined) return "absent";
  return info.Config?.Labels?.[CONTEXT_HASH_LABEL] === hash ? "current" : "stale";
}

interface ProgressEvent {
  stream?: string;
  status?: string;
  progress?: string;
  id?: string;
  error?: string;
  errorDetail?: { message?: string };
  aux?: { ID?: string };
}

/**
 * Follow a JSON-lines progress stream. docker-modem's followProgress only
 * fails on transport errors; the engine reports build and pull failures as
 * `error` events inside a 200 response, so those are turned into rejections here.
 */
function follow(docker: Docker, stream: NodeJS.ReadableStream, onEvent: (ev: ProgressEvent) => void): Promise<void> {
  return new Promise((resolve, reject) => {
    let failure: string | undefined;
    docker.modem.followProgress(
      stream,
      (err) => {
        if (err) reject(err);
        else if (failure !== undefined) reject(new Error(failure));
        else resolve();
      },
      (ev: ProgressEvent) => {
        if (ev.error !== undefined || ev.errorDetail !== undefined) {
          failure ??= (ev.errorDetail?.message ?? ev.error ?? "unknown error").trim();
          return;
        }
        onEvent(ev);
      },
    );
  });
}

async function tryPull(docker: Docker, ref: string, log: ImageLog, timeoutMs: number): Promise<boolean> {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    log(`pulling ${ref} (gives up after ${Math.round(timeoutMs / 1000)} s)`);
    const stream = await docker.pull(ref, { abortSignal: abort.signal });
    let lastStatus = "";
    await follow(docker, stream, (ev) => {
      // Layer-by-layer download progress is too chatty for a log; keep status changes.
      if (ev.status !== undefined && ev.progress === undefined && ev.status !== lastStatus) {
        lastStatus = ev.status;
        log(ev.id === undefined ? ev.status : `${ev.id}: ${ev.status}`);
      }
    });
    return true;
  } catch (err) {
    const why = abort.signal.aborted ? `no answer within ${Math.round(timeoutMs / 1000)} s` : messageOf(err);
    log(`pull of ${ref} failed: ${why.split("\n")[0]}`);
    return false;
  } finally {
    clearTimeout(timer);
  }
}

/** One deb entry of the apt sources: a mirror URI and the suites it was configured for. */
interface AptSource {
  uri: string;
  suites: string[];
}

function parseDeb822(text: string): AptSource[] {
  const out: AptSource[] = [];
  for (const stanza of text.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    let current: string | undefined;
    for (const raw of stanza.split("\n")) {
      if (raw.startsWith("#")) continue;
      if (/^\s/.test(raw) && current !== undefined) {
        fields.set(current, `${fields.get(current) ?? ""} ${raw.trim()}`);
        continue;
      }
      const m = /^([A-Za-z-]+):\s*(.*)$/.exec(raw);
      if (m?.[1] !== undefined) {
        current = m[1].toLowerCase();
        fields.set(current, m[2] ?? "");
      }
    }
    const words = (key: string): string[] => (fields.get(key) ?? "").split(/\s+/).filter(Boolean);
    if (!words("types").includes("deb")) continue;
    if (["no", "false"].includes((fields.get("enabled") ?? "yes").trim().toLowerCase())) continue;
    for (const uri of words("uris")) out.push({ uri, suites: words("suites") });
  }
  return out;
}

function parseOneLineStyle(text: string): AptSource[] {
  const out: AptSource[] = [];
  for (const raw of text.split("\n")) {
    const line = raw.replace(/#.*$/, "").trim();
    // deb [arch=amd64 signed-by=...] URI suite component...
    const m = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)/.exec(line);
    if (m?.[1] !== undefined && m[2] !== undefined) out.push({ uri: m[1], suites: [m[2]] });
  }
  return out;
}

async function readAptSources(root: string): Promise<AptSource[]> {
  const sources: AptSource[] = [];
  const read = async (file: string): Promise<string | undefined> => {
    try {
      return await readFile(file, "utf8");
    } catch {
      return undefined;
    }
  };
  const dir = path.join(root, "etc/apt/sources.list.d");
  let entries: string[] = [];
  try {
    entries = (await readdir(dir)).sort();
  } catch {
    // no sources.list.d: fine, sources.list may still exist
  }
  for (const name of entries) {
    const text = name.endsWith(".sources") || name.endsWith(".list") ? await read(path.join(dir, name)) : undefined;
    if (text === undefined) continue;
    sources.push(...(name.endsWith(".sources") ? parseDeb822(text) : parseOneLineStyle(text)));
  }
  const legacy = await read(path.join(root, "etc/apt/sources.list"));
  if (legacy !== undefined) sources.push(...parseOneLineStyle(legacy));
  return sources;
}

/**
 * The Debian mirror configured on this machine, for debootstrap. Prefers an
 * entry serving the suite being bootstrapped, then any Debian archive that is
 * not the security archive (that one does not carry the base system).
 * `root` exists for tests; it is "/" otherwise.
 */
export async function findDebianMirror(root = "/", suite = OFFLINE_SUITE): Promise<string | undefined> {
  const usable = (await readAptSources(root)).filter(
    (s) => /^(https?|file):/.test(s.uri) && !/security/i.test(s.uri),
  );
  const exact = usable.find((s) => s.suites.includes(suite));
  if (exact) return exact.uri;
  return usable.find((s) => /debian/i.test(s.uri))?.uri;
}

/** Run a command, forwarding its output line by line; reject with the tail of it on failure. */
function runLogged(cmd: string, args: string[], log: ImageLog, hintIfMissing: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    const tail: string[] = [];
    const onData = (buf: Buffer): void => {
      for (const line of buf.toString("utf8").split("\n")) {
        const l = line.trimEnd();
        if (l.length === 0) continue;
        tail.push(l);
        if (tail.length > 20) tail.shift();
        log(l);
      }
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    child.on("error", (err: NodeJS.ErrnoException) => {
      if (err.code === "ENOENT") {
        reject(new SandboxdError("SBX_ERR_CONFIG", `${cmd} is not installed`, { hint: hintIfMissing, cause: err }));
      } else {
        reject(err);
      }
    });
    child.on("close", (code, signal) => {
      if (code === 0) return resolve();
      reject(
        new SandboxdError("SBX_ERR_CONFIG", `${cmd} failed (${signal ?? `exit ${code}`}): ${tail.slice(-5).join(" | ")}`, {
          hint: "see the output above; pass --base with an image that exists locally to skip the offline base",
        }),
      );
    });
  });
}

/**
 * debootstrap mounts /proc and /sys inside the target while it works; if it
 * died midway they may still be mounted, and a recursive delete must never
 * walk into them.
 */
async function unmountBelow(dir: string): Promise<void> {
  let mounts = "";
  try {
    mounts = await readFile("/proc/self/mounts", "utf8");
  } catch {
    return;
  }
  const points = mounts
    .split("\n")
    .map((l) => l.split(" ")[1]?.replace(/\\040/g, " "))
    .filter((p): p is string => p !== undefined && p.startsWith(`${dir}/`))
    .sort((a, b) => b.length - a.length);
  for (const p of points) {
    await new Promise<void>((resolve) => {
      const c = spawn("umount", ["-l", p], { stdio: "ignore" });
      c.on("error", () => resolve());
      c.on("close", () => resolve());
    });
  }
}

async function createOfflineBase(docker: Docker, log: ImageLog): Promise<void> {
  const mirror = await findDebianMirror();
  if (mirror === undefined) {
    throw new SandboxdError("SBX_ERR_CONFIG", "no Debian apt mirror found in /etc/apt/sources.list*", {
      hint: "add a Debian mirror to the apt sources, or pass --base with an image that exists locally",
    });
  }
  if (typeof process.getuid === "function" && process.getuid() !== 0) {
    throw new SandboxdError("SBX_ERR_CONFIG", `cannot create the offline base ${OFFLINE_BASE_IMAGE}: debootstrap needs root`, {
      hint: "run `sandboxd image build` once as root, or pass --base with an image that exists locally",
    });
  }
  const [repo, tag] = OFFLINE_BASE_IMAGE.split(":") as [string, string];
  const dir = await mkdtemp(path.join(tmpdir(), "sandboxd-base-"));
  try {
    log(`creating offline base ${OFFLINE_BASE_IMAGE}: debootstrap ${OFFLINE_SUITE} from ${mirror} (about a minute)`);
    await runLogged(
      "debootstrap",
      ["--variant=minbase", OFFLINE_SUITE, dir, mirror],
      (l) => log(`debootstrap: ${l}`),
      "install it (`bash scripts/ensure-docker.sh` does, as root), or pass --base with an image that exists locally",
    );
    log(`importing ${dir} as ${OFFLINE_BASE_IMAGE}`);
    const tar = spawn("tar", ["--numeric-owner", "-C", dir, "-c", "."], { stdio: ["ignore", "pipe", "pipe"] });
    let tarErr = "";
    tar.stderr.on("data", (b: Buffer) => (tarErr += b.toString("utf8")));
    const tarDone = new Promise<void>((resolve, reject) => {
      tar.on("error", reject);
      tar.on("close", (code) => (code === 0 ? resolve() : reject(new Error(`tar exited ${code}: ${tarErr.trim()}`))));
    });
    // Awaited after the import; this only keeps an early tar failure from being an unhandled rejection.
    // eslint-disable-next-line no-restricted-syntax -- tarDone is awaited below; this only defers its rejection
    tarDone.catch(() => {});
    try {
      const stream = await docker.importImage(tar.stdout, { repo, tag, message: "sandboxd offline base (debootstrap)" });
      await follow(docker, stream, (ev) => {
        if (ev.status !== undefined && ev.progress === undefined) log(`import: ${ev.status}`);
      });
      await tarDone;
    } catch (err) {
      tar.kill();
      throw dockerError(`importing ${OFFLINE_BASE_IMAGE}`, err);
    }
  } finally {
    await unmountBelow(dir);
    await rm(dir, { recursive: true, force: true });
  }
}

export interface EnsureBaseOptions {
  base?: string;
  log?: ImageLog;
  pullTimeoutMs?: number;
}

/**
 * The base image to build FROM: `base` if it exists or can be pulled, else the
 * offline base, created with debootstrap when it does not exist yet.
 * Returns the name of the image that is now present locally.
 */
export async function ensureBaseImage(docker: Docker, opts: EnsureBaseOptions = {}): Promise<string> {
  const base = opts.base ?? DEFAULT_BASE_IMAGE;
  const log = opts.log ?? (() => {});
  if (await inspectImage(docker, base)) return base;
  if (base !== OFFLINE_BASE_IMAGE && (await tryPull(docker, base, log, opts.pullTimeoutMs ?? PULL_TIMEOUT_MS))) {
    return base;
  }
  if (await inspectImage(docker, OFFLINE_BASE_IMAGE)) {
    log(`using the offline base ${OFFLINE_BASE_IMAGE}`);
    return OFFLINE_BASE_IMAGE;
  }
  await createOfflineBase(docker, log);
  return OFFLINE_BASE_IMAGE;
}

interface BuildContext {
  dockerfile: Buffer;
  shim: Buffer;
}

async function readContext(dockerfileDir: string, shimBundlePath: string): Promise<BuildContext> {
  const read = async (file: string, hint: string): Promise<Buffer> => {
    try {
      return await readFile(file);
    } catch (err) {
      throw new SandboxdError("SBX_ERR_CONFIG", `cannot read ${file}: ${messageOf(err)}`, { hint, cause: err });
    }
  };
  return {
    dockerfile: await read(path.join(dockerfileDir, "Dockerfile"), "pass the folder that holds the sandbox Dockerfile (sandbox/)"),
    shim: await read(shimBundlePath, "build the shim bundle first: `npm run build`"),
  };
}

function contextTar(ctx: BuildContext): NodeJS.ReadableStream {
  const p = pack();
  // Fixed mtime: the classic builder's cache key for COPY is content-based, but
  // keeping the archive deterministic costs nothing.
  const mtime = new Date(0);
  p.entry({ name: "Dockerfile", mode: 0o644, mtime }, ctx.dockerfile);
  p.entry({ name: "shim.cjs", mode: 0o644, mtime }, ctx.shim);
  p.finalize();
  return p as unknown as NodeJS.ReadableStream;
}

export interface BuildOptions {
  tag?: string;
  base?: string;
  dockerfileDir: string;
  shimBundlePath: string;
  log?: ImageLog;
  noCache?: boolean;
}

export interface BuildResult {
  imageId: string;
  base: string;
  hash: string;
  /** every build step was a cache hit (nothing ran, nothing was copied anew) */
  cached: boolean;
}

export async function buildSandboxImage(docker: Docker, opts: BuildOptions): Promise<BuildResult> {
  const tag = opts.tag ?? DEFAULT_SANDBOX_IMAGE;
  const base = opts.base ?? DEFAULT_BASE_IMAGE;
  const log = opts.log ?? (() => {});
  const ctx = await readContext(opts.dockerfileDir, opts.shimBundlePath);
  const hash = contextHash({ ...ctx, base });
  const previous = await inspectImage(docker, tag);

  let stream: NodeJS.ReadableStream;
  try {
    stream = await docker.buildImage(contextTar(ctx), {
      t: tag,
      buildargs: { BASE: base },
      labels: { [CONTEXT_HASH_LABEL]: hash, [BASE_LABEL]: base },
      nocache: opts.noCache === true,
      rm: true,
      forcerm: true,
    });
  } catch (err) {
    throw dockerError(`building ${tag}`, err);
  }

  // Cache accounting from the classic builder's output: each "Step i/n" is
  // followed by " ---> Using cache" when reused. FROM and a global ARG never
  // print it, so those steps do not count.
  const steps: { text: string; cached: boolean }[] = [];
  let builtId: string | undefined;
  let pending = "";
  const onLine = (raw: string): void => {
    const line = raw.trimEnd();
    if (line.length === 0) return;
    const step = /^Step \d+\/\d+ : (.*)$/.exec(line);
    if (step?.[1] !== undefined) steps.push({ text: step[1], cached: false });
    else if (/^ ---> Using cache/.test(line)) {
      const last = steps[steps.length - 1];
      if (last) last.cached = true;
    }
    const done = /^Successfully built ([0-9a-f]+)/.exec(line);
    if (done?.[1] !== undefined) builtId = done[1];
    log(line);
  };
  try {
    await follow(docker, stream, (ev) => {
      if (ev.aux?.ID !== undefined) builtId = ev.aux.ID;
      if (ev.stream === undefined) return;
      // Stream chunks are not guaranteed to end on line boundaries.
      pending += ev.stream;
      const nl = pending.lastIndexOf("\n");
      if (nl < 0) return;
      for (const line of pending.slice(0, nl).split("\n")) onLine(line);
      pending = pending.slice(nl + 1);
    });
    if (pending.length > 0) onLine(pending);
  } catch (err) {
    throw new SandboxdError("SBX_ERR_DOCKER", `building ${tag} FROM ${base} failed: ${messageOf(err)}`, {
      hint:
        "read the build output above; if apt-get failed, check that containers on the default bridge reach the Debian mirror",
      cause: err,
    });
  }

  const info = await inspectImage(docker, tag);
  if (info === undefined) {
    throw new SandboxdError("SBX_ERR_DOCKER", `the build of ${tag} finished but the image is not there${builtId ? ` (built ${builtId})` : ""}`, {
      hint: "check the engine's log; the tag may have been removed concurrently",
    });
  }
  // A rebuild moves the tag; drop the image it left behind unless another tag still names it (an
  // operator's `docker tag … :known-good`: removing by id would untag and delete it when it is the
  // only other one) or a container still uses it (the engine refuses).
  if (previous !== undefined && previous.Id !== info.Id) {
    const left = await inspectImage(docker, previous.Id);
    const named = (left?.RepoTags ?? []).filter((t) => t !== "<none>:<none>");
    if (left !== undefined && named.length === 0) {
      try {
        await docker.getImage(previous.Id).remove();
      } catch {
        // in use or already gone: harmless
      }
    }
  }
  const firstFrom = steps.findIndex((st) => /^FROM\s/i.test(st.text));
  const layerSteps = steps.filter((st, i) => i > firstFrom && !/^FROM\s/i.test(st.text));
  return { imageId: info.Id, base, hash, cached: layerSteps.length > 0 && layerSteps.every((st) => st.cached) };
}

export interface EnsureImageOptions {
  tag?: string;
  /** the base asked for; the offline base stands in when it cannot be had */
  base?: string;
  dockerfileDir: string;
  shimBundlePath: string;
  log?: ImageLog;
  /** rebuild even when the image is current (layer cache still used) */
  force?: boolean;
  noCache?: boolean;
  pullTimeoutMs?: number;
}

export interface EnsureImageResult {
  tag: string;
  imageId: string;
  base: string;
  hash: string;
  /** status before this call */
  status: ImageStatus;
  built: boolean;
  cached?: boolean;
}

/**
 * Which base a build would use right now without touching the network: the
 * asked-for base if present, else the offline base if present.
 */
async function localBase(docker: Docker, base: string): Promise<string | undefined> {
  if (await inspectImage(docker, base)) return base;
  if (await inspectImage(docker, OFFLINE_BASE_IMAGE)) return OFFLINE_BASE_IMAGE;
  return undefined;
}

/** Build the sandbox image unless the one tagged `tag` already matches this context. */
export async function ensureSandboxImage(docker: Docker, opts: EnsureImageOptions): Promise<EnsureImageResult> {
  const tag = opts.tag ?? DEFAULT_SANDBOX_IMAGE;
  const wanted = opts.base ?? DEFAULT_BASE_IMAGE;
  const log = opts.log ?? (() => {});
  const ctx = await readContext(opts.dockerfileDir, opts.shimBundlePath);

  let status: ImageStatus = "absent";
  const present = await localBase(docker, wanted);
  if (present !== undefined) {
    const hash = contextHash({ ...ctx, base: present });
    status = await imageStatus(docker, tag, hash);
    if (status === "current" && opts.force !== true) {
      const info = await inspectImage(docker, tag);
      if (info !== undefined) return { tag, imageId: info.Id, base: present, hash, status, built: false };
    }
  } else {
    status = (await inspectImage(docker, tag)) === undefined ? "absent" : "stale";
  }

  log(status === "current" ? `rebuilding ${tag} (forced)` : `sandbox image ${tag} is ${status}; building it`);
  // With no base asked for, a base that is already here is used as is: on a
  // machine without a registry, retrying the pull on every shim change would
  // only add its timeout to each rebuild.
  const base =
    present !== undefined && (opts.base === undefined || present === opts.base)
      ? present
      : await ensureBaseImage(docker, {
          base: wanted,
          log,
          ...(opts.pullTimeoutMs === undefined ? {} : { pullTimeoutMs: opts.pullTimeoutMs }),
        });
  const result = await buildSandboxImage(docker, {
    tag,
    base,
    dockerfileDir: opts.dockerfileDir,
    shimBundlePath: opts.shimBundlePath,
    log,
    ...(opts.noCache === undefined ? {} : { noCache: opts.noCache }),
  });
  return { tag, imageId: result.imageId, base, hash: result.hash, status, built: true, cached: result.cached };
}
