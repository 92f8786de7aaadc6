import { unlink } from "node:fs/promises";

/**
 * Removes a file that may not be there (a stale socket, a lock whose writer
 * died). Only "not there" is expected; any other failure is the caller's.
 */
export async function removeIfPresent(file: string): Promise<void> {
  try {
    await unlink(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
}
