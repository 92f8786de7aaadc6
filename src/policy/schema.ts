/**
 * The shape of a policy file (policies/*.yaml), validated with zod once when
 * the policy loads, and the frozen Policy the rest of the daemon works with.
 *
 * Every object is strict: an unknown key is an error, not something ignored,
 * so a misspelt `not_mach:` cannot silently drop a rule's self-test. Ceilings
 * that SKILLS.md states as numbers (5-minute timeout, 10 MB files, 30 s
 * queries, 2 files per iteration, 3 attempts) are part of the schema: no
 * policy file can go beyond them.
 *
 * Sizes may be written as numbers (bytes) or with a unit ("10MiB", "64KiB",
 * "2GiB"); durations as numbers (ms) or with a unit ("60s", "5m", "2000ms").
 */
import { z } from "zod";
import type { PhaseMode } from "../domain.js";
import type { PhaseLimits } from "./limits.js";

export const DECISIONS = ["allow", "ask", "forbid"] as const;
export type Decision = (typeof DECISIONS)[number];

/** forbid > ask > allow: when several rules match, the highest rank wins. */
export const DECISION_RANK: Readonly<Record<Decision, number>> = Object.freeze({ allow: 0, ask: 1, forbid: 2 });

export const ERROR_CATEGORIES = ["syntax", "import", "type", "test", "runtime", "database"] as const;
export type ErrorCategory = (typeof ERROR_CATEGORIES)[number];

const MiB = 1024 * 1024;

/* ------------------------------ scalars -------------------------------- */

const idSchema = z
  .string()
  .regex(/^[a-z][a-z0-9-]*(\.[a-z0-9][a-z0-9-]*)+$/, 'must be a dotted lower-case id such as "shell.forbidden.dd"');

const clauseSchema = z
  .string()
  .regex(/^SKILLS\.md \S/, 'must name the SKILLS.md clause it enforces, starting with "SKILLS.md " (e.g. "SKILLS.md §2 …")');

const decisionSchema = z.enum(DECISIONS);

const justificationSchema = z.string().min(10, "say why, and what to do instead (at least 10 characters)");

const SIZE_UNITS: Record<string, number> = { B: 1, KiB: 1024, MiB, GiB: 1024 * MiB, KB: 1000, MB: 1000_000, GB: 1000_000_000 };
const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, min: 60_000, h: 3_600_000 };

function quantity(units: Record<string, number>, what: string, example: string) {
  return z.unknown().transform((v, ctx): number => {
    let n: number | undefined;
    if (typeof v === "number") n = v;
    else if (typeof v === "string") {
      const m = /^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)?\s*$/.exec(v);
      const unit = m?.[2] ?? "";
      const factor = unit === "" ? 1 : units[unit];
      if (m && factor !== undefined) n = Math.round(Number(m[1]) * factor);
    }
    if (n === undefined || !Number.isSafeInteger(n) || n < 0) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        message: `expected ${what}: a whole number or a string such as "${example}" (units: ${Object.keys(units).join(", ")}); got ${JSON.stringify(v)}`,
      });
      return z.NEVER;
    }
    return n;
  });
}

const bytes = () => quantity(SIZE_UNITS, "a size", "10MiB");
const millis = () => quantity(DURATION_UNITS, "a duration", "60s");

function atMost(schema: z.ZodType<number, z.ZodTypeDef, unknown>, max: number, why: string) {
  return schema.refine((n) => n <= max, { message: `at most ${max} (${why})` });
}

/* ----------------------------- shell rules ------------------------------ */

const flagSchema = z
  .string()
  .regex(/^--?[A-Za-z0-9][A-Za-z0-9-]*$/, 'a flag such as "-r" or "--recursive"');

/**
 * The argument matchers a token may use (a small, closed set):
 * - {flag: ["-r", "--recursive"]}: "-r" matches the argument -r and any
 *   cluster of short flags containing r (-rf, -fr); "--recursive" matches
 *   --recursive and --recursive=…; a longer single-dash flag ("-delete")
 *   matches exactly;
 * - {prefix: "mkfs."}: an argument starting with the text;
 * - {contains: "/"}: an argument containing the text;
 * - {not: [up, down]}: any argument except these words.
 */
const matcherSchema = z.union(
  [
    z.object({ flag: z.array(flagSchema).min(1) }).strict(),
    z.object({ prefix: z.string().min(1) }).strict(),
    z.object({ contains: z.string().min(1) }).strict(),
    z.object({ not: z.array(z.string().min(1)).min(1) }).strict(),
  ],
  {
    errorMap: () => ({
      message: 'expected a matcher: {flag: ["-r", "--long"]}, {prefix: "…"}, {contains: "…"} or {not: [words]}',
    }),
  },
);
export type MatcherSpec = z.infer<typeof matcherSchema>;

const atomSchema = z.union([z.string().min(1, "a word cannot be empty"), matcherSchema]);
export type AtomSpec = z.infer<typeof atomSchema>;

/** a word, a matcher, or a list of alternatives (words and matchers) */
const tokenSchema = z.union([atomSchema, z.array(atomSchema).min(1, "a list of alternatives cannot be empty")]);
export type TokenSpec = z.infer<typeof tokenSchema>;

/** An example command: an argv list, or a string split at blanks (no quoting; use a list for arguments with spaces). */
const exampleSchema = z.union([
  z.array(z.string()).min(1, "an example argv cannot be empty"),
  z
    .string()
    .refine((s) => s.trim() !== "", "an example cannot be empty")
    .transform((s) => s.trim().split(/\s+/)),
]);

export const shellRuleSchema = z
  .object({
    id: idSchema,
    clause: clauseSchema,
    decision: decisionSchema,
    justification: justificationSchema,
    /** argv prefix: token 0 matches the program (as given, or its file name), the rest the following arguments */
    pattern: z.array(tokenSchema).min(1, "a pattern needs at least the program"),
    /** additionally, some argument after the program must match this token */
    anyArg: tokenSchema.optional(),
    /**
     * match the pattern's tokens after the program against positional
     * arguments only: words starting with "-" are skipped, and so is the word
     * after an option listed in withValue (`-f x.yml`)
     */
    skipOptions: z.object({ withValue: z.array(flagSchema) }).strict().optional(),
    match: z.array(exampleSchema).optional(),
    not_match: z.array(exampleSchema).optional(),
  })
  .strict();
export type ShellRuleSpec = z.infer<typeof shellRuleSchema>;

/* -------------------------------- limits -------------------------------- */

const limitFields = {
  memoryBytes: bytes(),
  cpus: z.number().positive(),
  pidsLimit: z.number().int().positive(),
  // a safety cap only (RLIMIT_FSIZE on every process, /tmp and pip's installs included):
  // SKILLS.md's 10 MB is judged on project files at each checkpoint (src/workspace)
  fileSizeBytes: atMost(bytes(), 4 * 1024 * MiB, "a per-process safety cap within the phase's disk budget"),
  tmpfsBytes: bytes(),
  defaultTimeoutMs: millis(),
  maxTimeoutMs: atMost(millis(), 300_000, "SKILLS.md §2 Execution Timeouts: up to 5 minutes"),
  killGraceMs: millis(),
  outputCapBytes: bytes(),
  auditOutputCapBytes: bytes(),
  // SKILLS.md Resource Limits — Memory ">1GB sustained → escalate" (src/phases/resources.ts);
  // optional, with the defaults of MEMORY_WATCH_DEFAULTS, so older policy files still load
  memoryEscalateBytes: bytes().optional(),
  memorySustainMs: millis().optional(),
};

const limitsSchema = z
  .object({
    /** limits for every mode */
    default: z.object(limitFields).strict(),
    /** per-mode differences */
    modes: z
      .object({
        backtest: z.object(limitFields).partial().strict().optional(),
        paper: z.object(limitFields).partial().strict().optional(),
        test: z.object(limitFields).partial().strict().optional(),
      })
      .strict()
      .optional(),
  })
  .strict();

/* --------------------------------- audit -------------------------------- */

/**
 * How much a phase may add to the audit trail (docs/AUDIT.md "Volume").
 * Optional: without it, DEFAULT_AUDIT.
 */
const auditSchema = z
  .object({
    /** untrusted text kept per field (command lines, SQL, error text); longer text keeps its head, byte count and SHA-256 */
    textCapBytes: atMost(bytes(), 1 * MiB, "at most 1MiB: a larger cap does not bound the trail"),
    phaseBudget: z
      .object({
        /** bytes one phase may add to audit.jsonl and build_audit.log together */
        bytes: bytes(),
        /** records per second one phase may sustain (averaged over burstRecords / recordsPerSecond seconds) */
        recordsPerSecond: z.number().int().positive(),
        /** records one phase may make at once above that rate */
        burstRecords: z.number().int().positive(),
      })
      .strict(),
    buildLog: z
      .object({
        /** build_audit.log is renamed to build_audit.log.1 (and older ones shifted) when an append would pass this size */
        rotateBytes: bytes(),
        /** rotated files kept: build_audit.log.1 … .N */
        keep: z.number().int().min(1).max(20),
      })
      .strict(),
  })
  .strict();
export type AuditPolicy = z.infer<typeof auditSchema>;

export const DEFAULT_AUDIT: AuditPolicy = {
  textCapBytes: 16 * 1024,
  phaseBudget: { bytes: 256 * MiB, recordsPerSecond: 500, burstRecords: 5000 },
  buildLog: { rotateBytes: 16 * MiB, keep: 3 },
};

/* ---------------------- fail-fast, files, database ---------------------- */

const attempts = z.number().int().min(1).max(3, "at most 3 (SKILLS.md Fail-Fast Protocol: 3 consecutive attempts)");

/**
 * SKILLS.md Fail-Fast Protocol as the supervisor runs it (src/phases/failfast.ts):
 * consecutive failures per category against maxAttempts, and across
 * categories against `consecutive` ("3 consecutive self-correction
 * attempts"). The keys added after the first format are optional, with the
 * defaults of FAIL_FAST_DEFAULTS, so older policy files still load.
 */
const failFastSchema = z
  .object({
    clause: clauseSchema,
    maxAttempts: z
      .object({
        syntax: attempts,
        import: attempts,
        type: attempts,
        test: attempts,
        runtime: attempts,
        database: attempts,
        /** iterations refused at a checkpoint (workspace rules) */
        iteration: attempts.optional(),
        /** commands the policy refused; only counted when countPolicyRefusals is true */
        policy: attempts.optional(),
      })
      .strict(),
    /** consecutive failed attempts of any category before escalation (SKILLS.md Core Principles: 3) */
    consecutive: attempts.optional(),
    /** whether a policy refusal counts as a failed attempt (default false: the refusal already stopped the command) */
    countPolicyRefusals: z.boolean().optional(),
    /** whether pytest's "no tests collected" (exit 5) is a `test` failure (default true: SKILLS.md "pytest non-zero exit code") */
    noTestsIsFailure: z.boolean().optional(),
  })
  .strict();

export const FAIL_FAST_DEFAULTS = { iteration: 3, policy: 3, consecutive: 3, countPolicyRefusals: false, noTestsIsFailure: true } as const;

/* ------------------------------ workspace ------------------------------ */

/** What a checkpoint does with an iteration's change set: apply it, hold it for a human, or discard it. */
export const WORKSPACE_DECISIONS = ["accept", "ask", "reject"] as const;
export type WorkspaceDecision = (typeof WORKSPACE_DECISIONS)[number];
/** reject > ask > accept: the strictest failure decides the iteration. */
export const WORKSPACE_DECISION_RANK: Readonly<Record<WorkspaceDecision, number>> = Object.freeze({ accept: 0, ask: 1, reject: 2 });

export const WORKSPACE_OPERATIONS = ["create", "modify", "delete", "rename"] as const;
export type WorkspaceOperation = (typeof WORKSPACE_OPERATIONS)[number];

/** Permissions a phase can be started with (`sandboxd phase start --allow main.py`); a closed list, so a typo is an error. */
export const PHASE_PERMISSIONS = ["main.py"] as const;
export type PhasePermission = (typeof PHASE_PERMISSIONS)[number];

/** A project-relative path as the change set carries it: POSIX, no leading "/" or "./", no "." or ".." segment, no NUL. */
export const projectPathSchema = z
  .string()
  .min(1, "a path cannot be empty")
  .refine((s) => !s.includes("\0") && s.split("/").every((seg) => seg !== "" && seg !== "." && seg !== ".."), {
    message: 'a project-relative POSIX path such as "services/risk_manager.py" (no leading "/" or "./", no "." or ".." segment, no "//")',
  });

/**
 * A project-relative glob: `*` any characters within one segment (dot files
 * included), `?` one character, `**` any number of whole segments. `dir/**`
 * covers the directory itself and everything below it. Checked by
 * compileGlob (src/policy/workspace.ts) at load.
 */
const globSchema = z.string().min(1, "a glob cannot be empty");

/**
 * One side of a coupling pattern: a glob that may also hold placeholders:
 * `{name}` (one or more characters within a segment) and `{name**}/` (zero or
 * more whole leading directories). A placeholder named on both sides must
 * take the same value in both paths. Checked by compileTemplate at load.
 */
const templateSchema = z.string().min(1, "a template cannot be empty");

const pathPairSchema = z.tuple([projectPathSchema, projectPathSchema]);

const workspaceDecisionSchema = z.enum(WORKSPACE_DECISIONS);
const failDecisionSchema = z.enum(["ask", "reject"]);

const couplingPatternSchema = z
  .object({
    id: idSchema,
    clause: clauseSchema,
    justification: justificationSchema,
    /** the two templates; a pair of changed files is coupled when one matches each side with equal placeholders */
    between: z.tuple([templateSchema, templateSchema]),
    /** pairs this pattern must couple (checked at load) */
    couples: z.array(pathPairSchema).min(1, "give at least one pair of paths this pattern couples"),
    /** pairs this pattern must not couple (checked at load) */
    notCouples: z.array(pathPairSchema).optional(),
  })
  .strict();
export type CouplingPattern = z.infer<typeof couplingPatternSchema>;

const operationDecisionsSchema = z
  .object({ create: workspaceDecisionSchema, modify: workspaceDecisionSchema, delete: workspaceDecisionSchema, rename: workspaceDecisionSchema })
  .strict();

/**
 * How a protected path is treated:
 * - hidden: not visible in the sandbox at all; any change is refused (no approval can lift it);
 * - readOnly: visible, never changed from the sandbox; any change is refused;
 * - per operation: the decision for a create, modify, delete and rename of a path under it.
 */
const treatmentSchema = z.union([z.literal("hidden"), z.literal("readOnly"), operationDecisionsSchema], {
  errorMap: () => ({ message: "expected hidden, readOnly or {create, modify, delete, rename: accept | ask | reject}" }),
});
export type ProtectedTreatment = z.infer<typeof treatmentSchema>;

const protectedPathSchema = z
  .object({
    id: idSchema,
    clause: clauseSchema,
    justification: justificationSchema,
    paths: z.array(globSchema).min(1, "list at least one glob"),
    /** globs under `paths` this rule does not cover (.env.example next to .env) */
    except: z.array(globSchema).optional(),
    treatment: treatmentSchema,
    /** a human's approval of the exact path (approvedPaths) lifts an ask or reject of this rule; never for hidden or readOnly */
    approvable: z.boolean().optional(),
    /** the rule does not apply in a phase started with this permission (`--allow main.py`) */
    unlessPermission: z.enum(PHASE_PERMISSIONS).optional(),
    /** paths this rule must cover, and paths it must not (checked at load) */
    covers: z.array(projectPathSchema).min(1, "give at least one path this rule covers"),
    notCovers: z.array(projectPathSchema).optional(),
  })
  .strict()
  .superRefine((r, ctx) => {
    if (r.approvable && typeof r.treatment === "string") {
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ["approvable"], message: `a ${r.treatment} path is never changed from the sandbox; no approval can lift it (drop approvable or give per-operation decisions)` });
    }
  });
export type ProtectedPathRule = z.infer<typeof protectedPathSchema>;

const VALIDATION_PROGRAM = /^[A-Za-z0-9][A-Za-z0-9._+-]*$/;

export const workspaceSchema = z
  .object({
    /**
     * What a failing iteration becomes: reject (discarded at once) or ask (it
     * waits for a human who sees its diff). Hidden and read-only paths and
     * Python that does not compile are refused either way.
     */
    failedIteration: z.object({ id: idSchema, clause: clauseSchema, decision: failDecisionSchema, justification: justificationSchema }).strict(),
    atomicModification: z
      .object({
        id: idSchema,
        clause: clauseSchema,
        maxFilesPerIteration: z.number().int().min(1).max(2, "at most 2 (SKILLS.md §1 Atomic Modification Rule)"),
        decision: failDecisionSchema,
        justification: justificationSchema,
      })
      .strict(),
    coupling: z
      .object({
        id: idSchema,
        clause: clauseSchema,
        patterns: z.array(couplingPatternSchema),
        /** pairs no pattern may couple (SKILLS.md "Not considered coupled"; checked at load against every pattern) */
        notCoupled: z.array(pathPairSchema),
      })
      .strict(),
    maxFileBytes: z
      .object({
        id: idSchema,
        clause: clauseSchema,
        value: atMost(bytes(), 10 * MiB, "SKILLS.md Resource Limits: no files larger than 10MB"),
        decision: failDecisionSchema,
        /** a human's approval of the exact path lifts it */
        approvable: z.boolean(),
        justification: justificationSchema,
      })
      .strict(),
    massChange: z
      .object({
        id: idSchema,
        clause: clauseSchema,
        /** more changed files than this under one directory (at any depth; the project root excluded) is a mass change */
        maxFilesPerDirectory: z.number().int().min(1),
        /** the decision for deleting or renaming a whole directory */
        directoryDelete: failDecisionSchema,
        directoryRename: failDecisionSchema,
        decision: failDecisionSchema,
        justification: justificationSchema,
      })
      .strict(),
    protectedPaths: z.array(protectedPathSchema),
    pythonCompile: z
      .object({
        id: idSchema,
        clause: clauseSchema,
        /** a changed file matching one of these globs must compile */
        paths: z.array(globSchema).min(1),
        justification: justificationSchema,
      })
      .strict(),
    checkpointBeforeValidation: z
      .object({
        id: idSchema,
        clause: clauseSchema,
        value: z.boolean(),
        /** programs (by file name) before which the daemon checkpoints */
        programs: z.array(z.string().regex(VALIDATION_PROGRAM, "a program name such as pytest")),
      })
      .strict(),
    disk: z
      .object({
        id: idSchema,
        clause: clauseSchema,
        /** the phase's change layer */
        layerBytes: bytes(),
        /** the phase's /tmp */
        tmpBytes: bytes(),
        /** the project's package environment (pip's user site and cache), kept across its phases (src/workspace/packages.ts); 1GiB when absent */
        packagesBytes: bytes().optional(),
      })
      .strict(),
  })
  .strict();
export type WorkspaceFile = z.infer<typeof workspaceSchema>;

/**
 * The workspace section as the daemon uses it. A combined policy keeps every
 * layer's coupling patterns: a pair is coupled only if it is coupled under
 * every layer, so a phase policy can drop couplings but never add one.
 */
export interface WorkspacePolicy extends Omit<WorkspaceFile, "coupling"> {
  coupling: {
    id: string;
    clause: string;
    layers: ReadonlyArray<readonly CouplingPattern[]>;
  };
}

const sqlName = z.string().regex(/^[a-z_][a-z0-9_]*$/, "a lower-case SQL name");

const databaseSchema = z
  .object({
    readOnlyDefault: z
      .object({
        id: idSchema,
        clause: clauseSchema,
        value: z.literal(true, { errorMap: () => ({ message: "must be true (SKILLS.md §3: all queries are SELECT by default)" }) }),
        /** writes allowed only against the database named by this variable (test-only environments) */
        testDatabaseEnv: z.string().regex(/^[A-Z_][A-Z0-9_]*$/, "an environment variable name"),
        /** in paper mode, writes only to tables with this prefix */
        paperTablePrefix: sqlName,
      })
      .strict(),
    statementTimeoutMs: z
      .object({
        id: idSchema,
        clause: clauseSchema,
        value: atMost(millis(), 30_000, "SKILLS.md §3 Connection Management: maximum query timeout 30 seconds"),
      })
      .strict(),
    deniedFunctions: z
      .object({
        id: idSchema,
        clause: clauseSchema,
        decision: decisionSchema,
        /** denied on top of the gateway's built-in list (src/db/classify.ts DEFAULT_SQL_RULES) */
        functions: z.array(sqlName).min(1),
        /**
         * Built-in denials this policy lifts, by exact name (e.g. pg_sleep, so
         * that a test can show the 30 s statement timeout at work). Only a
         * policy that lists a name lifts it; a phase policy cannot lift what
         * the daemon's does not.
         */
        allow: z.array(sqlName).optional(),
      })
      .strict(),
    alphaMarkers: z
      .object({
        id: idSchema,
        clause: clauseSchema,
        decision: decisionSchema,
        /** statistical functions used for parameter tuning */
        functions: z.array(sqlName),
        /** tables that may not be joined with each other */
        joins: z.array(z.tuple([sqlName, sqlName])),
      })
      .strict(),
    schemaChanges: z
      .object({
        id: idSchema,
        clause: clauseSchema,
        decision: z.enum(["ask", "forbid"]),
        /** statement kinds, as the SQL gateway classifies them (e.g. drop-table) */
        statements: z.array(z.string().regex(/^[a-z][a-z-]*$/, "a statement kind such as drop-table")).min(1),
      })
      .strict(),
  })
  .strict();

/* -------------------------------- network ------------------------------- */

/** The services sandboxd knows how to find (src/net/services.ts resolves their upstreams from .env). */
export const NETWORK_SERVICES = ["postgres", "questdb-pg", "questdb-http", "redis"] as const;

/** A DNS host name as the proxy compares it: lower-case labels, no trailing dot, not all digits (never an IP literal). */
const hostNameSchema = z
  .string()
  .max(253)
  .regex(
    /^(?=.*[a-z-])[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/,
    "a lower-case DNS host name such as pypi.org (no trailing dot, no IP address)",
  )
  .refine((s) => !/^[0-9.]+$/.test(s.split(".").pop() ?? ""), "the last label cannot be all digits (write an IP address as a pin, not a name)");

const ipAddressSchema = z.string().ip({ message: "an IPv4 or IPv6 address" });

const portSchema = z.number().int().min(1).max(65535);

/**
 * SKILLS.md Network Boundaries, "Exception: Package downloads via pip from
 * PyPI only": the hosts pip may reach through the daemon's allow-list proxy
 * (src/net/proxy.ts). The proxy resolves each name itself and refuses
 * private, loopback and link-local addresses; `pin` is the operator's
 * choice of where a name really is (a local mirror), and bypasses that
 * check for that name only.
 */
const packageIndexSchema = z
  .object({
    id: idSchema,
    clause: clauseSchema,
    /** the proxy's port inside the sandbox (127.0.0.1) */
    port: portSchema,
    /** PIP_INDEX_URL inside the sandbox; its host must be one of `hosts` */
    indexUrl: z.string().url("an https:// URL such as https://pypi.org/simple"),
    hosts: z
      .array(
        z
          .object({
            name: hostNameSchema,
            /** the port the sandbox may CONNECT to (default 443) */
            port: portSchema.default(443),
            /** where the daemon dials instead of resolving the name (a local mirror) */
            pin: z.object({ address: ipAddressSchema, port: portSchema }).strict().optional(),
          })
          .strict(),
      )
      .min(1, "list at least one host (leave packageIndex out to give pip no index)"),
    justification: justificationSchema,
  })
  .strict()
  .superRefine((p, ctx) => {
    const seen = new Set<string>();
    for (const [i, h] of p.hosts.entries()) {
      if (seen.has(h.name)) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ["hosts", i, "name"], message: `host ${h.name} is listed twice` });
      seen.add(h.name);
    }
    let url: URL | null = null;
    try {
      url = new URL(p.indexUrl);
    } catch {
      return; // reported by .url()
    }
    if (url.protocol !== "https:") {
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ["indexUrl"], message: "must be https:// (the proxy carries TLS only, by CONNECT)" });
    } else if (!p.hosts.some((h) => h.name === url.hostname && h.port === Number(url.port || 443))) {
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ["indexUrl"], message: `host ${url.host} is not among hosts (with its port)` });
    }
  });
export type PackageIndexPolicy = z.infer<typeof packageIndexSchema>;
export type PackageIndexHost = PackageIndexPolicy["hosts"][number];

const networkSchema = z
  .object({
    clause: clauseSchema,
    /**
     * The local services a phase may reach, each on 127.0.0.1:<port> inside
     * the sandbox (a shim listener tunnelled to the daemon). Anything else
     * gets ECONNREFUSED: the container has no interface but loopback.
     */
    services: z
      .array(
        z
          .object({
            id: idSchema,
            name: z.enum(NETWORK_SERVICES),
            port: z.number().int().min(1).max(65535),
            justification: justificationSchema,
          })
          .strict(),
      )
      .superRefine((list, ctx) => {
        const seen = new Set<string>();
        for (const [i, s] of list.entries()) {
          for (const key of [`name ${s.name}`, `port ${s.port}`]) {
            if (seen.has(key)) ctx.addIssue({ code: z.ZodIssueCode.custom, path: [i], message: `${key} is listed twice` });
            seen.add(key);
          }
        }
      }),
    /** optional: without it pip has no index (see packageIndexSchema) */
    packageIndex: packageIndexSchema.optional(),
  })
  .strict()
  .superRefine((n, ctx) => {
    const clash = n.packageIndex && n.services.find((s) => s.port === n.packageIndex!.port);
    if (clash) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ["packageIndex", "port"], message: `port ${clash.port} is already service ${clash.name}'s` });
  });

export const PACKAGE_INDEX_CLAUSE = "SKILLS.md Security & Safety Guardrails — Network Boundaries: package downloads via pip from PyPI only";

/** Without a network section: SKILLS.md's local services on their usual ports, and PyPI for pip. */
export const DEFAULT_NETWORK: z.infer<typeof networkSchema> = {
  clause: "SKILLS.md Security & Safety Guardrails — Network Boundaries: connections to localhost services (QuestDB, PostgreSQL, Redis) only",
  services: [
    { id: "net.service.postgres", name: "postgres", port: 5432, justification: "PostgreSQL, through the SQL gateway (test database outside paper mode)" },
    { id: "net.service.questdb-pg", name: "questdb-pg", port: 8812, justification: "QuestDB's PostgreSQL wire protocol, through the SQL gateway" },
    { id: "net.service.redis", name: "redis", port: 6379, justification: "Redis, through the command filter" },
  ],
  packageIndex: {
    id: "net.package-index",
    clause: PACKAGE_INDEX_CLAUSE,
    port: 3128,
    indexUrl: "https://pypi.org/simple",
    hosts: [
      { name: "pypi.org", port: 443 },
      { name: "files.pythonhosted.org", port: 443 },
    ],
    justification: "pip installs from PyPI (the index and its file host) and nowhere else",
  },
  // QuestDB HTTP would be an unchecked raw pipe: opt-in only (policies/default.yaml says how).
};

/* -------------------------------- policy -------------------------------- */

export const policyFileSchema = z
  .object({
    version: z.literal(1, { errorMap: () => ({ message: "must be 1 (the only policy format so far)" }) }),
    shell: z
      .object({
        rules: z.array(shellRuleSchema),
        /** the decision for a command no rule matches; SKILLS.md §2: such commands require human approval */
        unknown: z.enum(["ask", "forbid"]),
      })
      .strict(),
    limits: limitsSchema,
    failFast: failFastSchema,
    workspace: workspaceSchema,
    database: databaseSchema,
    /** optional: without it, DEFAULT_NETWORK */
    network: networkSchema.optional(),
    /** optional: without it, DEFAULT_AUDIT */
    audit: auditSchema.optional(),
  })
  .strict();
export type NetworkPolicy = z.infer<typeof networkSchema>;
export type PolicyFile = z.infer<typeof policyFileSchema>;

/* ------------------------------ loaded form ----------------------------- */

export type ArgMatcher = (arg: string) => boolean;

/** A shell rule ready to match argv (built by compileRule in evaluate.ts). */
export interface CompiledRule {
  readonly id: string;
  readonly clause: string;
  readonly decision: Decision;
  readonly rank: number;
  readonly justification: string;
  /** token 0 */
  readonly program: ArgMatcher;
  /** tokens 1… */
  readonly rest: readonly ArgMatcher[];
  readonly anyArg: ArgMatcher | undefined;
  /** options whose value is the next word; set when the rule skips options */
  readonly skipOptions: ReadonlySet<string> | undefined;
}

/** The shell rules of one policy file. A combined policy judges under every layer; the strictest wins. */
export interface ShellLayer {
  readonly source: string;
  readonly rules: readonly CompiledRule[];
  readonly unknown: "ask" | "forbid";
  /** programs named by this layer's allow rules, for messages */
  readonly whitelist: readonly string[];
}

/** The failFast section with every default filled in (load.ts). */
export interface FailFastPolicy {
  clause: string;
  maxAttempts: Record<ErrorCategory | "iteration" | "policy", number>;
  consecutive: number;
  countPolicyRefusals: boolean;
  noTestsIsFailure: boolean;
}

/** The database section; a combined policy sets a write exception to null when the layers disagree on it. */
export interface DatabasePolicy extends Omit<PolicyFile["database"], "readOnlyDefault"> {
  readOnlyDefault: Omit<PolicyFile["database"]["readOnlyDefault"], "testDatabaseEnv" | "paperTablePrefix"> & {
    testDatabaseEnv: string | null;
    paperTablePrefix: string | null;
  };
}

export interface Policy {
  readonly version: 1;
  /** the files this policy was loaded from, base first */
  readonly sources: readonly string[];
  readonly shell: { readonly layers: readonly ShellLayer[] };
  readonly limits: Readonly<Record<PhaseMode, Readonly<PhaseLimits>>>;
  readonly failFast: Readonly<FailFastPolicy>;
  readonly workspace: Readonly<WorkspacePolicy>;
  readonly database: Readonly<DatabasePolicy>;
  /**
   * the services a phase may reach; a combined policy keeps only those both layers allow on the same port,
   * and only the package-index hosts both list alike (same name, port and pin)
   */
  readonly network: Readonly<NetworkPolicy>;
  /** how much a phase may add to the audit trail; a combined policy takes the smaller of each */
  readonly audit: Readonly<AuditPolicy>;
}
