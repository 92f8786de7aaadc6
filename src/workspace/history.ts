/**
 * What the project was before the phase touched it, for the whole phase's
 * diff (`sandboxd diff --all`, GET /v1/phases/:id/diff?all=1). An accepted
 * iteration overwrites the project, so before it is applied the project's
 * version of every path it changes is kept — once per path, the first time
 * the phase changes it — in the phase's state dir:
 *
 *   <phase>/history/index.json   {paths: {rel: {existed, mode?, size?, blob?}}}
 *   <phase>/history/<sha256>     the bytes (content-addressed, 0600)
 *
 * Only paths the phase changed are kept, so the cost is in the size of its
 * iterations, not the project. Bytes are kept up to MAX_KEPT_BYTES per file
 * (the diff does not show larger files anyway); a larger file keeps its size
 * and mode, and the diff says it is too large to show. Reads never follow a
 * link (readRegular); a link or special file counts as absent, as in the
 * pending diff.
 */
import { createHash } from "node:crypto";
import { mkdir, readFile, rename, writeFile } from "node:fs/promises";
import path from "node:path";
import { z } from "zod";
import type { ChangeSet } from "./changes.js";
import { DEFAULT_DIFF_MAX_BYTES, type FileVersion } from "./diff.js";
import { readRegular } from "./layer.js";
import { lstat } from "node:fs/promises";

export const MAX_KEPT_BYTES = DEFAULT_DIFF_MAX_BYTES;

const entrySchema = z.object({
  existed: z.boolean(),
  mode: z.number().int().optional(),
  size: z.number().int().optional(),
  /** sha256 of the kept bytes; absent when the file was larger than MAX_KEPT_BYTES */
  blob: z.string().regex(/^[0-9a-f]{64}$/).optional(),
});
const indexSchema = z.object({ paths: z.record(entrySchema) });
type Entry = z.infer<typeof entrySchema>;

export class PhaseHistory {
  private index: Record<string, Entry> | null = null;

  constructor(private readonly dir: string) {}

  private get indexFile(): string {
    return path.join(this.dir, "index.json");
  }

  private async load(): Promise<Record<string, Entry>> {
    if (this.index) return this.index;
    try {
      this.index = indexSchema.parse(JSON.parse(await readFile(this.indexFile, "utf8"))).paths;
    } catch {
      this.index = {};
    }
    return this.index;
  }

  /** Paths the phase has changed in accepted iterations. */
  async paths(): Promise<string[]> {
    return Object.keys(await this.load());
  }

  /**
   * Before `set` is applied to `project`: keep the project's version of every
   * path it changes that the phase has not changed before.
   */
  async capture(set: ChangeSet, project: string): Promise<void> {
    const index = await this.load();
    const touched = new Set<string>();
    for (const c of set.changes) {
      if (c.isDir) continue;
      touched.add(c.path);
      if (c.kind === "rename" && c.from) touched.add(c.from);
    }
    let changed = false;
    for (const rel of touched) {
      if (index[rel]) continue;
      index[rel] = await this.keep(project, rel);
      changed = true;
    }
    if (!changed) return;
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    const tmp = `${this.indexFile}.tmp`;
    await writeFile(tmp, JSON.stringify({ paths: index }) + "\n", { mode: 0o600 });
    await rename(tmp, this.indexFile);
  }

  private async keep(project: string, rel: string): Promise<Entry> {
    const st = await lstat(path.join(project, rel)).catch(() => null);
    if (!st?.isFile()) return { existed: false };
    const bytes = await readRegular(project, rel, MAX_KEPT_BYTES + 1, null);
    if (bytes === null) return { existed: false };
    const mode = st.mode & 0o7777;
    if (bytes.length > MAX_KEPT_BYTES) return { existed: true, mode, size: st.size };
    const blob = createHash("sha256").update(bytes).digest("hex");
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    await writeFile(path.join(this.dir, blob), bytes, { mode: 0o600 });
    return { existed: true, mode, size: bytes.length, blob };
  }

  /**
   * The path as it was when the phase started: a kept version, `null` when it
   * did not exist, `undefined` when the phase never changed it in an
   * accepted iteration (then the project's version is still the start's).
   */
  async before(rel: string): Promise<FileVersion | null | undefined> {
    const e = (await this.load())[rel];
    if (!e) return undefined;
    if (!e.existed) return null;
    const size = e.size ?? 0;
    const blob = e.blob;
    return {
      size: blob ? size : Math.max(size, MAX_KEPT_BYTES + 1),
      ...(e.mode !== undefined ? { mode: e.mode } : {}),
      read: async () => (blob ? readFile(path.join(this.dir, blob)) : Buffer.alloc(0)),
    };
  }
}
