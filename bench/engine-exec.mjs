/**
 * The API exec's baseline for bench/run.mjs (b): `true` through the Docker
 * Engine API's exec from a harness's own process, with dockerode (create,
 * start attached and read to its end, inspect for the exit code), each
 * timed here, in this process.
 *
 * It is a process of its own, driven over IPC ("run" → the milliseconds),
 * because loading dockerode into bench/run.mjs made that process's own
 * node:http stream reading in section (c) take 2.5 × the CPU (0.21 → 0.53
 * CPU-s per 200 MiB, measured by removing the import alone), which would
 * have measured the bench's consumer instead of the daemon.
 *
 *   node bench/engine-exec.mjs CONTAINER_ID   (forked by bench/run.mjs)
 */
import { performance } from "node:perf_hooks";
import Docker from "dockerode";

const container = new Docker().getContainer(process.argv[2]);

async function once() {
  const t0 = performance.now();
  const ex = await container.exec({ Cmd: ["true"], AttachStdout: true, AttachStderr: true });
  const stream = await ex.start({ hijack: true, stdin: false });
  await new Promise((resolve, reject) => {
    stream.on("end", resolve);
    stream.on("close", resolve);
    stream.on("error", reject);
    stream.resume();
  });
  const info = await ex.inspect();
  const ms = performance.now() - t0;
  if (info.ExitCode !== 0) throw new Error(`Engine API exec true exited ${info.ExitCode}`);
  return ms;
}

process.on("message", (m) => {
  if (m === "run") {
    once().then(
      (ms) => process.send({ ms }),
      (e) => process.send({ error: String(e?.message ?? e) }),
    );
  } else if (m === "exit") process.exit(0);
});
process.send({ ready: true });
