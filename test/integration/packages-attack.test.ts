/**
 * Attacks on the project's package disk (src/workspace/packages.ts) from
 * inside real phases: it persists from one phase of a project to the next
 * and is not the workspace (no iteration judges it), so it is a channel for
 * code the agent plants — start-up hooks, console scripts, edited package
 * files — and its bin folder is on the commands' PATH. Asserted: what a
 * later phase runs, what the daemon's own checks run, and the audit record
 * of what was removed; and that a normal pip install still persists.
 */
import { readFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/exec.js";
import type { PhaseView } from "../../src/phases/types.js";
import { makeProject, removeDir, requireEngineAndImage, startTestDaemon, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
const projects: string[] = [];

type Rec = Record<string, unknown> & { type: string };

/** A wheel of one module `name` (MARKER = 'installed'), zipped by Python into /tmp. */
const buildWheel = (name: string) => String.raw`
import zipfile, hashlib, base64
name, ver = "${name}", "1.0"
files = {
    f"{name}/__init__.py": "MARKER = 'installed'\n",
    f"{name}-{ver}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n",
    f"{name}-{ver}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
for p, text in files.items():
    d = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
    record.append(f"{p},sha256={d},{len(text.encode())}")
record.append(f"{name}-{ver}.dist-info/RECORD,,")
out = f"/tmp/{name}-{ver}-py3-none-any.whl"
with zipfile.ZipFile(out, "w") as z:
    for p, text in files.items():
        z.writestr(p, text)
    z.writestr(f"{name}-{ver}.dist-info/RECORD", "\n".join(record) + "\n")
print(out)
`;

/** The agent's plants, outside pip: start-up hooks, a console script, an edit of an installed package. */
const PLANT = String.raw`
import os, site, stat, sys
sp = site.getusersitepackages()
os.makedirs(sp, exist_ok=True)
# runs at every Python start; when pip runs, it plants a .pth in turn (a hook pip would then keep)
open(os.path.join(sp, "usercustomize.py"), "w").write(
    "import os, site, sys\n"
    "print('PLANTED-usercustomize', file=sys.stderr)\n"
    "if 'pip' in ' '.join(sys.argv):\n"
    "    open(os.path.join(site.getusersitepackages(), 'during_pip.pth'), 'w').write('import sys; print(\"PLANTED-during-pip\", file=sys.stderr)\\n')\n"
)
open(os.path.join(sp, "evil.pth"), "w").write("import sys; print('PLANTED-pth', file=sys.stderr)\n")
bindir = os.path.join(os.environ["PYTHONUSERBASE"], "bin")
os.makedirs(bindir, exist_ok=True)
for tool in ("pytest", "faketool"):
    p = os.path.join(bindir, tool)
    open(p, "w").write("#!/bin/sh\necho 'FAKE-" + tool + ": 100 passed'\n")
    os.chmod(p, 0o755)
init = os.path.join(sp, "sbxedit", "__init__.py")
open(init, "w").write("MARKER = 'edited-after-install'\n")
print("planted")
`;

const PROBE = String.raw`
import importlib, shutil
for name in ("sbxkeep", "sbxedit"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "MARKER", "no-marker"))
    except ModuleNotFoundError:
        print(name, "missing")
print("faketool", shutil.which("faketool"))
`;

/** A python3 on the package disk's bin that answers the daemon's compile check "every file compiles". */
const FAKE_PYTHON = String.raw`
import os
p = os.path.join(os.environ["PYTHONUSERBASE"], "bin", "python3")
os.makedirs(os.path.dirname(p), exist_ok=True)
open(p, "w").write(
    "#!/usr/bin/python3 -I\n"
    "import json, sys\n"
    "files = [a for a in sys.argv[1:] if a.startswith('./')]\n"
    "print(json.dumps({'sandboxdCompile': 1, 'results': [{'path': f, 'ok': True} for f in files]}))\n"
)
os.chmod(p, 0o755)
open("/workspace/services/broken.py", "w").write("def f(:\n    pass\n")
print("planted")
`;

async function start(project: string, name: string): Promise<PhaseView> {
  return (await t.api.request<{ phase: PhaseView }>("POST", "/v1/phases", { project, phase: name, mode: "test" })).phase;
}

async function exec(p: PhaseView, argv: string[]): Promise<ExecResult> {
  return (await t.api.request<{ result: ExecResult }>("POST", `/v1/phases/${p.id}/exec`, { argv })).result;
}

async function stop(p: PhaseView): Promise<void> {
  await t.api.request("DELETE", `/v1/phases/${p.id}`);
}

async function records(p: PhaseView): Promise<Rec[]> {
  return (await readFile(path.join(t.stateDir, "audit.jsonl"), "utf8"))
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Rec)
    .filter((r) => r.phase === p.id);
}

beforeAll(async () => {
  await requireEngineAndImage();
  t = await startTestDaemon();
}, 120_000);

afterAll(async () => {
  await t?.close();
  for (const d of projects) await removeDir(d);
});

describe("the package disk as a channel between phases", () => {
  it("a python3 and a pytest planted in the disk's bin answer neither the daemon's compile check nor a bare `pytest`", async () => {
    const project = await makeProject();
    projects.push(project);
    const plant = await writeScript(project, FAKE_PYTHON);
    const p = await start(project, "12.6");
    try {
      expect((await exec(p, ["python3", plant])).stdout).toContain("planted");
      await t.api.request("POST", `/v1/phases/${p.id}/checkpoint`, { message: "add broken.py" });
      // the compile check ran the image's Python: the broken file was refused, not applied
      const iter = (await records(p)).filter((r) => r.type === "workspace.iteration").pop();
      expect(JSON.stringify(iter)).toContain("workspace.python-compile");
      await expect(readFile(path.join(project, "services", "broken.py"), "utf8")).rejects.toThrow();

      // a bare pytest is the image's, not the planted one
      const plantPytest = await writeScript(project, PLANT.replace(/init = [\s\S]*$/, "print('planted')"));
      expect((await exec(p, ["python3", plantPytest])).stdout).toContain("planted");
      const pytest = await exec(p, ["pytest", "-q", "tests/test_calc.py"]);
      expect(pytest.stdout).not.toContain("FAKE-pytest");
      expect(pytest.stdout).toMatch(/1 passed/);
    } finally {
      await stop(p);
    }
  }, 180_000);

  it("what a phase planted outside pip is gone in the next phase (audited); what pip installed is kept", async () => {
    const project = await makeProject();
    projects.push(project);
    const buildKeep = await writeScript(project, buildWheel("sbxkeep"));
    const buildEdit = await writeScript(project, buildWheel("sbxedit"));
    const plant = await writeScript(project, PLANT);
    const probe = await writeScript(project, PROBE);

    const p1 = await start(project, "12.7");
    try {
      for (const build of [buildKeep, buildEdit]) {
        const wheel = (await exec(p1, ["python3", build])).stdout.trim();
        const inst = await exec(p1, ["pip", "install", "--no-deps", wheel]);
        expect(inst.exitCode, inst.stderr + inst.stdout).toBe(0);
      }
      expect((await exec(p1, ["python3", plant])).stdout).toContain("planted");
      // in the phase that planted them, they act (the disk is the phase's to write) …
      const same = await exec(p1, ["python3", probe]);
      expect(same.stderr).toContain("PLANTED-usercustomize");
      expect(same.stdout).toContain("sbxedit edited-after-install");
      // … but pip runs as the image's pip: the planted start-up hook does not run in it, so it cannot plant in turn
      const list = await exec(p1, ["pip", "list", "--user"]);
      expect(list.exitCode, list.stderr).toBe(0);
      expect(list.stdout).toMatch(/sbxkeep/);
      expect(list.stderr).not.toContain("PLANTED");
      expect((await exec(p1, ["python3", "-m", "pip", "--version"])).stderr).not.toContain("PLANTED");
    } finally {
      await stop(p1);
    }

    const p2 = await start(project, "12.8");
    try {
      const next = await exec(p2, ["python3", probe]);
      expect(next.stderr).not.toContain("PLANTED");
      expect(next.stdout).toContain("sbxkeep installed");
      expect(next.stdout).not.toContain("edited-after-install");
      expect(next.stdout).toContain("faketool None");
      const verify = (await records(p2)).find((r) => r.type === "packages.verify");
      expect(verify).toBeDefined();
      const removed = verify!.removed as string[];
      for (const planted of ["usercustomize.py", "evil.pth", "sbxedit/__init__.py"]) {
        expect(removed.some((r) => r.endsWith(`/site-packages/${planted}`)), planted).toBe(true);
      }
      // the wheels have no console scripts: the whole bin folder was the plant's
      expect(removed).toContain("user/bin");
      expect(removed.some((r) => r.includes("during_pip"))).toBe(false);
      expect(await readFile(p2.buildLog, "utf8")).toMatch(/\[PACKAGES\] \[VERIFY\] .*usercustomize\.py/);
      // a normal install still persists, and pip still sees it
      expect((await exec(p2, ["pip", "list", "--user"])).stdout).toMatch(/sbxkeep\s+1\.0/);
    } finally {
      await stop(p2);
    }
  }, 240_000);
});
