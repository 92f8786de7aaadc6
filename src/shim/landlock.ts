/**
 * A Landlock domain per command (Linux 6.12+, Landlock ABI 6), so that one
 * command cannot reach another's processes although all run as one uid.
 *
 * A process in a domain cannot ptrace — nor open /proc/<pid>/mem or maps
 * of, nor process_vm_readv/writev into — a process outside its domain or in
 * a sibling one, and with LANDLOCK_SCOPE_SIGNAL cannot signal one either.
 * Processes of one command share its domain and still reach each other. No
 * filesystem or network access is handled: nothing else changes. It needs
 * no privilege (no_new_privs, which Docker's no-new-privileges already
 * sets), and Docker's seccomp profile allows the syscalls here.
 *
 * Each command must get a domain of its own, made by the thread that starts
 * it, never by the long-lived starter itself (domains stack and cannot be
 * left): the forker makes it in a thread that exists only to start one
 * command; on Node's path a small Python wrapper makes it and then execs
 * the command (Node has no hook between fork and exec).
 */

/**
 * The OOM killer's bias for every command (oom_score_adj, -1000…1000). The
 * shim and the forker stay at 0: a command of any size scores above them
 * (the kernel adds adj/1000 of the container's limit to its score), so when
 * memory runs out the kernel kills a command, not the supervisor (issue 8:
 * 60 small processes made it kill the shim). Lowering the shim below 0 would
 * need CAP_SYS_RESOURCE, which neither the shim nor, on this project's
 * machines, the daemon has; raising needs nothing. A command may lower its
 * own value back to 0 (never below: that is the floor it inherits), and
 * then ties with the shim — it can make itself as likely a victim as the
 * supervisor, never less; if the shim is killed the phase ends `failed`.
 */
export const COMMAND_OOM_SCORE_ADJ = 500;

/** Python, for Node's path: `raise_oom(path)` writes COMMAND_OOM_SCORE_ADJ (the forker's path: forker.ts setOomScoreAdj). */
const RAISE_OOM_PY = String.raw`
def raise_oom(path):
    try:
        with open(path, "w") as f:
            f.write("${COMMAND_OOM_SCORE_ADJ}")
    except OSError:
        pass
`;

/**
 * Python: `confine()` and `LANDLOCK` (whether the kernel has ABI 6). Needs
 * `ctypes`, `os` and `libc = ctypes.CDLL(None, use_errno=True)` defined.
 */
export const LANDLOCK_PY = String.raw`
class _Attr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]
_abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
LANDLOCK = _abi >= 6
def confine():
    attr = _Attr(0, 0, 2)  # LANDLOCK_SCOPE_SIGNAL
    fd = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS (already set by Docker; required)
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
        if libc.syscall(446, fd, 0) != 0:  # landlock_restrict_self
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(fd)

`;

/**
 * `python3 -I -S -c LANDLOCK_EXEC_PY argv...`: confines itself, then execs
 * argv with the environment it was given (PATH lookup as Node's spawn does
 * it; the environment is read back from /proc/self/environ, as Python's
 * start-up adds LC_CTYPE to os.environ). Fd 3 is the error pipe: closed on exec when it succeeds; on failure
 * it carries "ERRNO_NAME message" and the wrapper exits 127, so the shim
 * reports a spawn_error as for Node's own spawn.
 */
export const LANDLOCK_EXEC_PY = String.raw`
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
${LANDLOCK_PY}${RAISE_OOM_PY}
os.set_inheritable(3, False)
argv = sys.argv[1:]
# the environment as given, not os.environ: Python's start-up adds LC_CTYPE (locale coercion) there
env = dict(kv.split(b"=", 1) for kv in open("/proc/self/environ", "rb").read().split(b"\0") if b"=" in kv)
raise_oom("/proc/self/oom_score_adj")
try:
    if LANDLOCK:
        confine()
    os.execvpe(argv[0], argv, env)
except OSError as e:
    name = errno.errorcode.get(e.errno, "ESPAWN") if e.errno else "ESPAWN"
    os.write(3, ("%s %s" % (name, e.strerror or e)).encode())
    os._exit(127)
`;
