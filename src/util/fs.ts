import { rename, unlink, writeFile } from "node:fs/promises";

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

/**
 * A JSON file rewritten whole, one write at a time and atomically (a temp file
 * renamed over it), mode 0600. Each write's caller gets that write's outcome;
 * a failed write does not stop the next one.
 */
export class JsonFileWriter {
  private saving: Promise<void> = Promise.resolve();

  constructor(readonly file: string) {}

  write(value: unknown): Promise<void> {
    const data = JSON.stringify(value, null, 2) + "\n";
    const next = this.saving.then(async () => {
      const tmp = `${this.file}.tmp`;
      await writeFile(tmp, data, { mode: 0o600 });
      await rename(tmp, this.file);
    });
    // the chain outlives a failed write; the caller of that write gets its rejection from `next`
    // eslint-disable-next-line no-restricted-syntax -- the rejection is delivered through `next`
    this.saving = next.catch(() => undefined);
    return next;
  }
}
