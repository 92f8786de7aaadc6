/**
 * Container logs are read as a stream (issue 13 item 5): a real container of
 * the sandbox image writes 30,000 lines to stdout and stderr; DockerRuntime.logs
 * — what GET /v1/phases/:id/logs and the save at phase stop read — returns
 * every line, in order per stream, without blocking the event loop or
 * growing the heap with the log's size.
 */
import { monitorEventLoopDelay } from "node:perf_hooks";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DockerRuntime } from "../../src/runtime/docker.js";
import { TEST_IMAGE, docker, requireEngineAndImage } from "../helpers/sandbox.js";

const LINES = 30_000;
let id = "";

beforeAll(async () => {
  await requireEngineAndImage();
  const c = await docker.createContainer({
    Image: TEST_IMAGE,
    Entrypoint: ["python3", "-c", `import sys\nfor i in range(${LINES}):\n    print(f"out {i:06d} " + "x" * 60, flush=True)\n    if i % 10 == 0: print(f"err {i:06d}", file=sys.stderr, flush=True)`],
    Labels: { "sandboxd.test": "container-logs" },
    HostConfig: { NetworkMode: "none" },
  });
  id = c.id;
  await c.start();
  await c.wait();
}, 120_000);

afterAll(async () => {
  if (id) await docker.getContainer(id).remove({ force: true });
});

describe("DockerRuntime.logs", () => {
  it("streams a log of 30,000 lines whole, in order, with bounded memory and a responsive event loop", async () => {
    const runtime = new DockerRuntime();
    const delay = monitorEventLoopDelay({ resolution: 10 });
    delay.enable();
    const heapBefore = process.memoryUsage().heapUsed;
    let maxHeap = heapBefore;
    const stream = await runtime.logs(id, { follow: false });
    let out = 0;
    let err = 0;
    let lastOut = -1;
    let rest = "";
    let bytes = 0;
    for await (const chunk of stream) {
      bytes += (chunk as Buffer).length;
      const text = rest + (chunk as Buffer).toString("utf8");
      const lines = text.split("\n");
      rest = lines.pop()!;
      for (const l of lines) {
        if (l.startsWith("out ")) {
          const n = Number(l.slice(4, 10));
          expect(n).toBe(lastOut + 1);
          lastOut = n;
          out++;
        } else if (l.startsWith("err ")) err++;
      }
      maxHeap = Math.max(maxHeap, process.memoryUsage().heapUsed);
    }
    delay.disable();
    expect(rest).toBe("");
    expect(out).toBe(LINES);
    expect(err).toBe(LINES / 10);
    expect(bytes).toBeGreaterThan(LINES * 70);
    // the log is ~2.2 MB; reading it never holds more than a few chunks of it
    expect(maxHeap - heapBefore).toBeLessThan(64 * 1024 * 1024);
    expect(delay.max / 1e6).toBeLessThan(1_000);
  }, 60_000);

  it("a missing container is a coded error", async () => {
    await expect(new DockerRuntime().logs("0".repeat(64), { follow: false })).rejects.toMatchObject({ code: "SBX_ERR_DOCKER" });
  });
});
