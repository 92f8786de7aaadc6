/**
 * Append-only writer for a phase's build_audit.log.
 *
 * Appends are serialised through one promise chain and each is fdatasync'd
 * before the returned promise resolves: a caller that awaits `append` before
 * acting knows the record is on disk. The file is opened O_APPEND and never
 * truncated. (The hash-chained audit.jsonl arrives with the policy engine.)
 */
import { open, type FileHandle } from "node:fs/promises";

export class BuildLog {
  private handle: Promise<FileHandle>;
  private tail: Promise<void> = Promise.resolve();
  private closed = false;

  constructor(readonly path: string) {
    this.handle = open(path, "a", 0o600);
    // Surface an open failure on the first append, not as an unhandled rejection.
    this.handle.catch(() => undefined);
  }

  append(lines: readonly string[]): Promise<void> {
    if (this.closed) return Promise.reject(new Error(`audit log ${this.path} is closed`));
    const data = Buffer.from(lines.map((l) => `${l}\n`).join(""), "utf8");
    const next = this.tail.then(async () => {
      const fh = await this.handle;
      let off = 0;
      while (off < data.length) {
        const { bytesWritten } = await fh.write(data, off, data.length - off);
        off += bytesWritten;
      }
      await fh.datasync();
    });
    // Keep the chain alive after a failure; the failing caller still sees its own rejection.
    this.tail = next.catch(() => undefined);
    return next;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.tail;
    await (await this.handle.catch(() => null))?.close();
  }
}
