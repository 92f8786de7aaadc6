/**
 * The resource watch (SKILLS.md Resource Limits), in real sandboxes of a real
 * daemon: a memory hog held above a lowered threshold escalates the phase
 * with its figures (frozen: docker inspect says Paused); a command the
 * kernel OOM-kills is a counted `runtime` failure and the shim lives on (60
 * small hogs included: commands are the OOM killer's first choice); a shim
 * the OOM killer kills, or one killed from outside, ends the phase `failed`
 * within seconds, its report kept; the events say it in order.
 */
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult, PhaseReport } from "../../src/phases/manager.js";
import type { PhaseView } from "../../src/phases/types.js";
import { ROOT, docker, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, until, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
const dirs: string[] = [];
const started: string[] = [];
const MiB = 1024 * 1024;

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
}, 120_000);

afterAll(async () => {
  for (const id of started) await t.api.request("DELETE", `/v1/phases/${id}`).catch(() => undefined);
  await t?.close();
  for (const d of dirs) await removeDir(d);
});

/** policies/default.yaml with other memory limits, as a phase's own (stricter) policy. */
async function memoryPolicy(limits: { memoryBytes?: string; memoryEscalateBytes: string; memorySustainMs: string }): Promise<string> {
  let text = await readFile(path.join(ROOT, "policies", "default.yaml"), "utf8");
  if (limits.memoryBytes) text = text.replace(/^( {4}memoryBytes:) 2GiB/m, `$1 ${limits.memoryBytes}`);
  text = text.replace(/^( {4}memoryEscalateBytes:) 1GiB/m, `$1 ${limits.memoryEscalateBytes}`).replace(/^( {4}memorySustainMs:) 30s/m, `$1 ${limits.memorySustainMs}`);
  const dir = await tempDir("mempolicy");
  dirs.push(dir);
  const file = path.join(dir, "policy.yaml");
  await writeFile(file, text);
  return file;
}

async function start(name: string, policy: string): Promise<{ phase: PhaseView; project: string }> {
  const project = await makeProject();
  dirs.push(project);
  const { phase } = await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: name, mode: "test", policy });
  started.push(phase.id);
  return { phase, project };
}

const view = async (id: string) => (await t.api.request<{ phase: PhaseView }>("GET", `/v1/phases/${id}`)).phase;
const exec = async (id: string, argv: string[], timeoutMs = 60_000) =>
  (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${id}/exec`, { argv, timeoutMs })).result;


async function events(phase: string): Promise<Array<Record<string, unknown>>> {
  const res = await t.api.stream("GET", `/v1/events?phase=${phase}&since=0&follow=0`);
  let text = "";
  for await (const c of res) text += (c as Buffer).toString("utf8");
  return text.split("\n").filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
}

/** The shim's host pid: the child of the container's tini. */
async function shimPid(containerId: string): Promise<number> {
  const tini = (await docker.getContainer(containerId).inspect()).State.Pid;
  const children = (await readFile(`/proc/${tini}/task/${tini}/children`, "utf8")).trim().split(/\s+/).map(Number);
  for (const pid of children) {
    const cmdline = (await readFile(`/proc/${pid}/cmdline`, "utf8")).split("\0");
    if (cmdline.some((a) => a.endsWith("shim.cjs"))) return pid;
  }
  throw new Error(`no shim among the children of ${tini}: ${children.join(", ")}`);
}

/** Holds `mb` MiB (every page written) for `seconds`. */
const HOG = (mb: number, seconds: number) => `import time\nx = b"x" * (${mb} * 1024 * 1024)\nprint("holding", len(x) // (1024 * 1024), "MiB", flush=True)\ntime.sleep(${seconds})\n`;

describe("resource watch in a real sandbox", () => {
  it("memory held above the phase policy's threshold for its sustain time escalates the phase with the figures; the hog is frozen with it", async () => {
    const policy = await memoryPolicy({ memoryEscalateBytes: "300MiB", memorySustainMs: "2s" });
    const { phase, project } = await start("mem.1", policy);
    // a quiet phase (the shim and the forker alone) stays far below the threshold
    await new Promise((r) => setTimeout(r, 3_000));
    expect((await view(phase.id)).state).toBe("running");

    const script = await writeScript(project, HOG(400, 50));
    const t0 = Date.now();
    // the command is frozen with the phase: its answer comes only when the phase ends
    const hog = exec(phase.id, ["python3", script]).then(
      (r) => ({ ok: r }),
      (e: Error) => ({ err: e }),
    );
    const escalated = await until("the escalation", async () => {
      const v = await view(phase.id);
      return v.state === "escalated" ? v : null;
    }, 30_000);
    const took = Date.now() - t0;
    expect(took).toBeGreaterThanOrEqual(2_000);
    expect(took).toBeLessThan(15_000);
    // the state changes first (the next call gets 423), then the report is written, then the container freezes
    await until("the freeze", async () => (await docker.getContainer(escalated.containerId!).inspect()).State.Paused, 10_000);
    const esc = escalated.escalations!.at(-1)!;
    expect(esc).toMatchObject({ n: 1, category: "memory", resolved: null });
    expect(esc.summary).toMatch(/^memory \(working set\) [\d.]+ MiB at or above 300 MiB for [\d.]+ s \(peak [\d.]+ MiB, \d+ samples; hard limit 2 GiB\)$/);

    const report = await readFile(esc.report, "utf8");
    expect(report).toMatch(/^\[ESCALATION\] Phase mem\.1 \(ph_[0-9a-f]{12}\) held too much memory for too long\n---\n/);
    expect(report).toContain("Error Category: Runtime (memory: SKILLS.md Resource Limits)");
    const m = /Memory: working set ([\d.]+) MiB \(peak ([\d.]+) MiB; usage with file cache [\d.]+ [MG]iB\), threshold 300 MiB for 2 s \(limits\.memoryEscalateBytes, memorySustainMs\), over it for ([\d.]+) s in (\d+) samples; hard limit 2 GiB/.exec(report);
    expect(m, report).not.toBeNull();
    expect(Number(m![1])).toBeGreaterThanOrEqual(400);
    expect(Number(m![2])).toBeGreaterThanOrEqual(Number(m![1]));
    expect(Number(m![3])).toBeGreaterThanOrEqual(2);
    expect(Number(m![4])).toBeGreaterThanOrEqual(3);
    expect(report).toContain("none counted (the resource watch escalated, not a failed attempt)");
    expect(report).toMatch(/Recommendation: The phase's memory stayed at or above 300 MiB/);

    // the trail has it, with the figures
    const ev = await events(phase.id);
    const e = ev.find((x) => x.type === "phase.escalated")!;
    expect(e).toMatchObject({ state: "escalated", scope: "memory", category: "runtime" });
    expect((e.memory as { thresholdBytes: number; peakBytes: number }).thresholdBytes).toBe(300 * MiB);
    expect((e.memory as { peakBytes: number }).peakBytes).toBeGreaterThanOrEqual(400 * MiB);

    // a person aborts: the frozen command ends with the phase, which keeps its report
    await t.api.request("POST", `/v1/phases/${phase.id}/abort`, { note: "leak found" });
    const out = await hog;
    expect("err" in out).toBe(true);
    const rep = (await t.api.request<{ report: PhaseReport }>("GET", `/v1/phases/${phase.id}/report`)).report;
    expect(rep).toMatchObject({ outcome: "failed", escalations: [{ n: 1, category: "memory", resolved: { how: "aborted" } }] });
    const types = (await events(phase.id)).map((x) => x.type);
    expect(types.indexOf("phase.start")).toBeLessThan(types.indexOf("phase.escalated"));
    expect(types.indexOf("phase.escalated")).toBeLessThan(types.indexOf("phase.failed"));
    const seqs = (await events(phase.id)).map((x) => x.seq as number);
    expect(seqs).toEqual([...seqs].sort((a, b) => a - b));
  }, 90_000);

  it("a command the kernel OOM-kills is a counted runtime failure, recorded; 60 small hogs kill commands, never the shim", async () => {
    const policy = await memoryPolicy({ memoryBytes: "256MiB", memoryEscalateBytes: "250MiB", memorySustainMs: "60s" });
    const { phase, project } = await start("mem.2", policy);
    // commands are the OOM killer's first choice; the shim (and the forker) stay at 0
    const adj = await exec(phase.id, ["python3", await writeScript(project, 'print(open("/proc/self/oom_score_adj").read().strip())')]);
    expect(adj.stdout.trim()).toBe("1000");
    const shim = await shimPid(phase.containerId!);
    expect((await readFile(`/proc/${shim}/oom_score_adj`, "utf8")).trim()).toBe("0");

    // one command over the limit: the kernel kills it
    const big = await writeScript(project, HOG(600, 5));
    const r1 = await exec(phase.id, ["python3", big]);
    expect(r1.signal).toBe("SIGKILL");
    expect(r1.failure).toMatchObject({ category: "runtime", counted: true, count: 1, limit: 2 });
    expect(r1.failure!.evidence).toMatch(/^out of memory: the kernel's OOM killer killed 1 process\(es\) in the container while this command ran \(the phase's memory limit, 256 MiB\); it was killed by SIGKILL$/);

    // 60 processes of 12 MiB each (720 MiB in all, each smaller than the shim): commands die, the shim lives
    const many = await writeScript(
      project,
      [
        "import os, sys, time",
        "kids = []",
        "for i in range(60):",
        "    pid = os.fork()",
        "    if pid == 0:",
        "        x = b'x' * (12 * 1024 * 1024)",
        "        time.sleep(4)",
        "        os._exit(0)",
        "    kids.append(pid)",
        "killed = sum(1 for p in kids if os.WIFSIGNALED(os.waitpid(p, 0)[1]))",
        "print('killed', killed, flush=True)",
        "sys.exit(3 if killed else 0)",
      ].join("\n"),
    );
    const r2 = await exec(phase.id, ["python3", many]);
    expect(r2.stdout).toMatch(/^killed [1-9]\d*$/m);
    expect(r2.exitCode).toBe(3);
    expect(r2.failure).toMatchObject({ category: "runtime", counted: true, count: 2, limit: 2 });
    expect(r2.failure!.evidence).toMatch(/^out of memory: the kernel's OOM killer killed \d+ process\(es\) in the container while this command ran/);
    // the second runtime failure in a row reached runtime's limit of 2: escalated, but the shim is alive
    expect(r2.escalation).toMatchObject({ category: "runtime" });
    expect((await readFile(`/proc/${shim}/oom_score_adj`, "utf8")).trim()).toBe("0");
    await t.api.request("POST", `/v1/phases/${phase.id}/resume`, { note: "memory understood" });
    expect((await exec(phase.id, ["pytest", "-q", "tests/test_calc.py"])).exitCode).toBe(0);
    expect(await shimPid(phase.containerId!)).toBe(shim);

    // every kill is in the trail as the watch saw it, and the exec results carry the count
    const ev = await events(phase.id);
    const ooms = ev.filter((x) => x.type === "resource.oom");
    expect(ooms.length).toBeGreaterThanOrEqual(1);
    expect(ooms[0]).toMatchObject({ limitBytes: 256 * MiB });
    const results = ev.filter((x) => x.type === "exec.result" && x.category === "runtime");
    expect(results).toHaveLength(2);
    expect(results.every((x) => (x.oomKills as number) >= 1)).toBe(true);
    const build = await readFile(path.join(project, "build_audit.log"), "utf8");
    expect(build).toMatch(/\[RESOURCE\] \[OOM\] \[mem\.2 \(ph_[0-9a-f]{12}\)\] \[the kernel's OOM killer killed \d+ process\(es\) in the container \(limit 256 MiB;/);
    expect(build).toMatch(/ERROR_CATEGORY: runtime \(attempt 1\/2\): out of memory: the kernel's OOM killer killed 1 process/);
  }, 120_000);

  it("a shim the OOM killer kills ends the phase failed within seconds, its report and records kept", async () => {
    const policy = await memoryPolicy({ memoryBytes: "256MiB", memoryEscalateBytes: "250MiB", memorySustainMs: "60s" });
    const { phase, project } = await start("mem.3", policy);
    await exec(phase.id, ["pytest", "-q", "tests/test_calc.py"]);
    // Make the shim the kernel's first choice, as it was before commands were raised above it:
    // the shim up to 1000 and, once the hog runs (it waits for a go-file in its /tmp), the hog
    // down to 0 — from the host, as root (a command cannot write its own /proc).
    const shim = await shimPid(phase.containerId!);
    await writeFile(`/proc/${shim}/oom_score_adj`, "1000");
    const script = await writeScript(project, `import os, time\nwhile not os.path.exists("/tmp/go"):\n    time.sleep(0.05)\n${HOG(600, 20)}`);
    const root = `/proc/${(await docker.getContainer(phase.containerId!).inspect()).State.Pid}/root`;
    void (async () => {
      const hogPid = await until("the hog", async () => {
        for (const pid of (await readFile(`/proc/${shim}/task/${shim}/children`, "utf8")).trim().split(/\s+/).map(Number)) {
          for (const kid of (await readFile(`/proc/${pid}/task/${pid}/children`, "utf8").catch(() => "")).trim().split(/\s+/).filter(Boolean).map(Number)) {
            const cmd = await readFile(`/proc/${kid}/cmdline`, "utf8").catch(() => "");
            if (cmd.includes(path.basename(script))) return kid;
          }
        }
        return null;
      }, 20_000);
      await writeFile(`/proc/${hogPid}/oom_score_adj`, "0");
      await writeFile(`${root}/tmp/go`, "");
    })();
    const t0 = Date.now();
    const hog = await exec(phase.id, ["python3", script]).then(
      () => null,
      (e: Error & { code?: string }) => e,
    );
    expect(hog?.code).toBe("SBX_ERR_SHIM_LOST");
    const ended = await until("the phase's end", async () => {
      const v = await view(phase.id);
      return v.state === "failed" ? v : null;
    }, 20_000);
    expect(Date.now() - t0).toBeLessThan(15_000);
    expect(ended.endReason).toMatch(/its container stopped \(exited, exit code \d+.*the OOM killer killed processes in it \(out of memory\)\)/);
    const rep = (await t.api.request<{ report: PhaseReport }>("GET", `/v1/phases/${phase.id}/report`)).report;
    expect(rep).toMatchObject({ outcome: "failed", tests: { passed: 1, tests: 1 } });
    // the state is saved just before the end is recorded: the events stream has it a moment later
    const types = await until("phase.failed in the events", async () => {
      const all = (await events(phase.id)).map((x) => x.type);
      return all.includes("phase.failed") ? all : null;
    }, 5_000);
    expect(types.at(-1), JSON.stringify(types)).toBe("phase.failed");
    const build = await readFile(path.join(project, "build_audit.log"), "utf8");
    expect(build).toMatch(/\[PHASE_FAILED\] Phase mem\.3 \(ph_[0-9a-f]{12}\): its container stopped/);
  }, 90_000);

  it("a frozen (paused) phase whose container dies is ended failed", async () => {
    const policy = await memoryPolicy({ memoryEscalateBytes: "1GiB", memorySustainMs: "30s" });
    const { phase } = await start("mem.4", policy);
    await t.api.request("POST", `/v1/phases/${phase.id}/pause`, { note: "look" });
    expect((await docker.getContainer(phase.containerId!).inspect()).State.Paused).toBe(true);
    // killed from outside while frozen (SIGKILL reaches frozen tasks once they thaw; Docker refuses
    // to kill a paused container, so the test thaws and kills it behind the daemon's back)
    const c = docker.getContainer(phase.containerId!);
    await c.unpause();
    await c.kill();
    const ended = await until("the phase's end", async () => {
      const v = await view(phase.id);
      return v.state === "failed" ? v : null;
    }, 15_000);
    expect(ended.endReason).toMatch(/its container stopped \(exited, exit code 137, killed by SIGKILL/);
  }, 60_000);
});
