/**
 * `sandboxd doctor`: checks the host the daemon runs on, one line per check,
 * each failure with what to do. It reads only (the engine's /version and
 * /info, the filesystem, PATH) and works whether or not a daemon runs.
 */
import { constants as fsc } from "node:fs";
import { access, readFile, stat, statfs } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { DYNMODS_OPTION, favorDynmods, type DynmodsOutcome } from "../util/dynmods.js";

export type CheckStatus = "ok" | "warn" | "fail";

export interface Check {
  name: string;
  status: CheckStatus;
  detail: string;
  /** what to do, for warn and fail */
  hint?: string;
}

/** What the checks read from the engine; an interface so the verdicts are unit-testable. */
export interface EngineFacts {
  version: string;
  apiVersion: string;
  /** runc's version string as the engine reports it (Components of /version) */
  runc: string | null;
  cgroupVersion: string | null;
  cgroupDriver: string | null;
  securityOptions: string[];
}

export interface DoctorInput {
  engine: EngineFacts | { error: string };
  imagePresent: boolean | null;
  image: string;
  stateDir: string;
  socket: string;
  isRoot: boolean;
  nodeVersion: string;
}

/**
 * CVE-2024-21626 ("Leaky Vessels": a container process can reach the host's
 * filesystem through a leaked fd) is fixed upstream in runc 1.1.12. Debian
 * backported the fix to bookworm's 1.1.5 as 1.1.5+ds1-1+deb12u1 (DSA-5615-1),
 * so a Debian revision at or above that counts as fixed too.
 */
export function runcVerdict(version: string | null): Check {
  const name = "runc (CVE-2024-21626)";
  if (!version) return { name, status: "warn", detail: "the engine does not report runc's version", hint: "check `runc --version` is 1.1.12 or later" };
  const m = /^v?(\d+)\.(\d+)\.(\d+)/.exec(version);
  if (!m) return { name, status: "warn", detail: `unrecognised runc version ${version}`, hint: "check runc is 1.1.12 or later" };
  const [maj, min, pat] = [Number(m[1]), Number(m[2]), Number(m[3])];
  const upstreamFixed = maj > 1 || (maj === 1 && (min > 1 || (min === 1 && pat >= 12)));
  const deb = /\+deb12u(\d+)/.exec(version);
  const debianFixed = maj === 1 && min === 1 && pat === 5 && deb !== null && Number(deb[1]) >= 1;
  if (upstreamFixed || debianFixed) {
    return { name, status: "ok", detail: `runc ${version}${debianFixed ? " (Debian's backported fix)" : ""}` };
  }
  return {
    name,
    status: "fail",
    detail: `runc ${version} lets a container escape to the host filesystem (CVE-2024-21626)`,
    hint: "upgrade runc to 1.1.12 or later (on Debian bookworm: apt-get install --only-upgrade runc)",
  };
}

export function engineChecks(facts: EngineFacts): Check[] {
  const checks: Check[] = [{ name: "docker engine", status: "ok", detail: `engine ${facts.version}, API ${facts.apiVersion}` }];
  checks.push(runcVerdict(facts.runc));
  checks.push({
    name: "cgroups",
    status: facts.cgroupVersion ? "ok" : "warn",
    detail: `cgroup v${facts.cgroupVersion ?? "?"} (${facts.cgroupDriver ?? "unknown driver"})`,
    ...(facts.cgroupVersion ? {} : { hint: "the engine did not say which cgroup version it uses; memory and pid limits may not apply" }),
  });
  const seccomp = facts.securityOptions.some((o) => o.includes("name=seccomp"));
  checks.push(
    seccomp
      ? { name: "seccomp", status: "ok", detail: facts.securityOptions.filter((o) => o.includes("seccomp")).join(", ") }
      : {
          name: "seccomp",
          status: "fail",
          detail: "the engine runs containers without a seccomp filter",
          hint: "use an engine built with seccomp (Debian's docker.io is) and do not set seccomp=unconfined",
        },
  );
  const apparmor = facts.securityOptions.some((o) => o.includes("name=apparmor"));
  checks.push({
    name: "apparmor",
    status: apparmor ? "ok" : "warn",
    detail: apparmor ? "containers get the engine's AppArmor profile" : "no AppArmor profile (the sandbox relies on capabilities, seccomp and no-new-privileges)",
    ...(apparmor ? {} : { hint: "optional: enable AppArmor on the host for one more layer" }),
  });
  return checks;
}

async function onPath(program: string): Promise<string | null> {
  for (const dir of (process.env.PATH ?? "").split(":").filter(Boolean)) {
    const p = path.join(dir, program);
    try {
      await access(p, fsc.X_OK);
      return p;
    } catch {
      /* next */
    }
  }
  return null;
}

async function modeCheck(name: string, file: string, want: number, missingOk: string): Promise<Check> {
  try {
    const s = await stat(file);
    const mode = s.mode & 0o777;
    const uid = process.getuid?.() ?? 0;
    if (s.uid !== uid) {
      return { name, status: "fail", detail: `${file} is owned by uid ${s.uid}, not the daemon's user (${uid})`, hint: `chown it to the user that runs sandboxd` };
    }
    if ((mode & ~want) !== 0) {
      return {
        name,
        status: "fail",
        detail: `${file} has mode ${mode.toString(8).padStart(4, "0")}; others could reach it`,
        hint: `chmod ${want.toString(8)} ${file}`,
      };
    }
    return { name, status: "ok", detail: `${file} (${mode.toString(8).padStart(4, "0")})` };
  } catch {
    return { name, status: "ok", detail: missingOk };
  }
}

export async function hostChecks(input: DoctorInput): Promise<Check[]> {
  const checks: Check[] = [];
  if ("error" in input.engine) {
    checks.push({
      name: "docker engine",
      status: "fail",
      detail: `cannot reach the Docker engine: ${input.engine.error}`,
      hint: "start it (`npm start` does so on Debian as root) or set DOCKER_HOST",
    });
  } else {
    checks.push(...engineChecks(input.engine));
  }
  if (input.imagePresent !== null) {
    checks.push(
      input.imagePresent
        ? { name: "sandbox image", status: "ok", detail: input.image }
        : { name: "sandbox image", status: "fail", detail: `${input.image} is not in the engine`, hint: "run `sandboxd image build` (or `npm start`, which builds it)" },
    );
  }
  const major = Number(/^v?(\d+)/.exec(input.nodeVersion)?.[1] ?? 0);
  checks.push(
    major >= 20
      ? { name: "node", status: "ok", detail: input.nodeVersion }
      : { name: "node", status: "fail", detail: `node ${input.nodeVersion} is too old`, hint: "use Node 20.19 or later" },
  );
  checks.push(
    input.isRoot
      ? { name: "privileges", status: "ok", detail: "running as root: network confinement is recorded, phases can use the workspace layer" }
      : {
          name: "privileges",
          status: "warn",
          detail: "not root: refused connections inside a sandbox go unrecorded",
          hint: "run the daemon as root next to the engine for the full audit trail",
        },
  );
  for (const [program, why] of [
    ["conntrack", "records connections refused inside a sandbox"],
    ["nsenter", "enters a phase's namespaces to confine its network"],
    ["iptables-restore", "installs a phase's NAT rule"],
    ["ip", "installs a phase's routing rule"],
  ] as const) {
    const found = await onPath(program);
    checks.push(
      found
        ? { name: program, status: "ok", detail: found }
        : { name: program, status: "warn", detail: `not on PATH: the daemon uses it to ${why}`, hint: "install it (ensure-docker.sh installs conntrack, iproute2 and iptables on Debian)" },
    );
  }
  const filesystems = await readFile("/proc/filesystems", "utf8").catch(() => "");
  checks.push(
    /\toverlay$/m.test(filesystems)
      ? { name: "overlayfs", status: "ok", detail: "the kernel supports overlay mounts" }
      : { name: "overlayfs", status: "warn", detail: "the kernel does not list overlay in /proc/filesystems", hint: "modprobe overlay" },
  );
  checks.push(await modeCheck("state dir", input.stateDir, 0o700, `${input.stateDir} does not exist yet (created 0700 at start)`));
  checks.push(await modeCheck("socket", input.socket, 0o600, `${input.socket}: no daemon is serving it`));
  checks.push(await diskCheck(input.stateDir));
  checks.push(await nativeExecCheck());
  checks.push(dynmodsCheck(await favorDynmods(false)));
  return checks;
}

/** Whether a command's cgroup move waits a kernel grace period after an idle moment (src/util/dynmods.ts). */
export function dynmodsCheck(o: DynmodsOutcome): Check {
  const name = "cgroup moves";
  switch (o.state) {
    case "on":
    case "turned-on":
      return { name, status: "ok", detail: `${DYNMODS_OPTION} is on for ${o.root}: a command's cgroup move never waits a grace period` };
    case "not-used":
      return { name, status: "ok", detail: o.root ? `${o.root} hands out controllers: commands get no cgroup of their own here, nothing moves` : "no cgroup v2 mount: commands get no cgroup of their own here, nothing moves" };
    case "off":
      return {
        name,
        status: "warn",
        detail: `${DYNMODS_OPTION} is off for ${o.root}: a command after an idle moment waits a kernel grace period (about 12 ms here) for its cgroup`,
        hint: `the daemon turns it on at start unless SANDBOXD_CGROUP_FAVORDYNMODS=0; by hand, as root: mount -o remount,${DYNMODS_OPTION} ${o.root}`,
      };
    case "failed":
      return { name, status: "warn", detail: `cannot tell whether ${DYNMODS_OPTION} is on: ${o.error}` };
  }
}

/** `exec`'s native client (scripts/build-native.mjs), beside this module's dist/cli: without it every `sandboxd exec` starts Node. */
async function nativeExecCheck(): Promise<Check> {
  const file = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "native", "sandboxd-exec");
  try {
    await access(file, fsc.X_OK);
  } catch {
    return {
      name: "exec client",
      status: "warn",
      detail: `${path.normalize(file)} is not built: every \`sandboxd exec\` starts Node (about 50 ms against 15)`,
      hint: "install a Rust toolchain (cargo on the PATH) and run `npm run build`",
    };
  }
  if (process.env.SANDBOXD_CLI_NODE === "1") {
    return { name: "exec client", status: "ok", detail: `${path.normalize(file)}, but SANDBOXD_CLI_NODE=1 here runs \`sandboxd exec\` on Node` };
  }
  return { name: "exec client", status: "ok", detail: `${path.normalize(file)}: the plain form of \`sandboxd exec\` runs without Node` };
}

async function diskCheck(stateDir: string): Promise<Check> {
  // the state dir may not exist yet: look at the nearest existing parent
  let dir = stateDir;
  for (;;) {
    try {
      await stat(dir);
      break;
    } catch {
      const up = path.dirname(dir);
      if (up === dir) break;
      dir = up;
    }
  }
  try {
    const s = await statfs(dir);
    const free = s.bavail * s.bsize;
    const gib = free / 2 ** 30;
    const detail = `${gib.toFixed(1)} GiB free under ${dir}`;
    if (gib < 1) return { name: "disk", status: "fail", detail, hint: "free space: the audit journal refuses all work when it cannot write" };
    if (gib < 5) return { name: "disk", status: "warn", detail, hint: "each phase may use up to its disk budget; keep several GiB free" };
    return { name: "disk", status: "ok", detail };
  } catch (err) {
    return { name: "disk", status: "warn", detail: `cannot read free space: ${(err as Error).message}` };
  }
}

export function formatChecks(checks: Check[]): string {
  const width = Math.max(...checks.map((c) => c.name.length));
  const word: Record<CheckStatus, string> = { ok: "ok  ", warn: "warn", fail: "FAIL" };
  return (
    checks
      .map((c) => `${word[c.status]}  ${c.name.padEnd(width)}  ${c.detail}${c.hint && c.status !== "ok" ? `\n      ${" ".repeat(width)}  hint: ${c.hint}` : ""}`)
      .join("\n") + "\n"
  );
}
