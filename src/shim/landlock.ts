/**
 * A Landlock domain per command (Linux 6.12+, Landlock ABI 6), so that one
 * command cannot reach another's processes although all run as one uid.
 *
 * A process in a domain cannot ptrace — nor open /proc/<pid>/mem or maps
 * of, nor process_vm_readv/writev into — a process outside its domain or in
 * a sibling one, and with LANDLOCK_SCOPE_SIGNAL cannot signal one either.
 * Processes of one command share its domain and still reach each other.
 *
 * Two more doors the uid leaves open are closed here as well:
 * - writing another process's /proc files (`/proc/<pid>/oom_score_adj`
 *   makes a concurrent command the OOM killer's first victim; `autogroup`
 *   lowers its CPU share): the domain handles "write a file" and grants it
 *   beneath every top-level folder but /proc, so no command writes any /proc
 *   file, its own included. Everything else is written as before (writable
 *   mounts are below those folders; pipes and sockets reopened through
 *   /proc/self/fd are not files Landlock handles).
 * - changing another process's limits and priorities by pid: the seccomp
 *   filter of seccomp.ts, installed by the same thread.
 * The thread also sets nice 19 for the command: inside the container only
 * the shim, the forker and tini compete with commands for its CPU, and a
 * fork bomb must not starve the shim's timeout and kill.
 * It needs no privilege (no_new_privs, which Docker's no-new-privileges
 * already sets), and Docker's seccomp profile allows the syscalls here.
 *
 * Each command must get a domain of its own, made by the thread that starts
 * it, never by the long-lived starter itself (domains and filters stack and
 * cannot be left): the forker makes it in a thread that exists only to
 * start one command; on Node's path a small Python wrapper makes it and then
 * execs the command (Node has no hook between fork and exec).
 */
import { SECCOMP_PY } from "./seccomp.js";

/**
 * The OOM killer's bias for every command (oom_score_adj, -1000…1000): the
 * shim and the forker stay at 0, so a command of any size scores above
 * them and the kernel takes commands first (issue 8: 60 small processes
 * made it kill the shim). Lowering the shim instead would need
 * CAP_SYS_RESOURCE, which neither the shim nor, on this project's machines,
 * the daemon has; raising needs nothing. A command is born with it (the
 * forker holds it for the fork: forker.ts setOomScoreAdj); when the shim
 * could not give the forker that, and on the Node path, the command is
 * started through a wrapper that sets its own before it confines itself and
 * execs (LANDLOCK_EXEC_PY). Never written into the command from outside after
 * the fork: that races the child's exec, whose new image is not dumpable at
 * first (it takes the forker's flag until the kernel resets it), so its /proc
 * file is root's and the forker's write fails; under load, every time.
 */
export const COMMAND_OOM_SCORE_ADJ = 1000;

/**
 * Python: `ruleset()`, `confine(rules=None)` and `LANDLOCK` (whether the kernel has ABI 6). Needs
 * `ctypes`, `os` and `libc = ctypes.CDLL(None, use_errno=True)` defined.
 */
export const LANDLOCK_PY = String.raw`
class _Attr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]
class _Beneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
_abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
LANDLOCK = _abi >= 6
_WRITE_FILE = 2  # LANDLOCK_ACCESS_FS_WRITE_FILE
_COMMAND_NICE = 19
` + SECCOMP_PY + String.raw`
def ruleset():
    """A Landlock ruleset (its fd): files may be written beneath every top-level folder but /proc."""
    attr = _Attr(_WRITE_FILE, 0, 2)  # LANDLOCK_SCOPE_SIGNAL
    fd = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        # (links are their targets' business). A rule holds the folder as opened now: a ruleset
        # kept from before the phase's view was mounted over /workspace denied every write there,
        # so a kept one is made anew after any mount or unmount (the forker's kept_ruleset).
        for name in os.listdir("/"):
            if name == "proc" or os.path.islink("/" + name):
                continue
            try:
                d = os.open("/" + name, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                rule = _Beneath(_WRITE_FILE, d)
                if libc.syscall(445, fd, 1, ctypes.byref(rule), 0) != 0:  # landlock_add_rule, PATH_BENEATH
                    raise OSError(ctypes.get_errno(), "landlock_add_rule /" + name)
            finally:
                os.close(d)
    except BaseException:
        os.close(fd)
        raise
    return fd
def confine(rules=None):
    """Confines the calling thread: a new Landlock domain of its own (from rules, a ruleset fd, or one made now), nice, seccomp."""
    fd = rules if rules is not None else ruleset()
    try:
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS (already set by Docker; required)
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
        # every call makes a new domain, whichever ruleset it is given: two commands are never in one
        if libc.syscall(446, fd, 0) != 0:  # landlock_restrict_self
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        if rules is None:
            os.close(fd)
    # Below the supervisor: a command (a fork bomb of 250 processes) competes with the shim for the
    # container's one CPU, and must not starve its timers. Per thread on Linux; the command inherits it
    # and cannot take it back (no CAP_SYS_NICE). Commands still share the CPU evenly among themselves.
    os.setpriority(os.PRIO_PROCESS, 0, _COMMAND_NICE)
    prog = _SECCOMP.get(os.uname().machine)
    if prog is not None:
        buf = ctypes.create_string_buffer(prog, len(prog))
        fprog = _Fprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
        if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            raise OSError(ctypes.get_errno(), "seccomp filter")

`;

/** The wrapper's Python, its error pipe at the descriptor `errFd` and the command's argv in `argv` (Python expressions). */
function execWrapperPy(errFd: string, argv: string): string {
  return String.raw`
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
${LANDLOCK_PY}
ERR = ${errFd}
os.set_inheritable(ERR, False)
argv = ${argv}
# the environment as given, not os.environ: Python's start-up adds LC_CTYPE (locale coercion) there
env = dict(kv.split(b"=", 1) for kv in open("/proc/self/environ", "rb").read().split(b"\0") if b"=" in kv)
try:
    # the OOM killer takes commands before the shim (COMMAND_OOM_SCORE_ADJ); before confine(), which
    # closes /proc to writes. Its own file is its own to write: this process is dumpable once it runs
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass  # a /proc that will not take it costs this protection, not the command
    if LANDLOCK:
        confine()
    os.execvpe(argv[0], argv, env)
except OSError as e:
    name = errno.errorcode.get(e.errno, "ESPAWN") if e.errno else "ESPAWN"
    os.write(ERR, ("%s %s" % (name, e.strerror or e)).encode())
    os._exit(127)
`;
}

/**
 * `python3 -I -S -c LANDLOCK_EXEC_PY argv...`: raises its own OOM bias,
 * confines itself, then execs argv with the environment it was given (PATH
 * lookup as Node's spawn does it; the environment is read back from
 * /proc/self/environ, as Python's start-up adds LC_CTYPE to os.environ). Fd 3
 * is the error pipe: closed on exec when it succeeds; on failure it carries
 * "ERRNO_NAME message" and the wrapper exits 127, so the shim reports a
 * spawn_error as for Node's own spawn.
 */
export const LANDLOCK_EXEC_PY = execWrapperPy("3", "sys.argv[1:]");

/**
 * `python3 -I -S -c LANDLOCK_EXEC_FD_PY FD argv...`: the same, its error pipe
 * at descriptor FD (the forker's Popen keeps a passed descriptor at its own
 * number). The forker starts a command through it when the shim could not
 * give the forker the commands' bias for the fork.
 */
export const LANDLOCK_EXEC_FD_PY = execWrapperPy("int(sys.argv[1])", "sys.argv[2:]");
