// Lint what reviews keep missing (STYLE.md 15): promises nobody awaits or
// handles, promises passed where a callback's result is ignored, switches
// that forget a case — and imports against the layering of
// docs/ARCHITECTURE.md. Run by `npm run typecheck`.
import tseslint from "typescript-eslint";

/**
 * The layers, highest first (ARCHITECTURE.md "Where things live"):
 *   cli → client;  api/console → phases → {workspace, db, net, policy,
 *   approvals, runtime} → audit → domain/errors/util.
 * Nothing but api/, console/ and daemon.ts imports phases/; db/ and net/
 * record through an interface audit/ defines. The shim is bundled on its
 * own and shares only its protocol.
 */
const ROOMS = ["api", "console", "phases", "workspace", "db", "net", "policy", "approvals", "runtime", "audit", "cli", "client", "config", "shim", "util"];
const SERVICES = ["workspace", "db", "net", "policy", "approvals", "runtime"];

/** Patterns for imports of these rooms (and daemon.ts) from a file one folder deep in src/. */
function rooms(names, why) {
  const group = [];
  for (const n of names) {
    if (n === "daemon") group.push("../daemon.js", "../daemon");
    else group.push(`../${n}/*`, `../${n}`);
  }
  return { group, message: why };
}

/** Rooms a folder must not import, with the reason shown to whoever tries. */
const FORBIDDEN = {
  // the operator's client talks to the daemon over its socket, never through its insides
  cli: [["phases", "api", "console", "workspace", "db", "net", "policy", "approvals", "runtime"], "the CLI is a client of the API: import from src/client/ (or a leaf: errors, domain, util, audit/format)"],
  // (config/paths.ts, the default socket path, and shim/read-pool.ts load only Node's built-ins: allowed)
  client: [ROOMS.filter((r) => r !== "client" && r !== "config"), "the exported client loads only Node's built-ins and errors.ts"],
  api: [["cli", "client", "daemon"], "api/ sits above phases/ and below daemon.ts"],
  console: [["cli", "client", "daemon", "api"], "console/ sits beside api/, above phases/"],
  phases: [["api", "console", "cli", "client", "daemon"], "phases/ is used by api/, console/ and daemon.ts, never the other way"],
  ...Object.fromEntries(
    SERVICES.map((s) => [
      s,
      [["phases", "api", "console", "cli", "client", "daemon"], `${s}/ sits below phases/: take what it needs as parameters (an interface audit/ or domain.ts defines)`],
    ]),
  ),
  audit: [[...SERVICES, "phases", "api", "console", "cli", "client", "daemon"], "audit/ sits below every room but domain/errors/util"],
  util: [ROOMS.filter((r) => r !== "util"), "util/ is a leaf"],
  shim: [ROOMS.filter((r) => r !== "shim"), "the shim is bundled on its own: it shares src/shim/protocol.ts and nothing else"],
};

/**
 * The CLI and the exported client describe the API's wire types by importing
 * them as types from where they are produced (PhaseView, ExecResult,
 * Approval, AuditRecord): erased at build, so they load nothing of the
 * daemon. Any value import across the line is refused.
 */
const TYPES_ONLY = new Set(["cli", "client"]);

const layering = Object.entries(FORBIDDEN).map(([room, [names, why]]) => {
  const pattern = rooms(names, why);
  // the pooled reads of a stream (shim/read-pool.ts) load only node:net: the client reads frames with them too
  // (a folder pattern cannot be re-included from, so the client's is the files' only)
  if (room === "client") {
    pattern.group = pattern.group.filter((g) => g !== "../shim");
    pattern.group.push("../config/settings.js", "!../shim/read-pool.js");
  }
  return {
    files: [`src/${room}/**/*.ts`],
    rules: {
      "@typescript-eslint/no-restricted-imports": ["error", { patterns: [{ ...pattern, allowTypeImports: TYPES_ONLY.has(room) }] }],
    },
  };
});

export default tseslint.config(
  { ignores: ["dist/**", "node_modules/**", "coverage/**", "**/*.js", "**/*.mjs", "**/*.cjs"] },
  {
    files: ["src/**/*.ts", "test/**/*.ts"],
    languageOptions: {
      parser: tseslint.parser,
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    plugins: { "@typescript-eslint": tseslint.plugin },
    linterOptions: { reportUnusedDisableDirectives: "error" },
    rules: {
      "@typescript-eslint/no-floating-promises": "error",
      "@typescript-eslint/no-misused-promises": "error",
      "@typescript-eslint/switch-exhaustiveness-check": ["error", { considerDefaultExhaustiveForUnions: true }],
    },
  },
  {
    files: ["src/**/*.ts"],
    rules: {
      // A failure swallowed without a word is how faults hide: log it, handle it, or say
      // in a disable comment why nothing can be done (eslint-disable-next-line … -- why).
      "no-restricted-syntax": [
        "error",
        {
          selector: "CallExpression[callee.property.name='catch'] > ArrowFunctionExpression[body.type='Identifier'][body.name='undefined']",
          message: "a .catch that swallows the error silently: log it, handle it, or justify it in a disable comment",
        },
        {
          selector: "CallExpression[callee.property.name='catch'] > ArrowFunctionExpression[body.type='BlockStatement'][body.body.length=0]",
          message: "a .catch that swallows the error silently: log it, handle it, or justify it in a disable comment",
        },
      ],
    },
  },
  ...layering,
  {
    // errors.ts and domain.ts are the leaves everything shares
    files: ["src/errors.ts", "src/domain.ts"],
    rules: {
      "@typescript-eslint/no-restricted-imports": ["error", { patterns: [{ group: ["./*", "!./errors.js", "!./domain.js"], message: "a leaf module imports no room" }] }],
    },
  },
);
