/**
 * The sandbox image against the real engine: an unchanged context is not
 * rebuilt, and the image holds the toolchain the agents' projects need.
 *
 * Builds under its own tag with a fixed stand-in shim, so it never replaces
 * the real sandboxd-sandbox:latest; the apt layer comes from the layer cache
 * whenever the real image was built first.
 */
import Docker from "dockerode";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  CONTEXT_HASH_LABEL,
  buildSandboxImage,
  contextHash,
  ensureBaseImage,
  findDebianMirror,
  ensureSandboxImage,
  imageStatus,
  type EnsureImageResult,
} from "../../src/runtime/image.js";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const dockerfileDir = path.join(repoRoot, "sandbox");
const TAG = "sandboxd-sandbox-test:image-it";

describe("contextHash", () => {
  const base = { dockerfile: Buffer.from("FROM x\n"), shim: Buffer.from("console.log(1)\n"), base: "debian:bookworm-slim" };

  it("is stable for the same inputs", () => {
    expect(contextHash(base)).toBe(contextHash({ ...base, shim: Buffer.from("console.log(1)\n") }));
  });

  it("changes when the shim bytes change", () => {
    expect(contextHash({ ...base, shim: Buffer.from("console.log(2)\n") })).not.toBe(contextHash(base));
  });

  it("changes when the Dockerfile or the base changes", () => {
    expect(contextHash({ ...base, dockerfile: Buffer.from("FROM y\n") })).not.toBe(contextHash(base));
    expect(contextHash({ ...base, base: "sandboxd-base:bookworm" })).not.toBe(contextHash(base));
  });

  it("does not let bytes move between parts unnoticed", () => {
    const a = contextHash({ dockerfile: "ab", shim: "c", base: "b" });
    const b = contextHash({ dockerfile: "a", shim: "bc", base: "b" });
    expect(a).not.toBe(b);
  });
});

describe("findDebianMirror", () => {
  async function withRoot(files: Record<string, string>, fn: (root: string) => Promise<void>): Promise<void> {
    const root = await mkdtemp(path.join(tmpdir(), "sandboxd-apt-root-"));
    try {
      for (const [rel, text] of Object.entries(files)) {
        await mkdir(path.dirname(path.join(root, rel)), { recursive: true });
        await writeFile(path.join(root, rel), text);
      }
      await fn(root);
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  }

  it("takes the deb822 entry serving bookworm, not the security archive", async () => {
    const sources = [
      "Types: deb",
      "URIs: http://security.example.org/debian-security",
      "Suites: bookworm-security",
      "Components: main",
      "",
      "Types: deb-src",
      "URIs: http://src.example.org/debian",
      "Suites: bookworm",
      "",
      "Types: deb",
      "URIs: http://mirror.example.org/debian",
      "Suites: bookworm bookworm-updates",
      "Components: main",
      "",
    ].join("\n");
    await withRoot({ "etc/apt/sources.list.d/debian.sources": sources }, async (root) => {
      expect(await findDebianMirror(root)).toBe("http://mirror.example.org/debian");
    });
  });

  it("skips disabled stanzas and reads one-line sources.list", async () => {
    await withRoot(
      {
        "etc/apt/sources.list.d/debian.sources": "Types: deb\nEnabled: no\nURIs: http://off.example.org/debian\nSuites: bookworm\n",
        "etc/apt/sources.list": "# comment\ndeb [signed-by=/k.gpg] http://legacy.example.org/debian bookworm main\n",
      },
      async (root) => {
        expect(await findDebianMirror(root)).toBe("http://legacy.example.org/debian");
      },
    );
  });

  it("falls back to any Debian archive when none lists the suite, and reports none when there is none", async () => {
    await withRoot({ "etc/apt/sources.list": "deb http://deb.example.org/debian trixie main\n" }, async (root) => {
      expect(await findDebianMirror(root)).toBe("http://deb.example.org/debian");
    });
    await withRoot({}, async (root) => {
      expect(await findDebianMirror(root)).toBeUndefined();
    });
  });
});

describe("sandbox image (real engine)", () => {
  const docker = new Docker();
  const lines: string[] = [];
  let workDir: string;
  let shimPath: string;
  let first: EnsureImageResult;

  beforeAll(async () => {
    workDir = await mkdtemp(path.join(tmpdir(), "sandboxd-image-it-"));
    shimPath = path.join(workDir, "shim.cjs");
    await writeFile(shimPath, "// stand-in shim for the image test\nprocess.exit(0);\n");
    first = await ensureSandboxImage(docker, { tag: TAG, dockerfileDir, shimBundlePath: shimPath, log: (l) => lines.push(l) });
  }, 1_200_000); // a bare machine makes the offline base and installs the toolchain first

  afterAll(async () => {
    await docker
      .getImage(TAG)
      .remove()
      .catch(() => {});
    if (workDir) await rm(workDir, { recursive: true, force: true });
  });

  it("labels the image with its context hash", async () => {
    const info = await docker.getImage(TAG).inspect();
    expect(info.Id).toBe(first.imageId);
    expect(info.Config.Labels?.[CONTEXT_HASH_LABEL]).toBe(first.hash);
    expect(await imageStatus(docker, TAG, first.hash)).toBe("current");
    expect(await imageStatus(docker, TAG, "0".repeat(64))).toBe("stale");
    expect(await imageStatus(docker, "sandboxd-no-such-image:nope", first.hash)).toBe("absent");
  });

  it("does not rebuild when nothing changed", async () => {
    const logged: string[] = [];
    const again = await ensureSandboxImage(docker, { tag: TAG, dockerfileDir, shimBundlePath: shimPath, log: (l) => logged.push(l) });
    expect(again.status).toBe("current");
    expect(again.built).toBe(false);
    expect(again.imageId).toBe(first.imageId);
    expect(logged).toEqual([]);
  });

  it("rebuilds only when the shim changes, reusing the toolchain layer", async () => {
    const changedDir = await mkdtemp(path.join(tmpdir(), "sandboxd-image-it-shim-"));
    const changedShim = path.join(changedDir, "shim.cjs");
    const changedTag = `${TAG}-changed`;
    try {
      await writeFile(changedShim, "// a different stand-in shim\nprocess.exit(0);\n");
      const logged: string[] = [];
      const r = await ensureSandboxImage(docker, {
        tag: changedTag,
        dockerfileDir,
        shimBundlePath: changedShim,
        log: (l) => logged.push(l),
      });
      expect(r.built).toBe(true);
      expect(r.hash).not.toBe(first.hash);
      expect(r.imageId).not.toBe(first.imageId);
      // The apt layer was a cache hit: apt-get never ran.
      const runStep = logged.findIndex((l) => /^Step \d+\/\d+ : RUN apt-get/.test(l));
      expect(runStep).toBeGreaterThanOrEqual(0);
      expect(logged[runStep + 1]).toMatch(/Using cache/);
    } finally {
      await docker
        .getImage(changedTag)
        .remove()
        .catch(() => {});
      await rm(changedDir, { recursive: true, force: true });
    }
  });

  it("a rebuild that moves its tag leaves the old image to another tag that names it", async () => {
    // the operator's own name for the image (here TAG, the first build) and sandboxd's tag on the same image
    const movedTag = `${TAG}-moved`;
    const changedDir = await mkdtemp(path.join(tmpdir(), "sandboxd-image-it-moved-"));
    try {
      const same = await ensureSandboxImage(docker, { tag: movedTag, dockerfileDir, shimBundlePath: shimPath, log: () => undefined });
      // the cache gives the same image: two tags, one id
      expect(same.imageId).toBe(first.imageId);
      const changedShim = path.join(changedDir, "shim.cjs");
      await writeFile(changedShim, "// the moved tag's new shim\nprocess.exit(0);\n");
      const moved = await ensureSandboxImage(docker, { tag: movedTag, dockerfileDir, shimBundlePath: changedShim, log: () => undefined });
      expect(moved.built).toBe(true);
      expect(moved.imageId).not.toBe(first.imageId);
      // the other tag still names the old image, which is still there
      const kept = await docker.getImage(TAG).inspect();
      expect(kept.Id).toBe(first.imageId);
    } finally {
      await docker
        .getImage(movedTag)
        .remove()
        .catch(() => {});
      await rm(changedDir, { recursive: true, force: true });
    }
  });

  it("reports a failing build step with the builder's message", async () => {
    const dir = await mkdtemp(path.join(tmpdir(), "sandboxd-image-it-bad-"));
    try {
      await writeFile(path.join(dir, "Dockerfile"), "ARG BASE\nFROM ${BASE}\nRUN exit 3\n");
      await expect(
        buildSandboxImage(docker, {
          tag: `${TAG}-bad`,
          base: first.base,
          dockerfileDir: dir,
          shimBundlePath: shimPath,
          log: () => {},
        }),
      ).rejects.toMatchObject({ code: "SBX_ERR_DOCKER", message: expect.stringMatching(/returned a non-zero code: 3/) });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("ensureBaseImage returns a base that exists locally", async () => {
    const base = await ensureBaseImage(docker, { log: () => {} });
    expect(base).toBe(first.base);
    await expect(docker.getImage(base).inspect()).resolves.toBeTruthy();
  });

  /** Run one command in a throwaway container from the test image; returns its exit code and output. */
  async function runInImage(cmd: string[]): Promise<{ code: number; output: string }> {
    const container = await docker.createContainer({
      Image: TAG,
      Entrypoint: cmd,
      Cmd: [],
      Tty: true, // raw logs, no stream multiplexing
      HostConfig: { NetworkMode: "none", AutoRemove: false },
    });
    try {
      await container.start();
      const { StatusCode } = (await container.wait()) as { StatusCode: number };
      const logs = (await container.logs({ stdout: true, stderr: true, follow: false })) as unknown as Buffer;
      return { code: StatusCode, output: logs.toString("utf8") };
    } finally {
      await container.remove({ force: true }).catch(() => {});
    }
  }

  const toolchain: [string, string[], RegExp?][] = [
    ["python modules", ["python3", "-c", "import pytest, pytest_cov, psycopg2, sqlalchemy; print('ok')"], /ok/],
    ["python alias", ["python", "--version"], /Python 3\./],
    ["pip", ["pip", "--version"]],
    ["pylint", ["pylint", "--version"]],
    ["mypy", ["mypy", "--version"]],
    ["black", ["black", "--version"]],
    ["isort", ["isort", "--version"]],
    ["pytest", ["pytest", "--version"]],
    ["psql", ["psql", "--version"], /PostgreSQL/],
    ["redis-cli", ["redis-cli", "--version"]],
    ["node", ["node", "--version"], /^v18\./],
    ["tini", ["tini", "--version"], /tini version/],
    ["ps", ["ps", "-o", "pid,comm"]],
  ];

  // One container runs every check (a container costs about a second here);
  // each check's exit code and output come back between markers.
  let toolchainResults: Map<string, { code: number; output: string }> | undefined;
  async function toolchainResult(name: string): Promise<{ code: number; output: string }> {
    if (toolchainResults === undefined) {
      const quote = (a: string): string => `'${a.replace(/'/g, `'\\''`)}'`;
      const script = toolchain
        .map(([n, cmd]) => `echo "@@begin ${n}"; ${cmd.map(quote).join(" ")} 2>&1; echo "@@end ${n} $?"`)
        .join("\n");
      const { code, output } = await runInImage(["/bin/sh", "-c", script]);
      expect(code, output).toBe(0);
      toolchainResults = new Map();
      const re = /@@begin (.+?)\r?\n([\s\S]*?)@@end \1 (\d+)/g;
      for (const m of output.matchAll(re)) {
        toolchainResults.set(m[1] ?? "", { code: Number(m[3]), output: m[2] ?? "" });
      }
    }
    const r = toolchainResults.get(name);
    if (r === undefined) throw new Error(`no result for ${name}`);
    return r;
  }

  it.each(toolchain)("contains %s", async (name, _cmd, expected) => {
    const { code, output } = await toolchainResult(name);
    expect(code, output).toBe(0);
    if (expected) expect(output.trim()).toMatch(expected);
  });

  it("runs the shim under tini in /workspace", async () => {
    const info = await docker.getImage(TAG).inspect();
    expect(info.Config.Entrypoint).toEqual(["/usr/bin/tini", "-g", "--", "node", "/opt/sandboxd/shim.cjs"]);
    expect(info.Config.WorkingDir).toBe("/workspace");
    const { code, output } = await runInImage(["sh", "-c", "test -f /opt/sandboxd/shim.cjs && pwd"]);
    expect(code, output).toBe(0);
    expect(output.trim()).toBe("/workspace");
  });
});
