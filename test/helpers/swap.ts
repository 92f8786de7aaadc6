/**
 * A folder swapped with another at its path, over and over, while a test
 * runs: the operator's `mv a a.old; mv a.new a` (or an exchange) landing
 * between two system calls of the daemon that read the same path. One
 * python3 process (standard library, ctypes) calls renameat2(RENAME_EXCHANGE)
 * in a loop: each call puts the one folder at the other's name, atomically.
 */
import { spawn } from "node:child_process";
import { rename, stat } from "node:fs/promises";
import path from "node:path";

const EXCHANGE_PY = [
  "import ctypes, os, signal, sys",
  "libc = ctypes.CDLL(None, use_errno=True)",
  "os.chdir(sys.argv[1])",
  "a, b = sys.argv[2].encode(), sys.argv[3].encode()",
  "stop = []",
  "signal.signal(signal.SIGTERM, lambda *_: stop.append(1))",
  "print('ready', flush=True)",
  "while not stop:",
  // AT_FDCWD, RENAME_EXCHANGE
  "    if libc.renameat2(-100, a, -100, b, 2) != 0: sys.exit('renameat2: errno %d' % ctypes.get_errno())",
].join("\n");

/**
 * Starts swapping `dir/a` and `dir/b`; the returned stop ends the swapping
 * and puts each folder back at its own name.
 */
export async function swapFolders(dir: string, a: string, b: string): Promise<() => Promise<void>> {
  const ino = (await stat(path.join(dir, a))).ino;
  const child = spawn("python3", ["-I", "-c", EXCHANGE_PY, dir, a, b], { stdio: ["ignore", "pipe", "inherit"] });
  const exited = new Promise<number | null>((resolve) => child.once("exit", resolve));
  await new Promise<void>((resolve, reject) => {
    child.stdout.once("data", () => resolve());
    void exited.then((code) => reject(new Error(`the folder swapper exited (${code}) before it was ready`)));
  });
  return async () => {
    child.kill("SIGTERM");
    const code = await exited;
    if (code !== 0) throw new Error(`the folder swapper failed (exit ${code})`);
    if ((await stat(path.join(dir, a))).ino !== ino) {
      const tmp = path.join(dir, `${a}.swap`);
      await rename(path.join(dir, a), tmp);
      await rename(path.join(dir, b), path.join(dir, a));
      await rename(tmp, path.join(dir, b));
    }
  };
}
