/**
 * A project's package environment (src/workspace/packages.ts): what pip
 * installs in one phase is there in the project's next phase, and not in
 * another project's. Through the real daemon and real sandboxes; no network:
 * the wheel is built inside the sandbox by the test.
 */
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExecResult } from "../../src/phases/exec.js";
import type { PhaseView } from "../../src/phases/types.js";
import { projectKey } from "../../src/workspace/packages.js";
import { makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, writeScript, type TestDaemon } from "../helpers/sandbox.js";

let t: TestDaemon;
let policyDir: string;
const projects: string[] = [];

/** A wheel of one module, `sbxpkg` (prints its marker), zipped by Python's zipfile into /tmp. */
const BUILD_WHEEL = String.raw`
import zipfile, hashlib, base64
name, ver = "sbxpkg", "1.0"
files = {
    "sbxpkg/__init__.py": "MARKER = 'kept-across-phases'\n",
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

const IMPORT = `
try:
    import sbxpkg
    print("found", sbxpkg.MARKER, sbxpkg.__file__)
except ModuleNotFoundError:
    print("missing")
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

async function mounted(dir: string): Promise<boolean> {
  return (await readFile("/proc/self/mountinfo", "utf8")).split("\n").some((l) => l.split(" ")[4] === dir);
}

beforeAll(async () => {
  await requireEngineAndImage();
  // a small package budget, so that filling it is quick
  policyDir = await tempDir("policy");
  const base = await readFile(path.resolve("policies/default.yaml"), "utf8");
  const policy = base.replace(/packagesBytes: 1GiB/, "packagesBytes: 48MiB");
  expect(policy).not.toBe(base);
  await writeFile(path.join(policyDir, "p.yaml"), policy);
  t = await startTestDaemon({ policy: path.join(policyDir, "p.yaml") });
}, 120_000);

afterAll(async () => {
  await t?.close();
  for (const d of [...projects, policyDir]) await removeDir(d);
});

describe("a project's package environment", () => {
  it("a package pip installed in one phase imports in the project's next phase, not in another project's; the disk is the project's budget", async () => {
    const a = await makeProject();
    const b = await makeProject();
    projects.push(a, b);
    const build = await writeScript(a, BUILD_WHEEL);
    const importA = await writeScript(a, IMPORT);
    const importB = await writeScript(b, IMPORT);

    const a1 = await start(a, "6.2");
    const wheel = (await exec(a1, ["python3", build])).stdout.trim();
    expect(wheel).toMatch(/\.whl$/);
    const inst = await exec(a1, ["pip", "install", "--no-deps", wheel]);
    expect(inst.exitCode, inst.stderr + inst.stdout).toBe(0);
    expect((await exec(a1, ["python3", importA])).stdout).toContain("found kept-across-phases /opt/sandboxd-packages/user/");
    expect((await exec(a1, ["pip", "cache", "dir"])).stdout.trim()).toBe("/opt/sandboxd-packages/cache");
    await stop(a1);
    const keyA = path.join(t.stateDir, "projects", projectKey(a), "packages");
    // the last phase of the project ended: its disk is unmounted, the image kept
    expect(await mounted(keyA)).toBe(false);

    const a2 = await start(a, "6.3");
    const b1 = await start(b, "6.4");
    try {
      expect((await exec(a2, ["python3", importA])).stdout).toContain("found kept-across-phases");
      // another project, at the same time: not there, and A's disk is not reachable at all
      expect((await exec(b1, ["python3", importB])).stdout.trim()).toBe("missing");
      const list = await exec(b1, ["pip", "list", "--user"]);
      expect(list.stdout).not.toContain("sbxpkg");

      // the budget is the disk's size: a write past it is ENOSPC, for this project only
      const fill = await writeScript(a, `
import os, errno
try:
    with open("/opt/sandboxd-packages/user/fill.bin", "wb") as f:
        for _ in range(64):
            f.write(b"x" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    print("fitted")
except OSError as e:
    print(errno.errorcode[e.errno])
finally:
    os.remove("/opt/sandboxd-packages/user/fill.bin")
st = os.statvfs("/opt/sandboxd-packages")
print(st.f_blocks * st.f_frsize)
`);
      const out = (await exec(a2, ["python3", fill])).stdout.trim().split("\n");
      expect(out[0]).toBe("ENOSPC");
      expect(Number(out[1])).toBeLessThanOrEqual(48 * 1024 * 1024);
      expect((await exec(b1, ["python3", importB])).exitCode).toBe(0);
    } finally {
      await stop(a2);
      await stop(b1);
    }
    expect(await mounted(keyA)).toBe(false);
    expect(await mounted(path.join(t.stateDir, "projects", projectKey(b), "packages"))).toBe(false);
  }, 180_000);
});
