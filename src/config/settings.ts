/**
 * Daemon settings: flags over environment over defaults, validated once, whole.
 */
import { witnessFile } from "../audit/witness.js";
import path from "node:path";
import { z } from "zod";
import { checkNotifyUrl } from "../approvals/notify.js";
import { SandboxdError } from "../errors.js";
import { fileURLToPath } from "node:url";
import { serviceOverridesFromEnv } from "../net/services.js";
import { parseConsoleAddress, type ConsoleAddress } from "./console.js";
import { defaultAuditKey, defaultSocket, defaultStateDir } from "./paths.js";

export { clientSocket, defaultAuditKey, defaultSocket, defaultStateDir } from "./paths.js";

export const DEFAULT_IMAGE = "sandboxd-sandbox:latest";
/**
 * policies/default.yaml, as policy/load.ts names it. Spelled out here so the
 * CLI, which resolves settings on every call, does not load the policy
 * engine and its YAML parser just to learn a path.
 */
export const DEFAULT_POLICY_FILE = fileURLToPath(new URL("../../policies/default.yaml", import.meta.url));

export interface Settings {
  socket: string;
  stateDir: string;
  image: string;
  logLevel: "fatal" | "error" | "warn" | "info" | "debug" | "trace";
  shimConnectTimeoutMs: number;
  /** bare program names allowed on top of the SKILLS.md whitelist (operator's choice) */
  extraAllow: string[];
  /** the policy every phase runs under (policies/default.yaml unless SANDBOXD_POLICY says otherwise) */
  policyFile: string;
  /** build_audit.log at the project root (mounted read-only in the sandbox) or in the state dir */
  buildLog: "project" | "state";
  /** service URLs that override the project's .env (SANDBOXD_SERVICE_DATABASE_URL, …_DATABASE_URL_TEST, …_QUESTDB_URL, …_QUESTDB_URL_TEST, …_REDIS_URL, …_REDIS_URL_TEST) */
  serviceOverrides: Record<string, string>;
  /** run on every new approval request, the request as JSON on stdin (SANDBOXD_NOTIFY_COMMAND) */
  notifyCommand: string | null;
  /** POSTed every new approval request (SANDBOXD_NOTIFY_URL: https, or http on loopback) */
  notifyUrl: string | null;
  /** the operator console's loopback address (--console, SANDBOXD_CONSOLE); null: no console (the default) */
  console: ConsoleAddress | null;
  /** the ed25519 key that signs audit anchors (--audit-key, SANDBOXD_AUDIT_KEY); never inside the state dir */
  auditKey: string;
  /**
   * the witness of the latest signed head (src/audit/witness.ts): `<auditKey>.heads/<id>`, or in
   * SANDBOXD_AUDIT_WITNESS_DIR when the key's folder is read-only; never inside the state dir
   */
  auditWitness: string;
  /**
   * SANDBOXD_BENCH_NO_FAILFAST=1: commands are not categorised, counted or read for pytest's
   * report, and memory is not watched — for the benchmark's side-by-side run only (bench/run.mjs
   * `failfast`); the daemon says so at start and in every phase's trail
   */
  benchNoFailFast: boolean;
  /**
   * SANDBOXD_POOL_SIZE: warm pool containers kept ready per set of container
   * limits (src/phases/pool.ts); 0 turns the pool off (every phase starts cold)
   */
  poolSize: number;
  /** SANDBOXD_POOL_MAX_AGE: seconds a warm pool slot may wait for a claim before it is replaced */
  poolMaxAgeSeconds: number;
  /**
   * SANDBOXD_SPARE_LAYER: "0" keeps no spare layer disk (src/workspace/spare.ts):
   * every cold start makes its own, and the state dir reserves one budget less
   */
  spareLayer: boolean;
  /**
   * SANDBOXD_CGROUP_FAVORDYNMODS: "0" leaves the host's cgroup v2 mount as it
   * is; otherwise the daemon turns favordynmods on at start where commands get
   * cgroups of their own (src/util/dynmods.ts)
   */
  cgroupFavorDynmods: boolean;
}

/**
 * Off unless asked for: each slot is an idle container (the shim's Node,
 * ~40 MB) and its layer's disk reserved (2 GiB by default; docs/ARCHITECTURE.md "Warm pool").
 */
export const DEFAULT_POOL_SIZE = 0;
/** a warm pool slot older than this (seconds) is replaced, claimed by no one (src/phases/pool.ts) */
export const DEFAULT_POOL_MAX_AGE_SECONDS = 1800;

const settingsSchema = z
  .object({
    socket: z.string().min(1).refine((p) => Buffer.byteLength(p) < 104, "a unix socket path must be shorter than 104 bytes"),
    stateDir: z.string().min(1),
    image: z.string().min(1).regex(/^[\w./:@-]+$/, "not a Docker image reference"),
    logLevel: z.enum(["fatal", "error", "warn", "info", "debug", "trace"]),
    shimConnectTimeoutMs: z.number().int().min(1000).max(600_000),
    buildLog: z.enum(["project", "state"]),
    policyFile: z.string().min(1),
    extraAllow: z.array(z.string().regex(/^[\w.+-]+$/, "SANDBOXD_EXTRA_ALLOW takes bare program names separated by commas")),
    serviceOverrides: z.record(z.string().url("SANDBOXD_SERVICE_*_URL must be a URL")),
    notifyCommand: z.string().min(1).nullable(),
    notifyUrl: z.string().nullable(),
    auditKey: z.string().min(1),
    auditWitness: z.string().min(1),
    benchNoFailFast: z.boolean(),
    poolSize: z.number().int("SANDBOXD_POOL_SIZE takes a whole number").min(0).max(16),
    poolMaxAgeSeconds: z
      .number({ invalid_type_error: "SANDBOXD_POOL_MAX_AGE takes a whole number of seconds" })
      .int("SANDBOXD_POOL_MAX_AGE takes a whole number of seconds")
      .min(1, "SANDBOXD_POOL_MAX_AGE is at least 1 second")
      .max(7 * 86_400, "SANDBOXD_POOL_MAX_AGE is at most 604800 seconds (7 days)"),
    spareLayer: z.boolean(),
    cgroupFavorDynmods: z.boolean(),
  })
  .strict()
  .refine((s) => !isInside(s.auditKey, s.stateDir), {
    path: ["auditKey"],
    message: "the audit signing key must be outside the state dir (whoever can write the state dir must not hold the key that signs it); the default is /etc/sandboxd/audit-signing.key as root",
  })
  .refine((s) => !isInside(s.auditWitness, s.stateDir), {
    path: ["auditWitness"],
    message: "SANDBOXD_AUDIT_WITNESS_DIR must be outside the state dir: the witness says how long the trail was, to someone who could cut it",
  });

function isInside(file: string, dir: string): boolean {
  const rel = path.relative(dir, file);
  return rel === "" || (!rel.startsWith("..") && !path.isAbsolute(rel));
}

export function resolveSettings(
  flags: { socket?: string | undefined; stateDir?: string | undefined; policy?: string | undefined; console?: string | undefined; auditKey?: string | undefined },
  env: NodeJS.ProcessEnv = process.env,
): Settings {
  const raw = {
    socket: path.resolve(flags.socket ?? (env.SANDBOXD_SOCKET || defaultSocket(env))),
    stateDir: path.resolve(flags.stateDir ?? (env.SANDBOXD_STATE_DIR || defaultStateDir(env))),
    image: env.SANDBOXD_IMAGE || DEFAULT_IMAGE,
    logLevel: env.SANDBOXD_LOG_LEVEL || "info",
    shimConnectTimeoutMs: env.SANDBOXD_SHIM_TIMEOUT_MS ? Number(env.SANDBOXD_SHIM_TIMEOUT_MS) : 30_000,
    buildLog: env.SANDBOXD_BUILD_LOG || "project",
    policyFile: path.resolve(flags.policy ?? (env.SANDBOXD_POLICY || DEFAULT_POLICY_FILE)),
    extraAllow: (env.SANDBOXD_EXTRA_ALLOW ?? "")
      .split(",")
      .map((p) => p.trim())
      .filter(Boolean),
    serviceOverrides: serviceOverridesFromEnv(env),
    notifyCommand: env.SANDBOXD_NOTIFY_COMMAND || null,
    notifyUrl: env.SANDBOXD_NOTIFY_URL ? checkNotifyUrl(env.SANDBOXD_NOTIFY_URL) : null,
    auditKey: "",
    auditWitness: "",
    benchNoFailFast: env.SANDBOXD_BENCH_NO_FAILFAST === "1",
    poolSize: env.SANDBOXD_POOL_SIZE ? Number(env.SANDBOXD_POOL_SIZE) : DEFAULT_POOL_SIZE,
    poolMaxAgeSeconds: env.SANDBOXD_POOL_MAX_AGE ? Number(env.SANDBOXD_POOL_MAX_AGE) : DEFAULT_POOL_MAX_AGE_SECONDS,
    spareLayer: env.SANDBOXD_SPARE_LAYER !== "0",
    cgroupFavorDynmods: env.SANDBOXD_CGROUP_FAVORDYNMODS !== "0",
  };
  raw.auditKey = path.resolve(flags.auditKey ?? (env.SANDBOXD_AUDIT_KEY || defaultAuditKey(env)));
  raw.auditWitness = witnessFile(raw.auditKey, raw.stateDir, env.SANDBOXD_AUDIT_WITNESS_DIR || undefined);
  const r = settingsSchema.safeParse(raw);
  if (!r.success) {
    const problems = r.error.issues.map((i) => `${i.path.join(".")}: ${i.message}`).join("; ");
    throw new SandboxdError("SBX_ERR_CONFIG", `invalid settings: ${problems}`, {
      hint: "check --socket/--state-dir/--audit-key and SANDBOXD_* variables (see .env.example)",
    });
  }
  // Parsed apart from the schema: a refused address is its own coded error (SBX_ERR_CONSOLE_ADDRESS).
  const consoleSpec = flags.console ?? (env.SANDBOXD_CONSOLE || undefined);
  const consoleAddress = consoleSpec === undefined ? null : Object.freeze(parseConsoleAddress(consoleSpec));
  return Object.freeze({ ...r.data, console: consoleAddress }) as Settings;
}
