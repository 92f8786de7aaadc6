/**
 * What the layer takes from the policy's `workspace:` section
 * (src/policy/schema.ts): which of the project's paths are hidden or
 * read-only in the view, the disk budget, and the validation programs that
 * trigger a checkpoint.
 *
 * Protected paths are globs; the view needs concrete paths (a whiteout, a
 * bind mount). Read-only paths are resolved against the project root's own
 * entries (`.git`, `.envrc`, `build_audit.log`, `main.py`); one deeper in
 * the tree (`vendor/lib/.git/config`) is writable in the view but never
 * changed — the judge refuses any iteration that touches it. Hidden paths
 * (credential files) are found at any depth by one walk of the project at
 * phase start: `config/.env` read in the sandbox would leak its values.
 */
import { closeSync, constants as fsc, fstatSync, lstatSync, openSync, opendirSync, readdirSync, readFileSync, type Dirent, type Stats } from "node:fs";
import { readdir } from "node:fs/promises";
import { performance } from "node:perf_hooks";
import path from "node:path";
import { SandboxdError } from "../errors.js";
import { compileWorkspace, protects, protectsName, type WorkspacePolicy } from "../policy/index.js";

export interface LayerPaths {
  /** not visible in the view at all (credential files) */
  hidden: string[];
  /** read-only over the view */
  readOnly: string[];
}

/**
 * The protected entries of the project's root, and (unless `deep: false`)
 * the credential files below it. `deep: false` leaves the walk below to
 * `hiddenBelowRoot`, which a phase start runs while its container starts.
 */
export async function protectedRootEntries(project: string, ws: WorkspacePolicy, opts: { allowMainPy: boolean; extraReadOnly?: readonly string[]; deep?: boolean }): Promise<LayerPaths> {
  const names = await readdir(project).catch(() => [] as string[]);
  const { protections } = compileWorkspace(ws);
  const hidden: string[] = [];
  const readOnly = new Set<string>(opts.extraReadOnly ?? []);
  for (const name of names) {
    for (const rule of protections) {
      if (!protects(rule, name)) continue;
      if (rule.spec.treatment === "hidden") hidden.push(name);
      else if (rule.spec.treatment === "readOnly" && !(rule.spec.unlessPermission === "main.py" && opts.allowMainPy)) readOnly.add(name);
    }
  }
  // hidden files deeper in the tree (config/.env, deploy/server.key): a credential file is hidden wherever it is
  if (opts.deep !== false) for (const rel of await hiddenBelowRoot(project, ws)) if (!hidden.includes(rel)) hidden.push(rel);
  // a name both hidden and read-only is hidden
  return { hidden, readOnly: [...readOnly].filter((n) => !hidden.includes(n)) };
}

/** Whether one of the command's parts runs a validation program (directly or as `python -m PROGRAM`). */
export function isValidationCommand(parts: ReadonlyArray<readonly string[]>, programs: readonly string[]): boolean {
  const base = (s: string) => s.split("/").pop() ?? s;
  return parts.some((argv) => {
    const first = base(argv[0] ?? "");
    if (programs.includes(first)) return true;
    if (/^python3?(\.\d+)?$/.test(first)) {
      const m = argv.indexOf("-m");
      return m >= 0 && programs.includes(argv[m + 1] ?? "");
    }
    return false;
  });
}

/** Credential files below the project's root (not its root's own entries): one walk of the project, folders unchanged since the last one read from `scanCache`. */
export async function hiddenBelowRoot(project: string, ws: WorkspacePolicy): Promise<string[]> {
  const { protections } = compileWorkspace(ws);
  return hiddenBelow(project, protections.filter((r) => r.spec.treatment === "hidden"));
}


type HiddenRules = ReturnType<typeof compileWorkspace>["protections"];

/**
 * What the last walk found in one folder: the credential files directly in
 * it and its subfolders, valid while the folder's (dev, ino, mtime, ctime)
 * are the same. A folder's entries (names, types) change only with its
 * mtime and ctime, and ctime cannot be set back by a user (utimes sets it to
 * now), so a folder whose lstat says the same has the same entries: the walk
 * takes its cached findings and goes on into its subfolders (each checked
 * the same way) without reading it.
 */
interface FolderScan {
  dev: number;
  ino: number;
  mtimeMs: number;
  ctimeMs: number;
  /**
   * read within RACY_MS of its ctime: a change made in the same clock tick
   * (the kernel's coarse clock) would leave the ctime as it was, so such a
   * folder is read again next time (git's "racy" entries, the same way);
   * also a folder whose inode number is past 2^53 (not an identity as a
   * number) or that could not be opened
   */
  racy: boolean;
  hits: string[];
  subdirs: Map<string, FolderScan>;
}

/**
 * Folder times nearer than this to the moment the folder was read do not
 * vouch for its entries. Also why the times are compared as Node's numbers
 * (milliseconds in a double: sub-microsecond here) and not as bigint
 * nanoseconds, which cost 1.7× the lstat: a folder kept in the cache has
 * times at least this much older than its read, and any later change gives
 * it a ctime after that read.
 */
const RACY_MS = 2_000;
/** Projects whose last walk is kept (a few thousand small objects each); the least recently walked goes first. */
const MAX_CACHED_PROJECTS = 16;

/**
 * The daemon's cache of credential walks, per project and hidden rules, in
 * memory only (a restarted daemon walks once in full). Measured on a
 * 100k-file / 5k-folder project: BENCHMARKS.md "Phase start with the layer".
 */
const scanCache = new Map<string, FolderScan>();

/** Forgets every cached walk (tests, and a caller that wants a full walk). */
export function clearCredentialScanCache(): void {
  scanCache.clear();
}

/**
 * The last walk's folders: read (readdir) or taken from the cache (an lstat
 * only), the cached records it copied (those on the way to a change), and
 * how often it let the event loop in. For tests and the benchmark.
 */
let lastCounts = { read: 0, reused: 0, copied: 0, yields: 0 };
export function lastCredentialScan(): { read: number; reused: number; copied: number; yields: number } {
  return { ...lastCounts };
}

/** Lets the event loop in (other phases' commands, the container start's callbacks). */
function yieldTurn(counts: { yields: number }): Promise<void> {
  counts.yields += 1;
  return new Promise((resolve) => setImmediate(resolve));
}

/**
 * A folder on the walk's way. `own` is its record in the tree this walk
 * makes, once it has one of its own: a folder read anew has, and so does an
 * unchanged one with something changed below it (a copy of its cached
 * record, made by ownScan). An unchanged folder with nothing changed below
 * it keeps the cached record itself: a walk of an unchanged project
 * allocates no records, and the cached ones are never changed (a walk
 * running beside another on the same project reads them as they were).
 */
interface Visit {
  rel: string;
  name: string;
  cached: FolderScan | undefined;
  parent: Visit | null;
  own: FolderScan | null;
}

/** The visit's own record, copied from the cached one (and put in its parent's own, up the way) the first time one is needed. */
function ownScan(visit: Visit, counts: { copied: number }): FolderScan {
  if (visit.own) return visit.own;
  const c = visit.cached!;
  visit.own = { ...c, subdirs: new Map(c.subdirs) };
  counts.copied++;
  ownScan(visit.parent!, counts).subdirs.set(visit.name, visit.own);
  return visit.own;
}

/** How long the walk runs on the event loop before it lets other work in. */
const SLICE_MS = 2;
/**
 * A folder larger than this (ext4: a 4 KiB block per ~100–200 names) is read
 * with opendir a batch at a time; smaller ones in one readdirSync, the
 * cheaper call. On ext4 a folder's size never shrinks, so a folder once big
 * stays on the batched road.
 */
const BIG_DIR_BYTES = 64 * 1024;

/**
 * Files below the project's root that a hidden rule covers. One walk of the
 * project at phase start (links are not followed); the view whites each out.
 *
 * Synchronous calls in slices of SLICE_MS, yielding between them: the walk
 * runs while the container starts, and the two share the host's cores, so
 * what counts is CPU. A promise per readdir or lstat cost about 4× the CPU
 * of the call itself (libuv's thread pool, a promise and a closure each):
 * on a 100k-file / 5k-folder tree 250–330 ms of CPU against 60 ms for the
 * same walk made of sync calls, 11–12 ms when every folder is unchanged and
 * only its lstat is made (and no record: see Visit). The slices keep the
 * event loop (other phases' commands) from waiting more than a slice.
 */
async function hiddenBelow(project: string, rules: HiddenRules): Promise<string[]> {
  const out: string[] = [];
  if (rules.length === 0) return out;
  const key = JSON.stringify([project, rules.map((r) => r.spec)]);
  const top: Visit = { rel: "", name: "", cached: undefined, parent: null, own: { dev: 0, ino: 0, mtimeMs: 0, ctimeMs: 0, racy: true, hits: [], subdirs: new Map() } };
  const previous = scanCache.get(key);
  if (previous) top.own!.subdirs.set("", previous);
  // folders still to visit
  const todo: Visit[] = [{ rel: "", name: "", cached: previous, parent: top, own: null }];
  const counts = { read: 0, reused: 0, copied: 0, yields: 0 };
  let sliceStart = performance.now();
  while (todo.length > 0) {
    if (performance.now() - sliceStart > SLICE_MS) {
      await yieldTurn(counts);
      sliceStart = performance.now();
    }
    const visit = todo.pop()!;
    const { rel, cached } = visit;
    const dir = rel ? `${project}/${rel}` : project;
    // a folder the last walk read and trusts: its lstat says whether it is unchanged
    if (cached && !cached.racy) {
      let st: Stats;
      try {
        st = lstatSync(dir);
      } catch {
        ownScan(visit.parent!, counts).subdirs.delete(visit.name); // gone since its folder was read
        continue;
      }
      if (!st.isDirectory()) {
        ownScan(visit.parent!, counts).subdirs.delete(visit.name);
        continue;
      }
      if (cached.dev === st.dev && cached.ino === st.ino && cached.mtimeMs === st.mtimeMs && cached.ctimeMs === st.ctimeMs) {
        // unchanged: the same entries, so the same findings and subfolders (each checked in turn);
        // its record is the cached one, copied only if something below it changed
        counts.reused++;
        const holder = visit.parent!.own;
        if (holder && holder.subdirs.get(visit.name) !== cached) holder.subdirs.set(visit.name, cached);
        for (const [n, c] of cached.subdirs) todo.push({ rel: rel ? `${rel}/${n}` : n, name: n, cached: c, parent: visit, own: null });
        if (cached.hits.length > 0) out.push(...cached.hits);
        continue;
      }
    }
    // Read through a descriptor: the record's (dev, ino, times) are those of the folder whose
    // entries it holds. Read by path, a folder swapped in at the path between the lstat and the
    // readdir (`mv a a.old; mv a.new a`, or an exchange) gave the one folder's identity the
    // other's entries; the next walk took the first from the cache with none of its credential
    // files, and every later phase showed them.
    let fd: number;
    try {
      fd = openSync(dir, fsc.O_RDONLY | fsc.O_DIRECTORY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT" || code === "ENOTDIR" || code === "ELOOP") {
        ownScan(visit.parent!, counts).subdirs.delete(visit.name); // gone, or a link or file now, since its lstat
        continue;
      }
      fd = -1; // unreadable: nothing found in it, and never taken from the cache
    }
    // the stat before the read (of the descriptor's folder): a change after it gives a newer ctime, which the next walk sees
    let st: Stats | null;
    try {
      st = fd >= 0 ? fstatSync(fd) : lstatSync(dir);
    } catch {
      st = null;
    }
    if (!st?.isDirectory()) {
      if (fd >= 0) closeSync(fd);
      ownScan(visit.parent!, counts).subdirs.delete(visit.name);
      continue;
    }
    counts.read++;
    const sub = (n: string) => (rel ? `${rel}/${n}` : n);
    const isHit = (p: string, name: string) => rules.some((rule) => (rule.names ? protectsName(rule.names, name) : protects(rule, p)));
    let entries: Dirent[] = [];
    let scan: FolderScan;
    try {
      const now = Date.now();
      // an inode number a double cannot hold (overlayfs with xino, CIFS: 64-bit numbers) is not
      // an identity: two folders made together had the same number and times, and one swapped
      // to the other's path was taken for it, with its findings. Such a folder is read every walk.
      const racy = fd < 0 || !Number.isSafeInteger(st.ino) || now - st.ctimeMs < RACY_MS || now - st.mtimeMs < RACY_MS;
      scan = { dev: st.dev, ino: st.ino, mtimeMs: st.mtimeMs, ctimeMs: st.ctimeMs, racy, hits: [], subdirs: new Map() };
      visit.own = scan;
      ownScan(visit.parent!, counts).subdirs.set(visit.name, scan);
      // the descriptor's folder by name (Node reads folders by path only)
      const at = `/proc/self/fd/${fd}`;
      let from = at;
      try {
        if (fd < 0) entries = [];
        else if (st.size <= BIG_DIR_BYTES) entries = readdirSync(at, { withFileTypes: true });
        else {
          // a folder of many entries (200k: 160 ms in one readdirSync) is read a batch at a time, yielding as between folders
          const d = opendirSync(at, { bufferSize: 256 });
          try {
            for (let e = d.readSync(); e; e = d.readSync()) {
              entries.push(e);
              if ((entries.length & 255) === 0 && performance.now() - sliceStart > SLICE_MS) {
                await yieldTurn(counts);
                sliceStart = performance.now();
              }
            }
          } finally {
            d.closeSync();
          }
        }
      } catch {
        // not through the descriptor (no /proc): by path, as before, and never taken from the cache;
        // unreadable that way too: nothing found in it
        scan.racy = true;
        from = dir;
        entries = [];
        try {
          entries = readdirSync(dir, { withFileTypes: true });
        } catch {
          // (its mode changing changes its ctime)
        }
      }
      if (entries.some((e) => e.name.includes("\ufffd"))) {
        // a name that is not UTF-8 comes back with U+FFFD, a name that opens another file (or none): the folder is read by bytes
        const raw = readdirSync(from, { withFileTypes: true, encoding: "buffer" });
        const bad = raw.filter((e) => !Buffer.from(e.name.toString("utf8")).equals(e.name));
        if (bad.length > 0) {
          notUtf8(from, rel, bad, isHit);
          // never taken from the cache: what is below such a folder is not in it
          scan.racy = true;
          entries = raw.filter((e) => !bad.includes(e)).map((e) => Object.assign(e, { name: e.name.toString("utf8") }) as unknown as Dirent);
        }
      }
    } finally {
      if (fd >= 0) closeSync(fd);
    }
    for (let i = 0; i < entries.length; i++) {
      const e = entries[i]!;
      if ((i & 1023) === 1023 && performance.now() - sliceStart > SLICE_MS) {
        await yieldTurn(counts);
        sliceStart = performance.now();
      }
      // a name-only rule (every default one) tests the name; the path is made only when needed
      if (rel && isHit(sub(e.name), e.name)) {
        scan.hits.push(sub(e.name));
        continue;
      }
      // every folder, tools' caches and .git too: the view shows them (a `pkg/__pycache__/.env` an earlier walk skipped was readable there)
      if (e.isDirectory()) todo.push({ rel: sub(e.name), name: e.name, cached: cached?.subdirs.get(e.name), parent: visit, own: null });
    }
    out.push(...scan.hits);
  }
  lastCounts = counts;
  // a file system mounted in the project hides, on the host, the folder the view shows (overlayfs does not cross mounts in its lower)
  const mounts = mountPointsBelow(project);
  const found = mounts.length === 0 ? out : out.filter((h) => !mounts.some((m) => h === m || h.startsWith(`${m}/`)));
  found.push(...mounts);
  const scan = top.own!.subdirs.get("");
  scanCache.delete(key); // set again: the most recently walked last
  if (scan) scanCache.set(key, scan);
  while (scanCache.size > MAX_CACHED_PROJECTS) scanCache.delete(scanCache.keys().next().value!);
  return found.sort();
}

function unsupportedName(where: string): SandboxdError {
  return new SandboxdError("SBX_ERR_WORKSPACE_UNSUPPORTED", `the project has a credential file at ${where}, a path that is not UTF-8: the view cannot hide it, so the phase does not start`, {
    hint: "rename the file (or the folder on its way) to a UTF-8 name, or move it out of the project",
  });
}

/**
 * The entries of `dir` whose names are not UTF-8 (`bad`), by their bytes:
 * one that a hidden rule covers (tested as Node decodes it: U+FFFD stands
 * for a byte, and the rules' fixed parts are ASCII), or a credential file
 * anywhere below such a folder, refuses the start: the whiteout that hides a
 * file needs a name a string can hold. A harmless one (`café/readme.txt` in
 * Latin-1) is left as it is.
 */
function notUtf8(dir: string, rel: string, bad: Dirent<Buffer>[], isHit: (p: string, name: string) => boolean): void {
  const check = (at: Buffer, e: Dirent<Buffer>, shown: string): void => {
    const name = e.name.toString("utf8");
    const p = shown ? `${shown}/${name}` : name;
    if (isHit(p, name)) throw unsupportedName(p);
    if (!e.isDirectory()) return;
    const inner = Buffer.concat([at, Buffer.from("/"), e.name]);
    let entries: Dirent<Buffer>[] = [];
    try {
      entries = readdirSync(inner, { encoding: "buffer", withFileTypes: true });
    } catch {
      return;
    }
    for (const c of entries) check(inner, c, p);
  };
  for (const e of bad) check(Buffer.from(dir), e, rel);
}

/** Mount points strictly below `project` in the daemon's mount table, project-relative, outermost only. */
function mountPointsBelow(project: string): string[] {
  let info: string;
  try {
    info = readFileSync("/proc/self/mountinfo", "latin1");
  } catch {
    return [];
  }
  const prefix = `${project}/`;
  const found: string[] = [];
  for (const line of info.split("\n")) {
    const field = line.split(" ")[4];
    if (!field) continue;
    // octal escapes (space, tab, newline, backslash) of the path's bytes
    const mp = Buffer.from(field.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))), "latin1").toString("utf8");
    if (mp.startsWith(prefix)) found.push(mp.slice(prefix.length));
  }
  return found.filter((m) => !found.some((o) => o !== m && m.startsWith(`${o}/`)));
}
