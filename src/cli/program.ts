/**
 * The sandboxd command line: the daemon (`start`) and its operator client,
 * every command as commander declares it (main.ts runs the common form of
 * `exec` without loading this).
 *
 * Exit codes: 0 success; 1 an error sandboxd reported (code and hint on
 * stderr); 2 bad usage. `exec` exits with the command's own code, 124 when
 * the command was killed at its timeout, 126 when policy or the shell parser
 * refused it (a timeout over the mode's limit asks a person), 2 when the request
 * can never be valid (a timeout over 300 s), 125 when sandboxd itself failed, 128+N when the command died
 * of signal N, 141 when the reader of its output went away.
 */
import { Argument, Command, Option, InvalidArgumentError } from "commander";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { SandboxdError } from "../errors.js";
import { clientSocket } from "../config/paths.js";
import type { ExecResult, JobOutput, JobView, PoolStatus, RunInfo } from "../phases/manager.js";
import type { Escalation, PhaseView } from "../phases/types.js";
import type { Grant } from "../approvals/grants.js";
import type { Approval } from "../approvals/queue.js";
import { escapeControl, quoteArgv } from "../audit/format.js";
import type { AuditRecord } from "../audit/journal.js";
import { VERSION } from "../version.js";
import { ApiClient } from "./client.js";
import { DEFAULT_WAIT_APPROVAL_MS, printError, runExec, visible } from "./exec.js";
import { EXIT, exitCodeFor } from "./exit-codes.js";
import { renderRecord } from "./render.js";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");

class CliExit extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
  }
}

function client(cmd: Command): ApiClient {
  const opts = cmd.optsWithGlobals<{ socket?: string }>();
  return new ApiClient(clientSocket(opts.socket));
}

function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + "\n");
}

function age(iso: string): string {
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

/**
 * Every human-facing listing goes through here: each cell is escaped
 * (src/audit/format.ts escapeControl: controls, ANSI escapes, bidi overrides,
 * separators), so a value from the sandbox cannot move the cursor, rewrite
 * what was printed or reorder the line. `--json` prints the values exactly.
 */
function table(input: string[][]): string {
  const rows = input.map((r) => r.map(escapeControl));
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? "").length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join("  ")).join("\n") + "\n";
}

/** The .env names a phase's commands do not get, each with why: said at start, never silently. */
function envDroppedText(dropped: ReadonlyArray<{ name: string; why: string }>): string {
  const lines = dropped.map((d) => `  ${visible(d.name)}: ${d.why}\n`);
  return `sandboxd: the project's .env sets ${dropped.length} name(s) its commands do not get (src/policy/env.ts; set them in code or ask the operator):\n${lines.join("")}`;
}

/** `sandboxd ps`'s last line: the warm pool's state, what is ready, and how often a start found a container there. */
export function poolLine(p: PoolStatus): string {
  if (p.state === "off") return "pool: off (SANDBOXD_POOL_SIZE=0): every phase starts cold";
  const rate = p.hitRate === null ? "no starts yet" : `hit rate ${Math.round(p.hitRate * 100)}% (${p.hits} of ${p.hits + p.misses} starts)`;
  const ready = `${p.ready} ready of ${p.size * p.keys}${p.filling ? `, ${p.filling} filling` : ""}`;
  if (p.state === "stopped") return `pool: STOPPED after ${p.failures} failed fills in a row (last: ${p.lastError ?? "?"}); ${ready}; ${rate}; restart the daemon once fixed`;
  return `pool: ${p.state}, ${ready}; ${rate}`;
}

function printPhase(p: PhaseView): void {
  const lines = [
    ["id", p.id],
    ["phase", p.name],
    ["mode", p.mode],
    ["state", p.state],
    ["project", p.project],
    ["runs as", `${p.uid}:${p.gid}`],
    ["container", p.containerName],
    ["created", p.createdAt],
    ...(p.stoppedAt ? [["stopped", p.stoppedAt]] : []),
    ...(p.endReason ? [["end reason", p.endReason]] : []),
    ...(p.envDropped?.length ? [[".env not given", p.envDropped.map((d) => d.name).join(", ")]] : []),
    ...(p.workspace
      ? [["iterations", `${p.workspace.accepted} accepted, ${p.workspace.rejected} refused, ${p.workspace.pending} pending`]]
      : []),
  ];
  process.stdout.write(table(lines.map(([k, v]) => [`${k}:`, v ?? ""])));
  for (const it of (p.workspace?.iterations ?? []) as IterationView[]) {
    process.stdout.write(`  #${it.n} ${it.state.padEnd(8)} ${it.at} ${it.message}\n`);
    for (const c of it.changes) if (!c.isDir) process.stdout.write(`      ${changeLine(c)}\n`);
    for (const f of it.failures) process.stdout.write(`      ! ${f.rule}: ${f.message.split("\n").join("\n        ")}\n`);
  }
}

interface ChangeView {
  kind: string;
  path: string;
  from?: string;
  isDir: boolean;
  sizeBytes: number;
  modeOnly?: boolean;
}
interface IterationView {
  n: number;
  state: string;
  at: string;
  message: string;
  changes: ChangeView[];
  failures: Array<{ rule: string; message: string }>;
}

function changeLine(c: ChangeView): string {
  const what = c.kind === "rename" ? `${c.from} -> ${c.path}` : c.path;
  return `${c.kind.toUpperCase().padEnd(6)} ${what}${c.isDir ? "/" : ""}${c.kind === "delete" || c.isDir ? "" : ` (${c.sizeBytes} bytes${c.modeOnly ? ", mode only" : ""})`}`;
}

/** argv quoted (invisible characters as $'…' escapes), or the command string as given; escaped again by table() */
function approvalCommand(a: Approval): string {
  if (a.workspace) return `iteration ${a.workspace.iteration}: ${a.workspace.paths.join(", ")}`;
  return a.argv ? quoteArgv(a.argv) : a.sql !== null && a.sql !== undefined ? `SQL: ${a.sql}` : (a.command ?? "");
}

function printApproval(a: Approval): void {
  const lines: Array<[string, string]> = [
    ["id", a.id],
    ["phase", a.phaseId],
    ["state", a.state],
    ["command", approvalCommand(a)],
    ...(a.argv ? [["argv", JSON.stringify(a.argv)] as [string, string]] : []),
    ...(a.timeoutMs ? [["timeout", `${a.timeoutMs / 1000} s (over the mode's limit)`] as [string, string]] : []),
    ["rule", `${a.ruleId} (${a.clause})`],
    ["policy says", a.policyReason],
    ["agent's reason", a.requestReason ?? "-"],
    ...(a.laterReasons ?? []).map((r): [string, string] => ["later reason", `${r.at} ${r.reason}`]),
    ...(a.files ?? []).map((f): [string, string] => ["runs file", `${quoteArgv([f.path])} ${f.sha256 ? `sha256:${f.sha256}` : `(${f.note ?? "not bound"})`}`]),
    ["retries", String(a.retries ?? 0)],
    ["requested", a.requestedAt],
    ...(a.decidedAt ? [["decided", a.decidedAt] as [string, string]] : []),
    ...(a.note ? [["note", a.note] as [string, string]] : []),
    ...(a.usedAt ? [[a.state === "stale" ? "refused (files changed)" : "used", a.usedAt] as [string, string]] : []),
  ];
  process.stdout.write(table(lines.map(([k, v]) => [`${k}:`, v])));
}

function parseTimeout(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError("give the timeout in seconds, a positive number (e.g. 30 or 0.5)");
  return Math.round(n * 1000);
}

/** A duration: 90s, 30m, 2h, 7d. */
function parseDuration(value: string): number {
  const m = /^(\d+(?:\.\d+)?)(s|m|h|d)$/.exec(value.trim());
  if (!m) throw new InvalidArgumentError("give a duration such as 30m, 2h or 7d");
  return Math.round(Number(m[1]) * { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2] as "s" | "m" | "h" | "d"]);
}

/** A command or pattern given as one option: a JSON array, or words split at blanks. */
/** `--env NAME=VALUE`, repeatable. */
function collectEnv(value: string, acc: Record<string, string>): Record<string, string> {
  const eq = value.indexOf("=");
  if (eq <= 0) throw new InvalidArgumentError("give the variable as NAME=VALUE");
  return { ...acc, [value.slice(0, eq)]: value.slice(eq + 1) };
}

async function readAll(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(typeof c === "string" ? Buffer.from(c) : (c as Buffer));
  return Buffer.concat(chunks);
}

/** A job's exit as a word: its code, its signal, or what it is still doing. */
function jobExit(j: JobView): string {
  if (!j.result) return j.state === "running" ? "-" : "error";
  return j.result.exitCode !== null ? String(j.result.exitCode) : (j.result.signal ?? "?");
}

function words(value: string): string[] {
  const t = value.trim();
  if (t.startsWith("[")) return JSON.parse(t) as string[];
  return t.split(/\s+/).filter(Boolean);
}

function parseWait(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0 || n > 3600) throw new InvalidArgumentError("give the wait in seconds, a positive number up to 3600 (e.g. --wait-approval=300)");
  return Math.round(n * 1000);
}

function program(): Command {
  const prog = new Command("sandboxd")
    .description("Run autonomous coding agents' phases in disposable, policy-mediated Docker sandboxes.")
    .version(VERSION)
    .addOption(new Option("--socket <path>", "daemon socket (default: $SANDBOXD_SOCKET, /run/sandboxd/sandboxd.sock as root)"))
    .showHelpAfterError("(run with --help for usage)")
    .configureOutput({ outputError: (str, write) => write(`sandboxd: ${str.replace(/^error: /, "")}`) })
    .exitOverride();

  prog
    .command("start")
    .description("run the daemon in the foreground (SIGTERM or Ctrl-C stops it and its phases)")
    .option("--state-dir <dir>", "where phase records and audit logs live (default: $SANDBOXD_STATE_DIR, /var/lib/sandboxd as root)")
    .option("--policy <file>", "the policy every phase runs under (default: $SANDBOXD_POLICY, policies/default.yaml); SIGHUP re-reads it")
    .option("--console <host:port>", "also serve the operator console (web page + API) on this loopback address, e.g. 127.0.0.1:8470; prints a one-time login URL (default: $SANDBOXD_CONSOLE, off)")
    .option("--audit-key <file>", "the ed25519 key that signs audit anchors, outside the state dir; created on first start (default: $SANDBOXD_AUDIT_KEY, /etc/sandboxd/audit-signing.key as root)")
    .action(async (opts: { stateDir?: string; policy?: string; console?: string; auditKey?: string }, cmd: Command) => {
      const { startDaemon } = await import("../daemon.js");
      const { resolveSettings } = await import("../config/settings.js");
      const settings = resolveSettings({
        socket: cmd.optsWithGlobals<{ socket?: string }>().socket,
        stateDir: opts.stateDir,
        policy: opts.policy,
        console: opts.console,
        auditKey: opts.auditKey,
      });
      // The signals are taken before the daemon starts serving: a SIGTERM that
      // arrives while it starts (the socket may already answer) stops it once
      // started, never kills it mid-way with phases half made.
      let signalled: string | null = null;
      let onSignal: (sig: string) => void = (sig) => (signalled ??= sig);
      process.once("SIGTERM", () => onSignal("SIGTERM"));
      process.once("SIGINT", () => onSignal("SIGINT"));
      const daemon = await startDaemon(settings);
      process.on("SIGHUP", () => void daemon.reload());
      await new Promise<void>((resolve) => {
        let stopping = false;
        const stop = (sig: string) => {
          if (stopping) return;
          stopping = true;
          daemon.log.info({ signal: sig }, "signal received");
          daemon.close().then(resolve, (e: Error) => {
            daemon.log.error({ err: e.message }, "shutdown failed");
            resolve();
          });
        };
        onSignal = stop;
        if (signalled) stop(signalled);
        // stopped over the API (`sandboxd stop`): the process ends too
        void daemon.closed.then(resolve);
      });
      // Closed: the journal is shut and the socket gone. A detached phase's
      // handles (kept for the next daemon) must not keep this process alive.
      process.exit(0);
    });

  prog
    .command("stop")
    .description("stop the daemon: its phases are stopped, or with --keep-phases left running for the next daemon to re-adopt (a planned restart)")
    .option("--keep-phases", "a planned restart: running commands get --drain seconds, then are cancelled (recorded); running phases keep their containers and are re-adopted by the next `sandboxd start`")
    .option("--drain <seconds>", "with --keep-phases: how long running commands may take to end before they are cancelled (default 10, at most 300)", parseTimeout)
    .option("--json", "print the answer as JSON")
    .action(async (opts: { keepPhases?: boolean; drain?: number; json?: boolean }, cmd: Command) => {
      const api = client(cmd);
      const body = { ...(opts.keepPhases ? { keepPhases: true } : {}), ...(opts.drain !== undefined ? { drainMs: opts.drain } : {}) };
      const res = await api.request<{ stopping: boolean; keepPhases: boolean; phases: string[] }>("POST", "/v1/daemon/stop", body);
      if (opts.json) return printJson(res);
      const n = res.phases.length;
      process.stdout.write(
        res.keepPhases
          ? `daemon stopping; ${n} phase${n === 1 ? "" : "s"} left running for the next daemon${n ? `: ${res.phases.join(" ")}` : ""}\n`
          : `daemon stopping; ${n} phase${n === 1 ? "" : "s"} stopped\n`,
      );
    });

  prog
    .command("doctor")
    .description("check the host: engine and runc versions, cgroups, seccomp/AppArmor, the sandbox image, socket and state-dir permissions, conntrack, disk")
    .option("--state-dir <dir>", "the state dir to check (default: $SANDBOXD_STATE_DIR, /var/lib/sandboxd as root)")
    .option("--json", "print the checks as JSON")
    .action(async (opts: { stateDir?: string; json?: boolean }, cmd: Command) => {
      const { default: Docker } = await import("dockerode");
      const doctor = await import("./doctor.js");
      const { resolveSettings } = await import("../config/settings.js");
      const settings = resolveSettings({ socket: cmd.optsWithGlobals<{ socket?: string }>().socket, stateDir: opts.stateDir });
      const docker = new Docker();
      let engine: import("./doctor.js").DoctorInput["engine"];
      let imagePresent: boolean | null = null;
      try {
        const [version, info] = await Promise.all([docker.version(), docker.info() as Promise<Record<string, unknown>>]);
        const components = (version as { Components?: Array<{ Name: string; Version: string; Details?: { GitCommit?: string } }> }).Components ?? [];
        const runc = components.find((c) => c.Name.toLowerCase() === "runc");
        engine = {
          version: version.Version,
          apiVersion: version.ApiVersion,
          // Debian's packages carry their revision (which names a backported fix) only in the commit field
          runc: runc ? `${runc.Version}${runc.Details?.GitCommit && runc.Details.GitCommit !== runc.Version ? ` (commit ${runc.Details.GitCommit})` : ""}` : null,
          cgroupVersion: typeof info.CgroupVersion === "string" ? info.CgroupVersion : null,
          cgroupDriver: typeof info.CgroupDriver === "string" ? info.CgroupDriver : null,
          securityOptions: Array.isArray(info.SecurityOptions) ? (info.SecurityOptions as string[]) : [],
        };
        imagePresent = await docker
          .getImage(settings.image)
          .inspect()
          .then(
            () => true,
            () => false,
          );
      } catch (err) {
        engine = { error: (err as Error).message };
      }
      const checks = await doctor.hostChecks({
        engine,
        imagePresent,
        image: settings.image,
        stateDir: settings.stateDir,
        socket: settings.socket,
        isRoot: process.getuid?.() === 0,
        nodeVersion: process.version,
      });
      if (opts.json) printJson({ checks, ok: checks.every((c) => c.status !== "fail") });
      else process.stdout.write(doctor.formatChecks(checks));
      if (checks.some((c) => c.status === "fail")) throw new CliExit(EXIT.error);
    });

  const image = prog.command("image").description("manage the sandbox image");
  image
    .command("build")
    .description("build the sandbox image from sandbox/Dockerfile (creates an offline Debian base first when no registry is reachable)")
    .option("--tag <ref>", "image reference", process.env.SANDBOXD_IMAGE || "sandboxd-sandbox:latest")
    .option("--base <ref>", "base image (default debian:bookworm-slim, or the offline base when it cannot be pulled)")
    .option("--force", "rebuild even when the image is current")
    .option("--no-cache", "do not use the build cache")
    .option("--json", "print the result as JSON (progress still goes to stderr)")
    .action(async (opts: { tag: string; base?: string; force?: boolean; cache: boolean; json?: boolean }) => {
      const { default: Docker } = await import("dockerode");
      const img = await import("../runtime/image.js");
      const docker = new Docker();
      const log = (line: string) => process.stderr.write(line.endsWith("\n") ? line : line + "\n");
      const common = {
        tag: opts.tag,
        dockerfileDir: path.join(ROOT, "sandbox"),
        shimBundlePath: path.join(ROOT, "dist", "shim", "shim.cjs"),
        log,
      };
      if (opts.base || !opts.cache) {
        const base = await img.ensureBaseImage(docker, { base: opts.base ?? img.DEFAULT_BASE_IMAGE, log });
        const r = await img.buildSandboxImage(docker, { ...common, base, noCache: !opts.cache });
        if (opts.json) printJson({ tag: opts.tag, ...r });
        else process.stdout.write(`${opts.tag} built (image ${r.imageId.replace(/^sha256:/, "").slice(0, 12)})\n`);
      } else {
        const r = await img.ensureSandboxImage(docker, { ...common, force: opts.force ?? false });
        if (opts.json) printJson(r);
        else {
          const what = r.built ? (r.cached ? "rebuilt from the layer cache" : "built") : "already current: nothing to do (--force rebuilds)";
          process.stdout.write(`${r.tag} ${what} (image ${r.imageId.replace(/^sha256:/, "").slice(0, 12)}, base ${r.base})\n`);
        }
      }
    });

  const phase = prog.command("phase").description("start, inspect and stop phases");
  phase
    .command("start")
    .description("start a phase: a fresh sandbox container with a view of the project at /workspace (changes reach the project at accepted checkpoints)")
    .argument("<project>", "the project directory")
    .requiredOption("--phase <name>", "the phase's name from the implementation plan, e.g. 2.3")
    .addOption(new Option("--mode <mode>", "backtest, paper or test").choices(["backtest", "paper", "test"]).makeOptionMandatory())
    .option("--policy <file>", "a stricter policy file for this phase (it can only narrow the daemon's policy)")
    .addOption(new Option("--allow <path>", "a protected path this phase may change (SKILLS.md Phase specification)").choices(["main.py"]))
    .option("--json", "print the phase record as JSON")
    .action(async (project: string, opts: { phase: string; mode: string; policy?: string; allow?: string; json?: boolean }, cmd: Command) => {
      const { phase: p } = await client(cmd).request<{ phase: PhaseView }>("POST", "/v1/phases", {
        project: path.resolve(project),
        phase: opts.phase,
        mode: opts.mode,
        ...(opts.policy ? { policy: path.resolve(opts.policy) } : {}),
        ...(opts.allow ? { allow: [opts.allow] } : {}),
      });
      if (opts.json) printJson(p);
      else process.stdout.write(p.id + "\n");
      // stderr: stdout stays the id alone for scripts
      if (p.envDropped?.length) process.stderr.write(envDroppedText(p.envDropped));
    });
  phase
    .command("show")
    .description("show one phase")
    .argument("<id>", "phase id (ph_…) or the phase's name (e.g. 2.3) when one phase has it")
    .option("--json", "print JSON")
    .action(async (ref: string, opts: { json?: boolean }, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref);
      const { phase: p } = await api.request<{ phase: PhaseView }>("GET", `/v1/phases/${encodeURIComponent(id)}`);
      if (opts.json) printJson(p);
      else printPhase(p);
    });
  phase
    .command("stop")
    .description("stop a phase: end its commands, remove its container, keep its logs and audit trail")
    .argument("<id>", "phase id (ph_…) or the name of one running phase")
    .option("--json", "print the final phase record as JSON")
    .action(async (ref: string, opts: { json?: boolean }, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref, { runningOnly: true });
      const { phase: p } = await api.request<{ phase: PhaseView }>("DELETE", `/v1/phases/${encodeURIComponent(id)}`);
      const { report, text } = await api.request<{ report: unknown; text: string }>("GET", `/v1/phases/${encodeURIComponent(id)}/report`);
      if (opts.json) printJson({ ...p, report });
      else process.stdout.write(`${p.id} ${p.state}\n${visible(text.split("\n").slice(1).join("\n"))}\n`);
    });
  // a person's hand: SKILLS.md Fail-Fast "Await manual intervention"
  for (const [verb, what] of [
    ["pause", "freeze a phase (docker pause); every call on it answers 423 until `phase resume`"],
    ["resume", "let an escalated or paused phase go on (after an escalation --note is required; its fail-fast counters reset)"],
    ["abort", "end an escalated, paused or running phase as failed; its reports are kept"],
  ] as const) {
    phase
      .command(verb)
      .description(what)
      .argument("<id>", "phase id (ph_…) or the phase's name")
      .option("--note <text>", "what the person decided and why (recorded in the audit trail)")
      .option("--json", "print the phase record as JSON")
      .action(async (ref: string, opts: { note?: string; json?: boolean }, cmd: Command) => {
        const api = client(cmd);
        const id = await resolvePhaseRef(api, ref);
        const { phase: p } = await api.request<{ phase: PhaseView }>("POST", `/v1/phases/${encodeURIComponent(id)}/${verb}`, opts.note ? { note: opts.note } : {});
        if (opts.json) return printJson(p);
        process.stdout.write(`${p.id} ${p.state}\n`);
        if (verb === "abort") {
          const { text } = await api.request<{ text: string }>("GET", `/v1/phases/${encodeURIComponent(id)}/report`);
          process.stdout.write(visible(text.split("\n").slice(1).join("\n")) + "\n");
        }
      });
  }

  const escalations = prog.command("escalations").description("fail-fast escalations: phases stopped for a person (SKILLS.md Human Escalation Log)");
  escalations
    .command("ls")
    .description("list open escalations (--all: every escalation, with how it ended)")
    .option("-a, --all", "include resolved escalations")
    .option("--json", "print JSON")
    .action(async (opts: { all?: boolean; json?: boolean }, cmd: Command) => {
      const { escalations: list } = await client(cmd).request<{ escalations: Array<Escalation & { phase: string; name: string; state: string }> }>(
        "GET",
        `/v1/escalations${opts.all ? "?all=1" : ""}`,
      );
      if (opts.json) return printJson(list);
      const rows = [["PHASE", "NAME", "#", "CATEGORY", "WHEN", "STATUS", "REPORT"]];
      for (const e of list) rows.push([e.phase, e.name, String(e.n), e.category, e.at, e.resolved ? `${e.resolved.how}${e.resolved.note ? `: ${e.resolved.note}` : ""}` : "open", e.report]);
      process.stdout.write(visible(table(rows)));
    });
  escalations
    .command("show")
    .description("print a phase's last escalation report")
    .argument("<id>", "phase id (ph_…) or the phase's name")
    .option("--json", "print JSON")
    .action(async (ref: string, opts: { json?: boolean }, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref);
      const r = await api.request<{ escalation: Escalation; text: string | null }>("GET", `/v1/phases/${encodeURIComponent(id)}/escalation`);
      if (opts.json) return printJson(r);
      process.stdout.write(visible(r.text ?? `(report ${r.escalation.report} is missing)`) + "\n");
    });

  prog
    .command("report")
    .description("a phase's report (SKILLS.md build loop step 7): files, tests, validation, attempts, escalations, approvals")
    .argument("<id>", "phase id (ph_…) or the phase's name")
    .option("--json", "print JSON")
    .action(async (ref: string, opts: { json?: boolean }, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref);
      const { report, text } = await api.request<{ report: unknown; text: string }>("GET", `/v1/phases/${encodeURIComponent(id)}/report`);
      if (opts.json) return printJson(report);
      process.stdout.write(visible(text) + "\n");
    });

  prog
    .command("events")
    .description("follow the daemon's events as NDJSON: phase states, failure categories, escalations, approvals, iterations")
    .option("--since <seq>", "only events after this audit sequence number (resume where you left off)", (v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError("give a whole number ≥ 0");
      return n;
    })
    .option("--phase <id>", "only this phase's events")
    .option("--no-follow", "print the events so far and exit")
    .action(async (opts: { since?: number; phase?: string; follow: boolean }, cmd: Command) => {
      const q = new URLSearchParams();
      if (opts.since !== undefined) q.set("since", String(opts.since));
      if (opts.phase) q.set("phase", opts.phase);
      if (!opts.follow) q.set("follow", "0");
      const res = await client(cmd).stream("GET", `/v1/events?${q.toString()}`);
      for await (const chunk of res) process.stdout.write(chunk as Buffer);
    });

  prog
    .command("checkpoint")
    .description("end the phase's current iteration: its changes are judged, then applied to the project or discarded")
    .argument("<id>", "the phase")
    .requiredOption("-m, --message <text>", "what the iteration did (recorded as `Modified [file]: [message]`)")
    .option("--json", "print the iteration as JSON")
    .action(async (id: string, opts: { message: string; json?: boolean }, cmd: Command) => {
      const r = await client(cmd).request<{ iteration: IterationView | null }>("POST", `/v1/phases/${encodeURIComponent(id)}/checkpoint`, { message: opts.message });
      if (opts.json) printJson(r);
      else if (!r.iteration) process.stdout.write("nothing changed since the last checkpoint\n");
      else {
        const it = r.iteration;
        process.stdout.write(`iteration ${it.n} ${it.state}\n`);
        for (const c of it.changes) if (!c.isDir) process.stdout.write(`  ${changeLine(c)}\n`);
        for (const f of it.failures) process.stderr.write(`  ${f.rule}: ${f.message}\n`);
      }
      if (r.iteration && r.iteration.state !== "accepted") throw new CliExit(EXIT.policy);
    });

  prog
    .command("files")
    .description("the files a phase changed since its last checkpoint (what the next checkpoint judges)")
    .argument("<id>", "the phase")
    .option("--json", "print JSON")
    .action(async (id: string, opts: { json?: boolean }, cmd: Command) => {
      const { changes } = await client(cmd).request<{ changes: ChangeView[] }>("GET", `/v1/phases/${encodeURIComponent(id)}/files`);
      if (opts.json) return printJson(changes);
      for (const c of changes) if (!c.isDir || c.kind === "create") process.stdout.write(changeLine(c) + "\n");
    });

  prog
    .command("diff")
    .description("the phase's pending iteration as a unified diff (--all: everything the phase changed since it started)")
    .argument("<id>", "the phase")
    .option("--all", "the whole phase: accepted iterations and the pending one, from the project as the phase found it")
    .action(async (id: string, opts: { all?: boolean }, cmd: Command) => {
      const { diff } = await client(cmd).request<{ diff: string }>("GET", `/v1/phases/${encodeURIComponent(id)}/diff${opts.all ? "?all=1" : ""}`);
      process.stdout.write(diff);
    });

  prog
    .command("cat")
    .description("print a file as the phase sees it (its view: the project with the phase's changes)")
    .argument("<id>", "the phase")
    .argument("<path>", "project-relative path")
    .action(async (id: string, rel: string, _opts: unknown, cmd: Command) => {
      const res = await client(cmd).stream("GET", `/v1/phases/${encodeURIComponent(id)}/files/${filePath(rel)}`);
      for await (const chunk of res) process.stdout.write(chunk as Buffer);
    });

  prog
    .command("put")
    .description("write a file into the phase's view through the daemon: atomic, size-checked, Python compiled before it lands; the next checkpoint judges it")
    .argument("<id>", "the phase")
    .argument("<path>", "project-relative path")
    .argument("[file]", "where the bytes come from (default: standard input)")
    .option("--mode <octal>", "permission bits of a new file, e.g. 0755 (an existing file keeps its own)")
    .option("--json", "print the answer as JSON")
    .action(async (id: string, rel: string, file: string | undefined, opts: { mode?: string; json?: boolean }, cmd: Command) => {
      const bytes = file && file !== "-" ? await readFile(file) : await readStdin();
      const q = opts.mode ? `?mode=${encodeURIComponent(opts.mode)}` : "";
      const r = await client(cmd).requestBytes<{ file: { path: string; created: boolean; size: number; sha256: string; atCheckpoint: Array<{ rule: string; message: string }> } }>(
        "PUT",
        `/v1/phases/${encodeURIComponent(id)}/files/${filePath(rel)}${q}`,
        bytes,
      );
      if (opts.json) return printJson(r);
      process.stdout.write(`${r.file.created ? "created" : "replaced"} ${escapeControl(r.file.path)} (${r.file.size} bytes)\n`);
      for (const f of r.file.atCheckpoint) process.stderr.write(`  at the checkpoint: ${f.rule}: ${f.message}\n`);
    });

  const iteration = prog.command("iteration").description("decide an iteration the policy left to a human");
  for (const decision of ["accept", "reject"] as const) {
    iteration
      .command(decision)
      .description(decision === "accept" ? "apply the pending iteration to the project" : "discard the pending iteration")
      .argument("<id>", "the phase")
      .argument("<n>", "the iteration's number (`sandboxd phase show`)")
      .option("--note <text>", "why, for the audit trail")
      .action(async (id: string, n: string, opts: { note?: string }, cmd: Command) => {
        const { iteration: it } = await client(cmd).request<{ iteration: IterationView }>(
          "POST",
          `/v1/phases/${encodeURIComponent(id)}/iterations/${encodeURIComponent(n)}/${decision}`,
          opts.note ? { note: opts.note } : {},
        );
        process.stdout.write(`iteration ${it.n} ${it.state}\n`);
      });
  }

  prog
    .command("ps")
    .description("list phases (running ones; --all for every phase on record)")
    .option("-a, --all", "include stopped and failed phases")
    .option("--json", "print JSON")
    .action(async (opts: { all?: boolean; json?: boolean }, cmd: Command) => {
      const { phases, pool } = await client(cmd).request<{ phases: PhaseView[]; pool?: PoolStatus }>("GET", "/v1/phases");
      const shown = opts.all ? phases : phases.filter((p) => !["stopped", "failed"].includes(p.state));
      if (opts.json) return printJson(shown);
      const rows = [["ID", "PHASE", "MODE", "STATE", "AGE", "RUNNING", "PROJECT"]];
      for (const p of shown) rows.push([p.id, p.name, p.mode, p.state, age(p.createdAt), String(p.runningExecs), p.project]);
      process.stdout.write(table(rows));
      // a daemon from before the pool answers without it
      if (pool) process.stdout.write(`${poolLine(pool)}\n`);
    });

  prog
    .command("exec")
    .description("run a command in a phase's sandbox, streaming its output; exits with the command's exit code")
    .argument("<id>", "phase id")
    .argument("[argv...]", "the command and its arguments (put them after --)")
    .option("-c, --command <string>", "a shell command string instead of argv; parsed and judged part by part (anything the parser cannot vouch for is refused)")
    .option("--timeout <seconds>", "kill the command after this many seconds (default 60; over the mode's limit — 60 s, 300 s in paper mode — a person approves it, at most 300)", parseTimeout)
    .option("--reason <text>", "why the command is run (recorded in the audit trail)")
    .option(
      "--wait-approval [seconds]",
      "when the policy asks a person, wait for their decision (default 600 s, at most 3600): approved, the command runs; denied, exit 126 with their note",
      parseWait,
    )
    .option("--cwd <dir>", "start in this directory: relative to the workspace (services/api) or under /workspace")
    .option("-e, --env <NAME=VALUE>", "a variable of the command's own (repeatable; names the daemon sets or reserves are refused)", collectEnv, {})
    .option("-i, --stdin", "send what is piped to sandboxd to the command's stdin (at most 512 KiB)")
    .option("--background", "run as a background job: print its id (jb_…) as soon as it runs and exit 0; see `sandboxd jobs`")
    .option("--json", "do not stream; print the result record as JSON when the command ends")
    .addHelpText(
      "after",
      "\nExit status: the command's own; 124 killed at its timeout; 126 refused by policy or\nthe shell parser; 2 a request that cannot be valid (timeout over 300 s,\nargument too large); 125 sandboxd failed; 128+N the command died of signal N;\n141 the reader of sandboxd's output went away (| head): the command was ended.\n\nExample:\n  sandboxd exec ph_0123456789ab --timeout 30 -- pytest -q tests/",
    )
    .action(async (
      id: string,
      argv: string[],
      opts: { timeout?: number; reason?: string; json?: boolean; command?: string; waitApproval?: number | true; cwd?: string; env: Record<string, string>; stdin?: boolean; background?: boolean },
      cmd: Command,
    ) => {
      if ((argv.length > 0) === (opts.command !== undefined)) {
        cmd.error("give the command either after -- as argv, or as --command \"STRING\" (not both)", { exitCode: EXIT.usage });
      }
      if (opts.stdin && process.stdin.isTTY) {
        cmd.error("--stdin sends what is piped to sandboxd; nothing is piped (stdin is a terminal)", { exitCode: EXIT.usage });
      }
      throw new CliExit(
        await runExec({
          socket: clientSocket(cmd.optsWithGlobals<{ socket?: string }>().socket),
          id,
          ...(opts.command !== undefined ? { command: opts.command } : { argv }),
          ...(opts.timeout ? { timeoutMs: opts.timeout } : {}),
          ...(opts.reason ? { reason: opts.reason } : {}),
          ...(opts.waitApproval ? { waitApprovalMs: opts.waitApproval === true ? DEFAULT_WAIT_APPROVAL_MS : opts.waitApproval } : {}),
          ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
          ...(Object.keys(opts.env).length ? { env: opts.env } : {}),
          ...(opts.stdin ? { stdinBase64: (await readAll(process.stdin)).toString("base64") } : {}),
          ...(opts.background ? { background: true } : {}),
          ...(opts.json ? { json: true } : {}),
        }),
      );
    });

  prog
    .command("execs")
    .description("list a phase's running commands (foreground and background jobs), with the ids `sandboxd cancel` takes")
    .argument("<phase>", "phase id or name")
    .option("--json", "print JSON")
    .action(async (ref: string, opts: { json?: boolean }, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref);
      const { execs } = await api.request<{ execs: RunInfo[] }>("GET", `/v1/phases/${id}/execs`);
      if (opts.json) return printJson(execs);
      if (execs.length === 0) return void process.stdout.write("no running commands\n");
      const rows = [["ID", "PID", "STARTED", "CWD", "COMMAND"]];
      for (const r of execs) rows.push([r.id, String(r.pid ?? "-"), r.startedAt, r.cwd, visible(r.argv ? quoteArgv(r.argv) : (r.command ?? ""))]);
      process.stdout.write(table(rows));
    });

  prog
    .command("cancel")
    .description("cancel a running command by id (SIGTERM, then SIGKILL after the kill grace); its caller gets its result, marked cancelled")
    .argument("<phase>", "phase id or name")
    .argument("<exec>", "command id (ex_… or a job's jb_…), from `sandboxd execs`")
    .option("--note <text>", "why (recorded in the audit trail)")
    .action(async (ref: string, execId: string, opts: { note?: string }, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref);
      const { exec } = await api.request<{ exec: RunInfo }>("POST", `/v1/phases/${id}/execs/${encodeURIComponent(execId)}/cancel`, opts.note ? { note: opts.note } : {});
      process.stdout.write(`${exec.id} cancelled\n`);
    });

  const jobs = prog.command("jobs").description("background jobs: commands started with `exec --background`");
  jobs
    .command("ls")
    .description("list a phase's background jobs, running and ended")
    .argument("<phase>", "phase id or name")
    .option("--json", "print JSON")
    .action(async (ref: string, opts: { json?: boolean }, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref);
      const { jobs: list } = await api.request<{ jobs: JobView[] }>("GET", `/v1/phases/${id}/jobs`);
      if (opts.json) return printJson(list);
      if (list.length === 0) return void process.stdout.write("no background jobs\n");
      const rows = [["ID", "STATE", "EXIT", "STARTED", "COMMAND"]];
      for (const j of list) rows.push([j.id, j.state, jobExit(j), j.startedAt, visible(j.argv ? quoteArgv(j.argv) : (j.command ?? ""))]);
      process.stdout.write(table(rows));
    });
  jobs
    .command("show")
    .description("one job: its state and, once it ended, its result")
    .argument("<phase>", "phase id or name")
    .argument("<job>", "job id (jb_…)")
    .action(async (ref: string, jobId: string, _opts: unknown, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref);
      printJson((await api.request<{ job: JobView }>("GET", `/v1/phases/${id}/jobs/${encodeURIComponent(jobId)}`)).job);
    });
  jobs
    .command("output")
    .description("what a job printed so far (stdout, then stderr to stderr)")
    .argument("<phase>", "phase id or name")
    .argument("<job>", "job id (jb_…)")
    .action(async (ref: string, jobId: string, _opts: unknown, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref);
      const { output } = await api.request<{ output: JobOutput }>("GET", `/v1/phases/${id}/jobs/${encodeURIComponent(jobId)}/output`);
      process.stdout.write(output.stdout);
      process.stderr.write(output.stderr);
    });
  jobs
    .command("wait")
    .description("wait for a job to end; exits with its exit code (as `exec` would), or 124 when --timeout passes first")
    .argument("<phase>", "phase id or name")
    .argument("<job>", "job id (jb_…)")
    .option("--timeout <seconds>", "give up waiting after this long (default 30; at most 3600)", parseTimeout)
    .action(async (ref: string, jobId: string, opts: { timeout?: number }, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref);
      const q = opts.timeout ? `?timeoutMs=${opts.timeout}` : "";
      const { job } = await api.request<{ job: JobView }>("GET", `/v1/phases/${id}/jobs/${encodeURIComponent(jobId)}/wait${q}`);
      if (job.state === "running") {
        process.stderr.write(`sandboxd: ${job.id} still running\n`);
        throw new CliExit(EXIT.timeout);
      }
      if (job.result) throw new CliExit(exitCodeFor(job.result));
      process.stderr.write(visible(`sandboxd: ${job.id} ended without a result: ${job.error?.message ?? "unknown"}`) + "\n");
      throw new CliExit(EXIT.sandboxdFailed);
    });
  jobs
    .command("kill")
    .description("kill a job (SIGTERM, then SIGKILL after the kill grace) and wait for it to end")
    .argument("<phase>", "phase id or name")
    .argument("<job>", "job id (jb_…)")
    .option("--note <text>", "why (recorded in the audit trail)")
    .action(async (ref: string, jobId: string, opts: { note?: string }, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref);
      const { job } = await api.request<{ job: JobView }>("POST", `/v1/phases/${id}/jobs/${encodeURIComponent(jobId)}/kill`, opts.note ? { note: opts.note } : {});
      process.stdout.write(`${job.id} ${job.state}${job.result ? ` (${jobExit(job)})` : ""}\n`);
    });

  const approvals = prog
    .command("approvals")
    .description("human approvals: commands the policy sends to a person (SKILLS.md: \"requires human approval\")");
  approvals
    .command("ls")
    .description("list pending approval requests (--all: with decided, used and expired ones)")
    .option("-a, --all", "include decided, used and expired requests")
    .option("--phase <id>", "only this phase's requests")
    .option("--json", "print JSON")
    .action(async (opts: { all?: boolean; phase?: string; json?: boolean }, cmd: Command) => {
      const q = new URLSearchParams();
      if (opts.all) q.set("all", "1");
      if (opts.phase) q.set("phase", opts.phase);
      const { approvals: list } = await client(cmd).request<{ approvals: Approval[] }>("GET", `/v1/approvals?${q.toString()}`);
      if (opts.json) return printJson(list);
      if (list.length === 0) {
        process.stdout.write(opts.all ? "no approval requests\n" : "no pending approval requests\n");
        return;
      }
      const rows = [["ID", "PHASE", "STATE", "REQUESTED", "RULE", "COMMAND"]];
      for (const a of list) {
        rows.push([a.id, a.phaseId, a.state, a.requestedAt, a.ruleId, `${approvalCommand(a)}${a.timeoutMs ? ` (timeout ${a.timeoutMs / 1000} s)` : ""}`]);
      }
      process.stdout.write(table(rows));
    });
  approvals
    .command("show")
    .description("show one approval request in full: the exact command (invisible characters escaped), why, and the files it is bound to")
    .argument("<id>", "approval id (ap_…)")
    .option("--json", "print JSON (the exact values)")
    .action(async (id: string, opts: { json?: boolean }, cmd: Command) => {
      const { approval: a } = await client(cmd).request<{ approval: Approval }>("GET", `/v1/approvals/${encodeURIComponent(id)}`);
      if (opts.json) return printJson(a);
      printApproval(a);
    });
  for (const decision of ["approve", "deny"] as const) {
    approvals
      .command(decision)
      .description(
        decision === "approve"
          ? "approve a request: that exact command may then run once in its phase"
          : "deny a request: the command stays refused",
      )
      .argument("<id>", "approval id (ap_…)")
      .option("--note <text>", "why (recorded in the audit trail)")
      .option("--json", "print the decided request as JSON")
      .action(async (id: string, opts: { note?: string; json?: boolean }, cmd: Command) => {
        const { approval: a } = await client(cmd).request<{ approval: Approval }>(
          "POST",
          `/v1/approvals/${encodeURIComponent(id)}/${decision}`,
          opts.note ? { note: opts.note } : {},
        );
        if (opts.json) return printJson(a);
        process.stdout.write(`${a.id} ${a.state}\n`);
      });
  }

  approvals
    .command("grant")
    .description("grant a standing approval: a command (exact argv) or a pattern the policy would ask about runs without asking, in one phase or every phase of a project, until it expires or is revoked (never lifts a forbid)")
    .option("--phase <id>", "scope: this phase")
    .option("--project <dir>", "scope: every phase of this project")
    .option("--argv <command>", "the exact command: words split at blanks, or a JSON array (e.g. '[\"sh\", \"x.sh\"]'); bound to the content of the files it runs")
    .option("--pattern <tokens>", "a policy-style pattern (a shell rule's tokens, as in policies/default.yaml: words split at blanks, or a JSON array such as '[\"sh\", {\"prefix\": \"scripts/\"}]'; it matches an argv prefix); each file it runs is pinned at its first use")
    .requiredOption("--expires <duration>", "how long it holds: 30m, 2h, 7d (at most 30d)", parseDuration)
    .option("--max-timeout <seconds>", "commands it covers may also run with a timeout up to this (over the mode's limit, within the policy's ceiling)", parseTimeout)
    .option("--note <text>", "why (recorded in the audit trail)")
    .option("--json", "print the grant as JSON")
    .action(
      async (
        opts: { phase?: string; project?: string; argv?: string; pattern?: string; expires: number; maxTimeout?: number; note?: string; json?: boolean },
        cmd: Command,
      ) => {
        if ((opts.phase === undefined) === (opts.project === undefined)) cmd.error("give exactly one scope: --phase ID or --project DIR", { exitCode: EXIT.usage });
        if ((opts.argv === undefined) === (opts.pattern === undefined)) cmd.error("give exactly one of --argv or --pattern", { exitCode: EXIT.usage });
        const body = {
          ...(opts.phase ? { phase: opts.phase } : { project: path.resolve(opts.project!) }),
          ...(opts.argv !== undefined ? { argv: words(opts.argv) } : { pattern: words(opts.pattern!) }),
          expiresInMs: opts.expires,
          ...(opts.maxTimeout ? { maxTimeoutMs: opts.maxTimeout } : {}),
          ...(opts.note ? { note: opts.note } : {}),
        };
        const { grant: g } = await client(cmd).request<{ grant: Grant }>("POST", "/v1/grants", body);
        if (opts.json) return printJson(g);
        process.stdout.write(`${g.id} granted until ${g.expiresAt}\n`);
      },
    );

  approvals
    .command("grants")
    .description("list standing approvals (active ones; --all with expired and revoked)")
    .option("-a, --all", "include expired and revoked grants")
    .option("--json", "print JSON")
    .action(async (opts: { all?: boolean; json?: boolean }, cmd: Command) => {
      const { grants } = await client(cmd).request<{ grants: Grant[] }>("GET", `/v1/grants${opts.all ? "?all=1" : ""}`);
      if (opts.json) return printJson(grants);
      if (grants.length === 0) {
        process.stdout.write("no standing approvals\n");
        return;
      }
      const rows = [["ID", "SCOPE", "COMMAND", "EXPIRES", "USES", "STATE"]];
      for (const g of grants) {
        rows.push([
          g.id,
          g.phaseId ?? g.project ?? "",
          visible(g.argv ? quoteArgv(g.argv) : `pattern ${JSON.stringify(g.pattern)}`),
          g.expiresAt,
          String(g.uses),
          g.revokedAt ? "revoked" : Date.parse(g.expiresAt) <= Date.now() ? "expired" : "active",
        ]);
      }
      process.stdout.write(table(rows));
    });

  approvals
    .command("revoke")
    .description("revoke a standing approval: the commands it covered ask again")
    .argument("<id>", "grant id (gr_…)")
    .option("--note <text>", "why (recorded in the audit trail)")
    .action(async (id: string, opts: { note?: string }, cmd: Command) => {
      const { grant: g } = await client(cmd).request<{ grant: Grant }>("POST", `/v1/grants/${encodeURIComponent(id)}/revoke`, opts.note ? { note: opts.note } : {});
      process.stdout.write(`${g.id} revoked\n`);
    });

  const audit = prog.command("audit").description("read and verify the audit trail (audit.jsonl: hash-chained, one record per event)");
  audit
    .command("tail")
    .description("print the latest audit records (-f: keep printing as they are written)")
    .option("--phase <id>", "only this phase's records")
    .option("-n, --lines <n>", "how many records to print first", (v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError("give a positive whole number");
      return n;
    }, 20)
    .option("-f, --follow", "keep printing new records until interrupted")
    .option("--json", "one JSON record per line, exactly as stored")
    .action(async (opts: { phase?: string; lines: number; follow?: boolean; json?: boolean }, cmd: Command) => {
      const q = new URLSearchParams({ last: String(opts.lines) });
      if (opts.phase) q.set("phase", opts.phase);
      const print = (r: AuditRecord) => process.stdout.write(opts.json ? JSON.stringify(r) + "\n" : renderRecord(r) + "\n");
      if (!opts.follow) {
        const { records } = await client(cmd).request<{ records: AuditRecord[] }>("GET", `/v1/audit?${q.toString()}`);
        records.forEach(print);
        return;
      }
      q.set("follow", "1");
      const res = await client(cmd).stream("GET", `/v1/audit?${q.toString()}`);
      let buf = "";
      for await (const chunk of res) {
        buf += (chunk as Buffer).toString("utf8");
        let nl: number;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line) print(JSON.parse(line) as AuditRecord);
        }
      }
    });
  audit
    .command("show")
    .description("print every audit record of one phase")
    .argument("<phase>", "phase id")
    .option("--json", "print the records as a JSON array")
    .action(async (phaseId: string, opts: { json?: boolean }, cmd: Command) => {
      const api = client(cmd);
      await api.request("GET", `/v1/phases/${encodeURIComponent(phaseId)}`); // 404 for an unknown phase
      const { records } = await api.request<{ records: AuditRecord[] }>("GET", `/v1/audit?phase=${encodeURIComponent(phaseId)}`);
      if (opts.json) return printJson(records);
      for (const r of records) process.stdout.write(renderRecord(r) + "\n");
    });
  audit
    .command("verify")
    .description("check the hash chain, its anchor and the anchor's signature: names the first bad record, or says the chain is intact up to N; --bundle checks an exported bundle without the daemon")
    .option("--state-dir <dir>", "verify the files in this state dir directly, without the daemon")
    .option("--bundle <file>", "verify a bundle written by `sandboxd audit export` (no daemon, no state dir needed)")
    .option("--key <fingerprint|file>", "pin a signing key (its fingerprint, or a file with its public key as `sandboxd audit key` prints it): every key the trail records must be pinned; repeat for keys of a rotation", (v: string, prev: string[] = []) => [...prev, v])
    .option("--nonce <nonce>", "with --bundle: the nonce given to `audit export --nonce`; the bundle must answer it (not an older export)")
    .option("--key-file <file>", "with --state-dir: the daemon's signing key file (default: SANDBOXD_AUDIT_KEY or the default path); its witness of this state dir, when readable, must be reached by the trail")
    .option("--json", "print the result as JSON")
    .action(async (opts: { stateDir?: string; bundle?: string; key?: string[]; nonce?: string; keyFile?: string; json?: boolean }, cmd: Command) => {
      const { verifyJournal, describeVerifyResult } = await import("../audit/verify.js");
      const bundleMod = await import("../audit/bundle.js");
      const pinned: string[] = [];
      for (const k of opts.key ?? []) {
        let text = k;
        if (!/^[0-9a-f]{64}$/i.test(k)) {
          const { readFile } = await import("node:fs/promises");
          text = await readFile(k, "utf8").catch((e: NodeJS.ErrnoException) => {
            throw new SandboxdError("SBX_ERR_VALIDATION", `--key ${k}: not a fingerprint (64 hex digits) and not a readable file (${e.code ?? e.message})`, {
              hint: "give the fingerprint or the public key that `sandboxd audit key` prints",
            });
          });
        }
        const fp = bundleMod.pinnedFingerprint(text);
        if (!fp) throw new SandboxdError("SBX_ERR_VALIDATION", `--key ${k}: neither a fingerprint nor an ed25519 public key in PEM form`, { hint: "give the fingerprint or the public key that `sandboxd audit key` prints" });
        pinned.push(fp);
      }
      if (opts.bundle) {
        if (opts.stateDir) throw new SandboxdError("SBX_ERR_VALIDATION", "give --bundle or --state-dir, not both");
        const file = path.resolve(opts.bundle);
        const result = await bundleMod.verifyBundleFile(file, { pinned, nonce: opts.nonce });
        if (opts.json) printJson(result);
        else process.stdout.write(visible(bundleMod.describeBundleResult(result, file)) + "\n");
        if (!result.ok) throw new CliExit(EXIT.error);
        return;
      }
      if (opts.nonce !== undefined) throw new SandboxdError("SBX_ERR_VALIDATION", "--nonce checks a bundle: give it with --bundle");
      if (!opts.stateDir && (pinned.length > 0 || opts.keyFile)) {
        throw new SandboxdError("SBX_ERR_VALIDATION", "--key and --key-file are for --bundle or --state-dir; the daemon checks its trail against its own keys and the heads it wrote and signed");
      }
      let result: Awaited<ReturnType<typeof verifyJournal>>;
      if (opts.stateDir) {
        // The witness beside the key (docs/AUDIT.md "Threat model") says how far this trail reached when last signed.
        const { defaultAuditKey } = await import("../config/paths.js");
        const { readWitness, witnessFile } = await import("../audit/witness.js");
        const stateDir = path.resolve(opts.stateDir);
        const wfile = witnessFile(path.resolve(opts.keyFile ?? (process.env.SANDBOXD_AUDIT_KEY || defaultAuditKey())), stateDir, process.env.SANDBOXD_AUDIT_WITNESS_DIR || undefined);
        const w = await readWitness(wfile).catch((e: unknown) => {
          if (opts.keyFile) throw e; // asked for: its absence of rights is an answer
          return null;
        });
        result = await verifyJournal(stateDir, { pinned, checkpoints: w ? [{ seq: w.seq, hash: w.hash, source: `the witness ${wfile}` }] : [] });
        if (!w && !opts.json) {
          process.stderr.write(`note: no witness of this state dir was read (${wfile}: absent or unreadable), so a rollback to an older copy of the trail would not be noticed; give --key-file, or run as the daemon's user (docs/AUDIT.md "Threat model")\n`);
        }
      } else {
        result = (await client(cmd).request<{ verify: Awaited<ReturnType<typeof verifyJournal>> }>("GET", "/v1/audit/verify")).verify;
      }
      if (opts.json) printJson(result);
      else process.stdout.write(describeVerifyResult(result) + "\n");
      if (!result.ok) throw new CliExit(EXIT.error);
    });
  audit
    .command("export")
    .description("write a verifiable bundle of the whole trail (records, signing keys, policy hashes, a signed anchor) for `sandboxd audit verify --bundle` elsewhere")
    .option("-o, --output <file>", "where to write it (default: standard output); written to FILE.part, then renamed")
    .option("--nonce <nonce>", "an auditor's challenge (1-128 of A-Z a-z 0-9 . _ : -), recorded in the bundle's last record; `verify --bundle --nonce` then knows the bundle is not an older one")
    .action(async (opts: { output?: string; nonce?: string }, cmd: Command) => {
      const res = await client(cmd).stream("GET", `/v1/audit/export${opts.nonce !== undefined ? `?nonce=${encodeURIComponent(opts.nonce)}` : ""}`);
      const records = res.headers["x-sandboxd-bundle-records"];
      const key = res.headers["x-sandboxd-bundle-key"];
      if (!opts.output) {
        for await (const chunk of res) process.stdout.write(chunk as Buffer);
        return;
      }
      const { createWriteStream } = await import("node:fs");
      const { rename } = await import("node:fs/promises");
      const { pipeline } = await import("node:stream/promises");
      const out = path.resolve(opts.output);
      const part = `${out}.part`;
      await pipeline(res, createWriteStream(part, { mode: 0o600 }));
      // a bundle cut short (the daemon stopped mid-way) has no anchor line and would not verify: check before naming it
      const { verifyBundleFile } = await import("../audit/bundle.js");
      const check = await verifyBundleFile(part, { nonce: opts.nonce });
      if (!check.ok) throw new SandboxdError("SBX_ERR_AUDIT_CORRUPT", `the exported bundle does not verify (${check.reason}); left at ${part}`);
      await rename(part, out);
      process.stderr.write(`wrote ${out}: ${String(records)} records, anchor signed with key ${String(key)}\n`);
    });
  audit
    .command("key")
    .description("print the public key that signs the audit trail's anchors and its fingerprint (give it to auditors); --new makes a key")
    .option("--key-file <file>", "read this private key file instead of asking the daemon (or, with --new, where to make the key)")
    .option("--new", "make a new ed25519 key (0600) at --key-file or the default path; never overwrites")
    .option("--rotate", "replace the key at --key-file or the default path with a new one; the old public key is appended to FILE.previous so the next start accepts the trail's last anchor (restart the daemon after)")
    .option("--json", "print {fingerprint, publicKey, keyFile} as JSON")
    .action(async (opts: { keyFile?: string; new?: boolean; rotate?: boolean; json?: boolean }, cmd: Command) => {
      const signing = await import("../audit/signing.js");
      let key: { fingerprint: string; publicKey: string; keyFile: string };
      if (opts.new && opts.rotate) throw new SandboxdError("SBX_ERR_VALIDATION", "give --new or --rotate, not both");
      if (opts.new || opts.rotate || opts.keyFile) {
        const { defaultAuditKey } = await import("../config/paths.js");
        const file = path.resolve(opts.keyFile ?? (process.env.SANDBOXD_AUDIT_KEY || defaultAuditKey()));
        let s: Awaited<ReturnType<typeof signing.readSigningKey>>;
        if (opts.rotate) {
          const r = await signing.rotateSigningKey(file);
          process.stderr.write(`rotated ${file}: key ${r.replaced} replaced (its public key is in ${signing.previousKeysFile(file)}); restart the daemon to sign with the new key\n`);
          s = r.signer;
        } else s = opts.new ? await signing.createSigningKey(file) : await signing.readSigningKey(file);
        key = { fingerprint: s.fingerprint, publicKey: s.publicKeyPem, keyFile: s.keyFile };
      } else {
        key = (await client(cmd).request<{ key: typeof key }>("GET", "/v1/audit/key")).key;
      }
      if (opts.json) return printJson(key);
      process.stdout.write(`key file:    ${key.keyFile}\nfingerprint: ${key.fingerprint}\n${key.publicKey}`);
    });

  prog
    .command("logs")
    .description("print a phase's container logs (the shim's own log); -f follows them live")
    .argument("<id>")
    .option("-f, --follow", "keep printing as the container writes")
    .action(async (id: string, opts: { follow?: boolean }, cmd: Command) => {
      const res = await client(cmd).stream("GET", `/v1/phases/${encodeURIComponent(id)}/logs${opts.follow ? "?follow=1" : ""}`);
      for await (const chunk of res) process.stdout.write(chunk as Buffer);
    });

  prog
    .command("completion")
    .description("print a shell completion script: eval \"$(sandboxd completion bash)\" in ~/.bashrc (or zsh in ~/.zshrc)")
    .addArgument(new Argument("<shell>", "bash or zsh").choices(["bash", "zsh"]))
    .action(async (shell: "bash" | "zsh") => {
      const { bashCompletion, zshCompletion } = await import("./completion.js");
      process.stdout.write(shell === "bash" ? bashCompletion(prog) : zshCompletion(prog));
    });

  return prog;
}

/**
 * A phase named the way people name it: its id, or its name (e.g. 2.3) when
 * exactly one phase (one running phase, for stop) has that name.
 */
async function resolvePhaseRef(api: ApiClient, ref: string, opts: { runningOnly?: boolean } = {}): Promise<string> {
  if (/^ph_[0-9a-f]{12}$/.test(ref)) return ref;
  const { phases } = await api.request<{ phases: PhaseView[] }>("GET", "/v1/phases");
  const named = phases.filter((p) => p.name === ref && (!opts.runningOnly || p.state === "running"));
  const live = named.filter((p) => p.state === "running");
  const pick = live.length === 1 ? live : named;
  if (pick.length === 1) return pick[0]!.id;
  if (pick.length === 0) {
    throw new SandboxdError("SBX_ERR_PHASE_NOT_FOUND", `no ${opts.runningOnly ? "running " : ""}phase with id or name ${JSON.stringify(ref)}`, {
      hint: "`sandboxd ps --all` lists phases with their ids and names",
    });
  }
  throw new SandboxdError("SBX_ERR_VALIDATION", `${pick.length} phases are named ${JSON.stringify(ref)}: ${pick.map((p) => `${p.id} (${p.state})`).join(", ")}`, {
    hint: "give the phase's id instead",
  });
}

export async function main(argv: string[]): Promise<number> {
  try {
    await program().parseAsync(argv);
    return 0;
  } catch (err) {
    if (err instanceof CliExit) return err.code;
    const ce = err as { code?: string; exitCode?: number };
    if (typeof ce.code === "string" && ce.code.startsWith("commander.")) {
      // help and version are not errors
      if (ce.code === "commander.helpDisplayed" || ce.code === "commander.version") return 0;
      // `sandboxd phase` without a subcommand shows the group's help as an error (exit code 1 from commander)
      if (ce.code === "commander.help") return ce.exitCode === 0 ? 0 : EXIT.usage;
      if (ce.code === "commander.unknownOption" && argv.slice(2).includes("exec") && !argv.includes("--")) {
        // `sandboxd exec ID pytest -q`: the command's own options were taken for sandboxd's
        process.stderr.write("  hint: put the command after --, e.g. `sandboxd exec ph_0123456789ab -- pytest -q tests/`\n");
      }
      return EXIT.usage;
    }
    printError(err);
    return EXIT.error;
  }
}

/** A project-relative path in a URL: each segment encoded (a `/` separates, anything else is data). */
function filePath(rel: string): string {
  return rel.split("/").map(encodeURIComponent).join("/");
}

async function readStdin(): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}
