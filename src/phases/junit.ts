/**
 * pytest's real result: the daemon asks every command for a report at
 * `/tmp/.sandboxd-junit-<random>.xml` — `--junitxml=` in the PYTEST_ADDOPTS it
 * sets for every command (so a pytest inside a script, a command string or
 * `pytest.main()` writes one too; the name is reserved, neither `.env`, a
 * request nor a command string can set it), and again on the argv of a
 * pytest run directly (the last `--junitxml` wins over one of the agent's) —
 * and, when the command ends, reads the report back through the
 * container's root as the host sees it (/proc/<container pid>/root/tmp/…;
 * the daemon runs as root), then deletes it. Nothing is opened to the
 * command's uid: not the run dir (the control socket lives there), not the
 * project.
 *
 * The file is in a place the agent can write, so it is read as untrusted:
 * a random name; opened with O_NOFOLLOW (a symlink planted there would
 * otherwise be resolved against the HOST's root) and O_NONBLOCK (a FIFO
 * does not hang the daemon); a regular file only, at most 16 MiB; parsed by
 * a real XML parser without entity expansion (categorize.ts parseJunit).
 * A report that cannot be read leaves the counts unknown (null), never wrong.
 */
import { randomHex } from "../util/random.js";
import { closeSync, constants, fstatSync, openSync, readFile } from "node:fs";
import { unlink } from "node:fs/promises";
import { promisify } from "node:util";
import path from "node:path";
import { parseJunitReport, type JunitReport } from "./categorize.js";
import type { LivePhase, PhaseContext } from "./context.js";

const MAX_REPORT_BYTES = 16 * 1024 * 1024;
/** readFile of an open descriptor (fs/promises' readFile takes a path or a FileHandle) */
const readFd = promisify(readFile) as (fd: number, encoding: "utf8") => Promise<string>;

export interface JunitPath {
  name: string;
  inContainer: string;
}

export function junitPathFor(): JunitPath {
  const name = `.sandboxd-junit-${randomHex(12)}.xml`;
  return { name, inContainer: `/tmp/${name}` };
}

/** The variable every command gets (SANDBOXD's own: reserved in src/policy/env.ts). */
export function pytestAddopts(j: JunitPath): string {
  return `--junitxml=${j.inContainer}`;
}

export async function readJunit(ctx: PhaseContext, live: LivePhase, j: JunitPath): Promise<JunitReport | null> {
  const cid = live.record.containerId;
  if (!cid) return null;
  try {
    live.pid ??= await ctx.opts.runtime.containerPid(cid);
    const file = path.join("/proc", String(live.pid), "root", "tmp", j.name);
    // Opened synchronously: most commands run no pytest, and this answers their ENOENT without a
    // trip through the thread pool (on an idle machine each wakes two threads: a few percent of
    // `true`'s round trip). The path is in the container's /tmp, a tmpfs no command can mount over;
    // O_NONBLOCK keeps a FIFO from blocking and O_NOFOLLOW refuses a link.
    let fd: number;
    try {
      fd = openSync(file, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return null; // no pytest ran, or it wrote none (usage error, -p no:junitxml, killed)
      throw e;
    }
    try {
      const st = fstatSync(fd);
      if (!st.isFile()) throw new Error("the JUnit report is not a regular file");
      if (st.size > MAX_REPORT_BYTES) throw new Error(`the JUnit report is ${st.size} bytes, over ${MAX_REPORT_BYTES}`);
      const xml = await readFd(fd, "utf8");
      return parseJunitReport(xml);
    } finally {
      closeSync(fd);
      await unlink(file).catch((e: Error) => ctx.opts.log.warn({ phase: live.record.id, err: e.message }, "could not remove pytest's JUnit report"));
    }
  } catch (e) {
    ctx.opts.log.warn({ phase: live.record.id, err: (e as Error).message }, "pytest's JUnit report could not be read; its counts are unknown");
    return null;
  }
}
