/** The database gateway's statement classifiers (SKILLS.md §3 "DATABASE ACCESS"). */
export {
  DEFAULT_SQL_RULES,
  SQL_CLAUSES,
  classifySql,
  initSqlParser,
  rememberPrepared,
  sqlRulesSchema,
  type SqlContext,
  type SqlDecision,
  type SqlMode,
  type SqlRules,
  type SqlStatementVerdict,
  type SqlVerdict,
  type StatementKind,
} from "./classify.js";
export { classifyQuestDb } from "./questdb-gate.js";
