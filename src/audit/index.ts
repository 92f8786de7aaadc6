/** Public surface of the audit folder: build_audit.log, audit.jsonl, verification, redaction. */
export { BuildLog } from "./buildlog.js";
export { actionLine, escapeControl, quoteArgv, redactLine, renderOutput, timestamp } from "./format.js";
export { canonicalBytes, canonicalJson, toWellFormed, type JsonValue } from "./canonical.js";
export {
  ANCHOR_BYTES,
  ANCHOR_FILE,
  AuditJournal,
  GENESIS_HASH,
  JOURNAL_FILE,
  LOCK_FILE,
  anchorBytes,
  checkRecord,
  nodeJournalFs,
  recordHash,
  type AuditEvent,
  type AuditRecord,
  type ChainHead,
  type JournalFs,
  type JournalOptions,
  type TextRedactor,
} from "./journal.js";
export { assertJournalIntact, describeVerifyResult, verifyJournal, type VerifyResult } from "./verify.js";
export {
  ByteStreamRedactor,
  LogSecrets,
  MIN_SECRET_LENGTH,
  REDACTED,
  Redactor,
  SECRET_NAME,
  SHORT_SECRET_LENGTH,
  StreamRedactor,
  collectSecrets,
  findSecrets,
  redactDeep,
  redactingWriter,
  secretsFromDotenv,
  type IntervalFinder,
  type RedactorOptions,
  type SecretFinding,
} from "./redact.js";
