/**
 * On-disk state of phases: `<stateDir>/phases/<id>/` holds phase.json (the
 * record), token (the shim's secret, 0600), build_audit.log, container.log
 * (kept when the container is removed) and run/ (bind-mounted into the
 * container; 0700, so only the root-run shim can reach the socket in it).
 */
import { mkdir, readFile, readdir, rename, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { JsonFileWriter } from "../util/fs.js";
import { phaseRecordSchema, type PhaseRecord } from "./types.js";

/** In a warm pool's slot folder instead of phase.json (src/phases/pool.ts). */
export const SLOT_MARKER = "pool.json";

export class PhaseStore {
  readonly root: string;
  /** one serial writer per phase's failfast.json: concurrent commands' counts land in order */
  private readonly failFastWriters = new Map<string, JsonFileWriter>();

  constructor(stateDir: string) {
    this.root = path.join(stateDir, "phases");
  }

  dir(id: string): string {
    return path.join(this.root, id);
  }
  runDir(id: string): string {
    return path.join(this.dir(id), "run");
  }
  controlSocket(id: string): string {
    return path.join(this.runDir(id), "control.sock");
  }
  buildLogPath(id: string): string {
    return path.join(this.dir(id), "build_audit.log");
  }
  /** the project's .env as the daemon read it at phase start: never re-read from the project */
  dotenvPath(id: string): string {
    return path.join(this.dir(id), "dotenv");
  }
  iterationsPath(id: string): string {
    return path.join(this.dir(id), "iterations.json");
  }
  /** the fail-fast counters (failfast.ts FailFastSnapshot), so a re-adopted phase keeps them */
  failFastPath(id: string): string {
    return path.join(this.dir(id), "failfast.json");
  }

  saveFailFast(id: string, snapshot: unknown): Promise<void> {
    let w = this.failFastWriters.get(id);
    if (!w) this.failFastWriters.set(id, (w = new JsonFileWriter(this.failFastPath(id))));
    return w.write(snapshot);
  }

  /** The kept counters; null when none were kept (a phase of an older daemon, or one that never failed). */
  async loadFailFast(id: string): Promise<unknown> {
    try {
      return JSON.parse(await readFile(this.failFastPath(id), "utf8"));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw err;
    }
  }

  /** The phase ended: its writer goes (the file stays, with the last counts). */
  forgetFailFast(id: string): void {
    this.failFastWriters.delete(id);
  }

  containerLogPath(id: string): string {
    return path.join(this.dir(id), "container.log");
  }

  /**
   * The package disk's mount point of a warm pool's container (src/phases/pool.ts):
   * a shared mount point the project's disk is bound on at the claim.
   */
  packagesMountPoint(id: string): string {
    return path.join(this.dir(id), "pkg");
  }

  /**
   * A warm pool's slot: its folder, run dir and token, and pool.json in
   * place of phase.json (it is no phase until claimed; reconcile removes a
   * slot no phase claimed).
   */
  async createSlot(id: string, token: string, marker: Record<string, unknown>): Promise<void> {
    await mkdir(this.root, { recursive: true, mode: 0o700 });
    await mkdir(this.dir(id), { mode: 0o700 });
    await mkdir(this.runDir(id), { mode: 0o700 });
    await writeFile(path.join(this.dir(id), "token"), token, { mode: 0o600 });
    await writeFile(path.join(this.dir(id), SLOT_MARKER), JSON.stringify(marker) + "\n", { mode: 0o600 });
  }

  /** The folder is a warm pool's slot no phase claimed. */
  async isSlot(id: string): Promise<boolean> {
    return stat(path.join(this.dir(id), SLOT_MARKER)).then(
      () => true,
      () => false,
    );
  }

  /**
   * A phase that claimed a slot: the slot's folder (run dir, token, mounts)
   * becomes the phase's; its record is written first, then the marker goes.
   */
  async claimSlot(record: PhaseRecord): Promise<void> {
    await this.save(record);
    await rm(path.join(this.dir(record.id), SLOT_MARKER), { force: true });
  }

  async create(record: PhaseRecord, token: string): Promise<void> {
    await mkdir(this.root, { recursive: true, mode: 0o700 });
    await mkdir(this.dir(record.id), { mode: 0o700 });
    await mkdir(this.runDir(record.id), { mode: 0o700 });
    await writeFile(path.join(this.dir(record.id), "token"), token, { mode: 0o600 });
    await this.save(record);
  }

  /** Atomic replace, so a crash never leaves a half-written record. */
  async save(record: PhaseRecord): Promise<void> {
    const file = path.join(this.dir(record.id), "phase.json");
    const tmp = `${file}.tmp`;
    await writeFile(tmp, JSON.stringify(record, null, 2) + "\n", { mode: 0o600 });
    await rename(tmp, file);
  }

  reportPath(id: string): string {
    return path.join(this.dir(id), "report.json");
  }

  /** The phase report (report.ts), kept when the phase ends. */
  async saveReport(id: string, report: unknown): Promise<void> {
    const file = this.reportPath(id);
    await writeFile(`${file}.tmp`, JSON.stringify(report, null, 2) + "\n", { mode: 0o600 });
    await rename(`${file}.tmp`, file);
  }

  async loadReport(id: string): Promise<unknown> {
    return JSON.parse(await readFile(this.reportPath(id), "utf8"));
  }

  async token(id: string): Promise<string> {
    return (await readFile(path.join(this.dir(id), "token"), "utf8")).trim();
  }

  /**
   * Every readable record; unreadable ones are reported, not fatal. `unborn`:
   * folders with no phase.json at all — a daemon killed inside `create`,
   * before the record (written last, by rename) existed; nothing else of
   * such a phase was made or recorded.
   */
  async loadAll(): Promise<{ records: PhaseRecord[]; broken: Array<{ id: string; error: string }>; unborn: string[] }> {
    const records: PhaseRecord[] = [];
    const broken: Array<{ id: string; error: string }> = [];
    const unborn: string[] = [];
    let ids: string[];
    try {
      ids = await readdir(this.root);
    } catch {
      return { records, broken, unborn };
    }
    for (const id of ids) {
      try {
        const raw = JSON.parse(await readFile(path.join(this.dir(id), "phase.json"), "utf8"));
        records.push(phaseRecordSchema.parse(raw));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT") unborn.push(id);
        else broken.push({ id, error: (err as Error).message });
      }
    }
    return { records, broken, unborn };
  }

  /** For a phase whose start failed: nothing of it may stay behind. */
  async remove(id: string): Promise<void> {
    await rm(this.dir(id), { recursive: true, force: true });
  }

  /** The run dir is only needed while the container lives. */
  async removeRunDir(id: string): Promise<void> {
    await rm(this.runDir(id), { recursive: true, force: true });
  }
}
