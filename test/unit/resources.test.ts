/**
 * The resource watch's pure parts: finding a container's memory cgroup from
 * /proc/<pid>/cgroup and mountinfo (v1 hybrid and pure v2), reading the
 * counters' files, the "sustained" window, the OOM category, the memory
 * escalation report, the policy keys and the counters' round trip to disk.
 */
import path from "node:path";
import { describe, expect, it, onTestFinished } from "vitest";
import { memoryCgroupDir, statValue } from "../../src/runtime/cgroup.js";
import { MemoryWindow } from "../../src/phases/resources.js";
import { categorize } from "../../src/phases/categorize.js";
import { FailFastState, escalationReport, failFastSnapshotSchema } from "../../src/phases/failfast.js";
import { loadPolicy } from "../../src/policy/index.js";
import { writeFileSync } from "node:fs";
import { ROOT, tempDir } from "../helpers/sandbox.js";
import { readFile, rm } from "node:fs/promises";

const MiB = 1024 * 1024;

const HYBRID_MOUNTS = [
  "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755",
  "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu",
  "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory",
  "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw",
].join("\n");

describe("memoryCgroupDir", () => {
  it("a hybrid host (this project's): the v1 memory hierarchy", () => {
    const cg = "9:name=systemd:/docker/abc\n4:memory:/docker/abc\n1:cpu:/docker/abc\n0::/docker/abc\n";
    expect(memoryCgroupDir(cg, HYBRID_MOUNTS)).toEqual({ version: 1, dir: "/sys/fs/cgroup/memory/docker/abc" });
  });
  it("a pure v2 host", () => {
    const mounts = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
    expect(memoryCgroupDir("0::/system.slice/docker-abc.scope\n", mounts)).toEqual({ version: 2, dir: "/sys/fs/cgroup/system.slice/docker-abc.scope" });
  });
  it("a mount of a sub-tree (a cgroup namespace) and joined controllers", () => {
    const mounts = "35 31 0:32 /docker /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory,hugetlb";
    expect(memoryCgroupDir("4:hugetlb,memory:/docker/abc\n", mounts)).toEqual({ version: 1, dir: "/sys/fs/cgroup/memory/abc" });
  });
  it("none when no hierarchy is mounted", () => {
    expect(memoryCgroupDir("4:memory:/docker/abc\n", "41 31 0:38 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu")).toBeNull();
  });
});

describe("statValue", () => {
  it("reads memory.oom_control, memory.events and memory.stat lines, by whole key", () => {
    expect(statValue("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n", "oom_kill")).toBe(7);
    expect(statValue("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n", "oom_kill")).toBe(2);
    expect(statValue("inactive_file 4096\ntotal_inactive_file 8192\n", "total_inactive_file")).toBe(8192);
    expect(statValue("cache 1\n", "oom_kill")).toBeNull();
  });
});

describe("MemoryWindow: sustained means above the threshold for the sustain time, through short dips", () => {
  const at = (ws: number) => ({ workingSetBytes: ws * MiB, usageBytes: (ws + 10) * MiB, limitBytes: 2048 * MiB });
  it("escalates only after the sustain time above the threshold, with the figures, then starts again", () => {
    const w = new MemoryWindow();
    expect(w.observe(at(1100), 0, 1024 * MiB, 3_000)).toBeNull();
    expect(w.observe(at(1300), 1_000, 1024 * MiB, 3_000)).toBeNull();
    expect(w.observe(at(1200), 2_000, 1024 * MiB, 3_000)).toBeNull();
    expect(w.observe(at(1150), 3_000, 1024 * MiB, 3_000)).toEqual({
      thresholdBytes: 1024 * MiB,
      sustainMs: 3_000,
      overMs: 3_000,
      samples: 4,
      currentBytes: 1150 * MiB,
      peakBytes: 1300 * MiB,
      usageBytes: 1160 * MiB,
      limitBytes: 2048 * MiB,
    });
    // the window starts again: the next sample alone is not sustained
    expect(w.observe(at(1150), 4_000, 1024 * MiB, 3_000)).toBeNull();
  });
  it("a dip below the threshold no longer than a third of the sustain time does not start the window again; a longer one does", () => {
    const w = new MemoryWindow();
    w.observe(at(1100), 0, 1024 * MiB, 3_000);
    w.observe(at(1100), 2_000, 1024 * MiB, 3_000);
    // let go of the memory for one sample, take it again: still the same window
    expect(w.observe(at(100), 2_500, 1024 * MiB, 3_000)).toBeNull();
    expect(w.observe(at(100), 3_000, 1024 * MiB, 3_000)).toBeNull();
    expect(w.observe(at(1100), 3_000, 1024 * MiB, 3_000)?.overMs).toBe(3_000);
    // a dip longer than the grace (1 s of 3 s) starts it again
    const v = new MemoryWindow();
    v.observe(at(1100), 0, 1024 * MiB, 3_000);
    v.observe(at(1100), 2_000, 1024 * MiB, 3_000);
    expect(v.observe(at(900), 3_001, 1024 * MiB, 3_000)).toBeNull();
    expect(v.observe(at(1100), 4_000, 1024 * MiB, 3_000)).toBeNull();
    expect(v.observe(at(1100), 6_999, 1024 * MiB, 3_000)).toBeNull();
    expect(v.observe(at(1100), 7_000, 1024 * MiB, 3_000)?.overMs).toBe(3_000);
  });
});

describe("categorize: the kernel's OOM count decides", () => {
  const base = { signal: null, timedOut: false, stdout: "", stderr: "" };
  it("a failed command that saw an OOM kill is runtime, whatever its output says", () => {
    expect(categorize({ ...base, argv: ["pytest"], exitCode: 1, stdout: "1 failed", oomKills: 2, memoryLimitBytes: 256 * MiB })).toEqual({
      category: "runtime",
      evidence: "out of memory: the kernel's OOM killer killed 2 process(es) in the container while this command ran (the phase's memory limit, 256 MiB); it exited 1",
    });
    expect(categorize({ ...base, argv: ["python3", "x.py"], exitCode: null, signal: "SIGKILL", oomKills: 1 })?.evidence).toMatch(/it was killed by SIGKILL$/);
  });
  it("a success is never read, OOM or not; no OOM leaves the usual reading", () => {
    expect(categorize({ ...base, argv: ["python3", "x.py"], exitCode: 0, oomKills: 3 })).toBeNull();
    expect(categorize({ ...base, argv: ["python3", "x.py"], exitCode: null, signal: "SIGKILL", oomKills: 0 })?.evidence).toBe("killed (SIGKILL / exit 137)");
  });
});

describe("the memory escalation report", () => {
  it("names the figures, the policy keys and says no attempt was counted", () => {
    const lines = escalationReport({
      phase: { id: "ph_1", name: "4.2", mode: "backtest", project: "/p" },
      reached: {
        scope: "memory",
        category: "runtime",
        count: 31,
        limit: 0,
        attempts: [],
        memory: { thresholdBytes: 1024 * MiB, sustainMs: 30_000, overMs: 30_400, samples: 31, currentBytes: 1200 * MiB, peakBytes: 1300 * MiB, usageBytes: 1400 * MiB, limitBytes: 2048 * MiB },
      },
      filesModified: ["services/a.py"],
      filesPending: ["services/b.py"],
      lastError: "",
      tests: null,
      at: "2026-01-01T00:00:00.000Z",
    });
    expect(lines[0]).toBe("[ESCALATION] Phase 4.2 (ph_1) held too much memory for too long");
    expect(lines).toContain("Error Category: Runtime (memory: SKILLS.md Resource Limits)");
    expect(lines).toContain(
      "Memory: working set 1.17 GiB (peak 1.27 GiB; usage with file cache 1.37 GiB), threshold 1 GiB for 30 s (limits.memoryEscalateBytes, memorySustainMs), over it for 30.4 s in 31 samples; hard limit 2 GiB",
    );
    expect(lines).toContain("Files Modified: services/a.py (accepted iterations)");
    expect(lines).toContain("Files Changed Since The Last Checkpoint (not judged, not in the project): services/b.py");
    expect(lines).toContain("  none counted (the resource watch escalated, not a failed attempt)");
  });
});

describe("policy: the resource watch's keys", () => {
  it("default to SKILLS.md's 1 GB for 30 s; a threshold above the hard limit is refused at load", async () => {
    const p = await loadPolicy(path.join(ROOT, "policies", "default.yaml"));
    expect(p.limits.test).toMatchObject({ memoryBytes: 2048 * MiB, memoryEscalateBytes: 1024 * MiB, memorySustainMs: 30_000, cpus: 1 });
    const dir = await tempDir("respolicy");
    onTestFinished(() => rm(dir, { recursive: true, force: true }));
    const file = path.join(dir, "p.yaml");
    writeFileSync(file, (await readFile(path.join(ROOT, "policies", "default.yaml"), "utf8")).replace("memoryEscalateBytes: 1GiB", "memoryEscalateBytes: 3GiB"));
    await expect(loadPolicy(file)).rejects.toThrow(/limits\.default\.memoryEscalateBytes: memoryEscalateBytes \(3221225472\) must not exceed memoryBytes/);
    // an older policy file without the keys still loads, with the defaults
    writeFileSync(file, (await readFile(path.join(ROOT, "policies", "default.yaml"), "utf8")).replace(/^ {4}memory(Escalate|Sustain)\w+:.*\n/gm, ""));
    expect((await loadPolicy(file)).limits.paper).toMatchObject({ memoryEscalateBytes: 1024 * MiB, memorySustainMs: 30_000 });
  });
});

describe("FailFastState on disk", () => {
  it("round-trips through failfast.json: counts, sources, streak, tests, validation", async () => {
    const policy = (await loadPolicy(path.join(ROOT, "policies", "default.yaml"))).failFast;
    const f = new FailFastState();
    f.fail(policy, { at: "t1", category: "test", source: "pytest", action: "pytest", result: "FAIL exit 1", evidence: "1 failed" });
    f.fail(policy, { at: "t2", category: "test", source: "pytest", action: "pytest", result: "FAIL exit 1", evidence: "1 failed" });
    f.lastTests = { tests: 2, passed: 1, failures: 1, errors: 0, skipped: 0, failed: ["t::x"] };
    f.validation.set("pytest", false);
    f.lastError = "E   assert 4 == 5";
    const back = FailFastState.fromJSON(failFastSnapshotSchema.parse(JSON.parse(JSON.stringify(f))) as never);
    expect(back.snapshot()).toEqual({ test: 2 });
    expect(back.total).toBe(2);
    expect(back.lastTests).toEqual(f.lastTests);
    expect([...back.validation]).toEqual([["pytest", false]]);
    // the third failure after the restart reaches the limit, and a pytest success resets it
    expect(back.fail(policy, { at: "t3", category: "test", source: "pytest", action: "pytest", result: "FAIL exit 1", evidence: "1 failed" }).reached).toMatchObject({ scope: "category", count: 3 });
    expect(back.succeed("pytest")).toEqual(["test"]);
  });
  it("a tampered file is refused by its schema", () => {
    expect(() => failFastSnapshotSchema.parse({ counters: [{ category: "nonsense", count: 1, sources: [], attempts: [] }], streak: [], total: 0, lastTests: null, lastError: "", validation: [] })).toThrow();
  });
});
