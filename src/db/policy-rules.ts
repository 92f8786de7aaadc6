/**
 * The SQL gateway's rules from a policy's `database` section
 * (policies/default.yaml; src/policy/schema.ts), so that what the operator's
 * policy says is what the classifier enforces:
 *
 *   deniedFunctions.functions  → denied on top of the built-in list
 *                                (DEFAULT_SQL_RULES.deniedFunctions: never
 *                                shortened by a policy)
 *   deniedFunctions.allow      → built-in denials lifted, by exact name
 *   alphaMarkers               → functions, decision (allow: no markers), joins
 *   readOnlyDefault.paperTablePrefix → the paper-mode write prefix
 *
 * The same policy content always yields the same (frozen) object, so the
 * classifier's compiled rules and the gateway's verdict caches are shared by
 * every connection under it.
 */
import type { Policy } from "../policy/schema.js";
import { DEFAULT_SQL_RULES, type SqlRules } from "./classify.js";

/** A prefix no folded SQL name can start with: two policies disagreeing on the paper prefix allow no paper writes. */
const NO_PAPER_TABLE = "sandboxd:no-paper-table:";

const byContent = new Map<string, Readonly<SqlRules>>();
const MAX_REMEMBERED = 256;

export function sqlRulesFor(db: Readonly<Policy["database"]>): Readonly<SqlRules> {
  const alphaOff = db.alphaMarkers.decision === "allow";
  const rules: SqlRules = {
    deniedFunctions: [...new Set([...DEFAULT_SQL_RULES.deniedFunctions, ...db.deniedFunctions.functions])],
    liftedFunctions: [...new Set(db.deniedFunctions.allow ?? [])].sort(),
    alphaMarkers: {
      functions: alphaOff ? [] : [...db.alphaMarkers.functions],
      decision: db.alphaMarkers.decision === "ask" ? "ask" : "forbid",
      tables: alphaOff ? [] : db.alphaMarkers.joins.map((pair) => [...pair]),
    },
    paperPrefix: db.readOnlyDefault.paperTablePrefix ?? NO_PAPER_TABLE,
    protectedSettings: [...DEFAULT_SQL_RULES.protectedSettings],
    settableSettings: [...DEFAULT_SQL_RULES.settableSettings],
  };
  const key = JSON.stringify(rules);
  let known = byContent.get(key);
  if (!known) {
    if (byContent.size >= MAX_REMEMBERED) byContent.delete(byContent.keys().next().value!);
    known = Object.freeze(rules);
    byContent.set(key, known);
  }
  return known;
}
