/**
 * The change set of one iteration: what a phase changed in its view of the
 * project since the last accepted checkpoint. Read from the phase's layer
 * (src/workspace/layer.ts), judged by src/workspace/rules.ts, rendered by
 * src/workspace/diff.ts and applied by src/workspace/apply.ts. This file is
 * the contract between them; it holds types only, so every side can depend
 * on it without pulling in mounts or the file system.
 */

export type ChangeKind = "create" | "modify" | "delete" | "rename";

export interface FileChange {
  kind: ChangeKind;
  /** Project-relative, POSIX separators, no leading "./". For a rename, the new path. */
  path: string;
  /** Rename source (project-relative). Set only when kind is "rename". */
  from?: string;
  isDir: boolean;
  /** New size in bytes (0 for delete, 0 for directories). */
  sizeBytes: number;
  /** New mode bits (permission bits, e.g. 0o644) when created or changed. */
  mode?: number;
  /** Only the mode changed; the content is the project's. */
  modeOnly?: boolean;
}

export interface ChangeSet {
  changes: FileChange[];
}
