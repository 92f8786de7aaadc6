/**
 * Standing approvals: a person's answer given once for many runs.
 *
 * A grant turns an `ask` verdict into `allow` — never a `forbid` (a command
 * with any forbidden part is refused before grants are looked at) — for:
 * - a scope: one phase (`phaseId`) or every phase of one project (`project`,
 *   an absolute directory);
 * - what: an exact argv, or a policy-style pattern (the tokens of a shell
 *   rule's `pattern`, matched by the same matcher: src/policy/evaluate.ts
 *   ruleMatches) that every asking part of the command must match;
 * - until it expires or a person revokes it.
 *
 * Bound to content like a one-shot approval (./binding.ts): an argv grant
 * records the SHA-256 of the files its command runs when it is granted, and
 * covers the command only while they are unchanged. A pattern grant cannot
 * know its files in advance: it pins each file's content the first time the
 * file runs under it, and covers it afterwards only while it is unchanged —
 * so an edited script asks again.
 *
 * Persisted like the queue (atomic replace, state dir `grants.json`),
 * validated with zod on load.
 */
import { randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { z } from "zod";
import { timestamp } from "../audit/format.js";
import { SandboxdError } from "../errors.js";
import { compileRule, ruleMatches, type Verdict } from "../policy/evaluate.js";
import { shellRuleSchema } from "../policy/schema.js";
import type { Clock } from "../util/clock.js";
import { changedFiles, fileBindingSchema, type FileBinding } from "./queue.js";
import { JsonFileWriter } from "../util/fs.js";

export const grantPatternSchema = shellRuleSchema.shape.pattern;

export const grantSchema = z
  .object({
    id: z.string().regex(/^gr_[0-9a-f]{12}$/),
    /** exactly one of phaseId / project is set */
    phaseId: z.string().nullable(),
    project: z.string().nullable(),
    /** exactly one of argv / pattern is set */
    argv: z.array(z.string()).nullable(),
    pattern: grantPatternSchema.nullable(),
    /** a longer timeout the person allows for commands it covers (over the mode's limit, within the policy's ceiling) */
    maxTimeoutMs: z.number().int().positive().nullable(),
    note: z.string().nullable(),
    grantedAt: z.string(),
    expiresAt: z.string(),
    revokedAt: z.string().nullable(),
    revokeNote: z.string().nullable(),
    /** argv grants: the files the command runs, hashed when granted */
    files: z.array(fileBindingSchema),
    /** pattern grants: each file's content the first time it ran under the grant */
    pinned: z.array(fileBindingSchema),
    uses: z.number().int().nonnegative(),
    lastUsedAt: z.string().nullable(),
  })
  .strict();
export type Grant = z.infer<typeof grantSchema>;

export interface GrantRequest {
  phaseId?: string | undefined;
  project?: string | undefined;
  argv?: string[] | undefined;
  pattern?: z.infer<typeof grantPatternSchema> | undefined;
  expiresInMs: number;
  maxTimeoutMs?: number | undefined;
  note?: string | undefined;
}

/** Where a command runs: a grant of this phase or of its project may cover it. */
export interface GrantScope {
  phaseId: string;
  project: string;
}

function sameArgv(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

export class GrantStore {
  private items: Grant[] = [];

  /** the state dir file, rewritten whole at each change */
  private readonly writer: JsonFileWriter;

  constructor(
    private readonly file: string,
    private readonly clock: Clock,
    private readonly newId: () => string = () => `gr_${randomBytes(6).toString("hex")}`,
  ) {
    this.writer = new JsonFileWriter(file);
  }

  static async open(stateDir: string, clock: Clock): Promise<GrantStore> {
    const g = new GrantStore(path.join(stateDir, "grants.json"), clock);
    try {
      g.items = z.array(grantSchema).parse(JSON.parse(await readFile(g.file, "utf8")) as unknown);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") {
        throw new SandboxdError("SBX_ERR_CONFIG", `grants file ${g.file} is unreadable: ${(err as Error).message}`, {
          hint: "move the file aside to start with no standing approvals (the grants in it are then lost)",
        });
      }
    }
    return g;
  }

  private active(g: Grant): boolean {
    return g.revokedAt === null && Date.parse(g.expiresAt) > this.clock.now().getTime();
  }

  list(opts: { all?: boolean } = {}): Grant[] {
    return this.items.filter((g) => opts.all || this.active(g));
  }

  get(id: string): Grant {
    const g = this.items.find((x) => x.id === id);
    if (!g) throw new SandboxdError("SBX_ERR_GRANT_NOT_FOUND", `no standing approval with id ${id}`);
    return g;
  }

  async grant(req: GrantRequest, files: readonly FileBinding[]): Promise<Grant> {
    const now = this.clock.now();
    const g: Grant = {
      id: this.newId(),
      phaseId: req.phaseId ?? null,
      project: req.phaseId ? null : (req.project ?? null),
      argv: req.argv ?? null,
      pattern: req.argv ? null : (req.pattern ?? null),
      maxTimeoutMs: req.maxTimeoutMs ?? null,
      note: req.note ?? null,
      grantedAt: timestamp(now),
      expiresAt: new Date(now.getTime() + req.expiresInMs).toISOString(),
      revokedAt: null,
      revokeNote: null,
      files: req.argv ? [...files] : [],
      pinned: [],
      uses: 0,
      lastUsedAt: null,
    };
    if (g.pattern) compileRule({ id: g.id, clause: "grant", decision: "allow", justification: "grant", pattern: g.pattern }); // throws on a bad token
    this.items.push(g);
    await this.save();
    return g;
  }

  async revoke(id: string, note?: string): Promise<Grant> {
    const g = this.get(id);
    if (g.revokedAt !== null) throw new SandboxdError("SBX_ERR_GRANT_NOT_FOUND", `standing approval ${id} was already revoked (${g.revokedAt})`);
    g.revokedAt = timestamp(this.clock.now());
    g.revokeNote = note ?? null;
    await this.save();
    return g;
  }

  /**
   * The active grant that covers an `ask` verdict for this command where it
   * runs, with these files: every asking part matches (the argv exactly, or
   * the pattern) and the bound files are unchanged. `timeoutMs` over the
   * mode's limit needs a grant allowing it. Not marked used (see `use`).
   */
  covering(scope: GrantScope, verdict: Verdict, files: readonly FileBinding[], timeoutMs?: number): Grant | null {
    if (verdict.decision !== "ask") return null;
    const asking = verdict.parts.filter((p) => p.decision === "ask");
    for (const g of this.items) {
      if (!this.active(g)) continue;
      if (g.phaseId !== null ? g.phaseId !== scope.phaseId : g.project !== scope.project) continue;
      if (timeoutMs !== undefined && (g.maxTimeoutMs === null || timeoutMs > g.maxTimeoutMs)) continue;
      if (!this.covers(g, asking.map((p) => p.argv), files)) continue;
      return g;
    }
    return null;
  }

  private covers(g: Grant, argvs: readonly string[][], files: readonly FileBinding[]): boolean {
    if (argvs.length === 0) return false;
    if (g.argv) return argvs.every((a) => sameArgv(a, g.argv!)) && changedFiles(g.files, files).length === 0;
    const rule = compileRule({ id: g.id, clause: "grant", decision: "allow", justification: "grant", pattern: g.pattern! });
    if (!argvs.every((a) => ruleMatches(rule, a))) return false;
    const pinned = new Map(g.pinned.map((f) => [f.path, f.sha256]));
    return files.every((f) => !pinned.has(f.path) || pinned.get(f.path) === f.sha256);
  }

  /** A grant covered a command: counted, and a pattern grant pins the files it ran for the first time. */
  async use(id: string, files: readonly FileBinding[]): Promise<Grant> {
    const g = this.get(id);
    g.uses++;
    g.lastUsedAt = timestamp(this.clock.now());
    if (g.pattern) for (const f of files) if (!g.pinned.some((p) => p.path === f.path)) g.pinned.push(f);
    await this.save();
    return g;
  }

  private save(): Promise<void> {
    return this.writer.write(this.items);
  }
}
