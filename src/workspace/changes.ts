/**
 * The change set of one iteration: what a phase changed in its view of the
 * project since the last accepted checkpoint. Read from the phase's layer
 * (src/workspace/layer.ts), judged by src/workspace/rules.ts, rendered by
 * src/workspace/diff.ts and applied by src/workspace/apply.ts. This file is
 * the contract between them; it holds types and the walk's two bounds only,
 * so every side can depend on it without pulling in mounts or the file system.
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

/**
 * The walk of the layer reads at most this many changes: an iteration is a
 * few files (SKILLS.md §1), and every change is listed in the trail, so a
 * layer of 100,000 created files must not become a 400 MB audit record.
 */
export const MAX_CHANGES = 1000;

/**
 * Longest project-relative path the walk reads (bytes). A sandbox can make a
 * tree far deeper than PATH_MAX with relative paths; the daemon names files
 * by whole paths, so past this the walk does not descend.
 */
export const MAX_CHANGE_PATH_BYTES = 1024;

/** What the walk of the layer left unread; set only when something was. The judge refuses such an iteration for good. */
export interface ChangeSetLimits {
  /** paths over MAX_CHANGE_PATH_BYTES (a few, cut to the cap), not descended into */
  tooLong: string[];
  /** names that are not UTF-8 (a few, shown with U+FFFD): no string names them, so they are not read */
  notUtf8: string[];
  /** the walk stopped at MAX_CHANGES: there were more */
  truncated: boolean;
}

export interface ChangeSet {
  changes: FileChange[];
  limits?: ChangeSetLimits;
}
