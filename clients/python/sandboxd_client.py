"""sandboxd_client: a small, stdlib-only Python client for the sandboxd daemon.

For harness authors driving phases from Python (3.8+). It speaks the daemon's
HTTP API over its unix socket (docs/API.md is the reference) and raises
SandboxdError, carrying the daemon's code and hint, for every refusal.

    from sandboxd_client import Sandboxd, SandboxdError

    sbx = Sandboxd()                                   # $SANDBOXD_SOCKET or the default socket
    phase = sbx.start_phase("/srv/repo", "2.3", "backtest")
    result = sbx.exec(phase["id"], ["pytest", "-q", "tests/"],
                      on_stdout=lambda text: print(text, end=""))
    print(result["exitCode"])
    sbx.stop_phase(phase["id"])

Branch on `SandboxdError.code` (e.g. "SBX_ERR_POLICY_NEEDS_APPROVAL"), never
on the message.
"""

import base64
import codecs
import http.client
import json
import os
import socket
import urllib.parse

__all__ = ["Sandboxd", "SandboxdError", "default_socket"]


class SandboxdError(Exception):
    """An error the daemon answered with: code (SBX_ERR_*), message, hint, details, HTTP status."""

    def __init__(self, code, message, hint=None, details=None, status=None):
        super().__init__("%s [%s]" % (message, code))
        self.code = code
        self.message = message
        self.hint = hint
        self.details = details
        self.status = status


def default_socket():
    """The socket the CLI would use: $SANDBOXD_SOCKET, else the daemon's default for this user."""
    env = os.environ.get("SANDBOXD_SOCKET")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/sandboxd/sandboxd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "sandboxd", "sandboxd.sock")
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "sandboxd", "sandboxd.sock")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("sandboxd", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError as e:
            s.close()
            raise SandboxdError(
                "SBX_ERR_DAEMON_UNREACHABLE",
                "cannot reach the sandboxd daemon at %s (%s)" % (self._path, e.strerror or e),
                hint="start it with `sandboxd start` (or `npm start`), or pass the socket it serves",
            ) from e
        self.sock = s


# frame kinds of the exec byte stream (src/frames.ts)
_EVENT, _STDOUT, _STDERR = 1, 2, 3


def _read_exact(resp, n):
    """n bytes from the response; None at its clean end (nothing read); raises when it ends inside them."""
    parts = []
    got = 0
    while got < n:
        part = resp.read(n - got)
        if not part:
            if got == 0:
                return None
            raise SandboxdError("SBX_ERR_INTERNAL", "the exec stream was cut off inside a frame")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _query(params):
    items = [(k, v) for k, v in params.items() if v is not None]
    return ("?" + urllib.parse.urlencode(items)) if items else ""


class Sandboxd:
    """One daemon, reached through its unix socket. Each call opens its own connection."""

    def __init__(self, socket_path=None, timeout=None):
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout

    # ------------------------------------------------------------ plumbing

    def _send(self, method, path, body=None, timeout=None):
        conn = _UnixConnection(self.socket_path, timeout if timeout is not None else self.timeout)
        payload = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"content-type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        return conn, conn.getresponse()

    @staticmethod
    def _raise_for(resp, raw):
        try:
            err = json.loads(raw.decode("utf-8")).get("error") or {}
        except ValueError:
            err = {}
        raise SandboxdError(
            err.get("code", "SBX_ERR_INTERNAL"),
            err.get("message", "daemon answered HTTP %d without a coded error" % resp.status),
            hint=err.get("hint"),
            details=err.get("details"),
            status=resp.status,
        )

    def request(self, method, path, body=None):
        """Any JSON route (e.g. one newer than this client): the decoded answer, or SandboxdError."""
        conn, resp = self._send(method, path, body)
        try:
            raw = resp.read()
            if resp.status >= 400:
                self._raise_for(resp, raw)
            return json.loads(raw.decode("utf-8")) if raw else {}
        finally:
            conn.close()

    def _ndjson(self, method, path, body=None):
        """Yields the events of a streaming route; errors before the stream starts raise."""
        conn, resp = self._send(method, path, body, timeout=None)
        try:
            if resp.status >= 400:
                self._raise_for(resp, resp.read())
            for line in resp:
                line = line.strip()
                if line:
                    yield json.loads(line.decode("utf-8"))
        finally:
            conn.close()

    def _frames(self, method, path, body=None):
        """Yields (kind, payload) frames of a byte stream (docs/API.md "Streaming exec"); errors before it starts raise."""
        conn, resp = self._send(method, path, body, timeout=None)
        try:
            if resp.status >= 400:
                self._raise_for(resp, resp.read())
            while True:
                head = _read_exact(resp, 5)
                if head is None:
                    return
                length = int.from_bytes(head[1:5], "big")
                payload = _read_exact(resp, length)
                if payload is None:
                    raise SandboxdError("SBX_ERR_INTERNAL", "the exec stream was cut off inside a frame")
                yield head[0], payload
        finally:
            conn.close()

    # -------------------------------------------------------------- daemon

    def health(self):
        return self.request("GET", "/v1/health")

    # -------------------------------------------------------------- phases

    def start_phase(self, project, phase, mode, policy=None):
        """Starts a phase on `project` (an absolute path); returns the phase record once it is running."""
        body = {"project": os.path.abspath(project), "phase": phase, "mode": mode}
        if policy is not None:
            body["policy"] = os.path.abspath(policy)
        return self.request("POST", "/v1/phases", body)["phase"]

    def phases(self):
        return self.request("GET", "/v1/phases")["phases"]

    def phase(self, phase_id):
        return self.request("GET", "/v1/phases/%s" % phase_id)["phase"]

    def stop_phase(self, phase_id):
        return self.request("DELETE", "/v1/phases/%s" % phase_id)["phase"]

    # ---------------------------------------------------------------- exec

    def exec(self, phase_id, argv=None, command=None, timeout_ms=None, reason=None, on_stdout=None, on_stderr=None,
             wait_approval_ms=None, on_waiting=None, cwd=None, env=None, stdin=None, on_started=None,
             on_stdout_bytes=None, on_stderr_bytes=None):
        """Runs a command in the phase and returns its result (exitCode, signal, timedOut, stdout, …).

        Give argv (a list, no shell) or command (a string the policy judges part
        by part). With on_stdout/on_stderr the output streams to those callbacks
        as it arrives (text, secrets already scrubbed); without, it comes back in
        the result. A refused command raises SandboxdError (code
        SBX_ERR_POLICY_DENIED or SBX_ERR_POLICY_NEEDS_APPROVAL, details naming
        the rule and, for the latter, the approval id; SBX_ERR_APPROVAL_DENIED
        when a person denied it, details.note saying why;
        SBX_ERR_APPROVAL_STALE when the files it runs changed after approval).

        With wait_approval_ms, a command the policy sends to a person waits up
        to that long for their decision: approved, it runs and this returns its
        result; denied, SBX_ERR_APPROVAL_DENIED; no decision in time, the usual
        SBX_ERR_POLICY_NEEDS_APPROVAL with details.approvalId. on_waiting (with
        streaming) gets {approvalId, command, rule, waitMs} when the wait starts.

        cwd: where the command starts, relative to the workspace (or under
        /workspace); env: a dict of variables of its own (reserved names raise
        SBX_ERR_ENV_RESERVED); stdin: str or bytes for its stdin (at most 512
        KiB). on_started (streams) gets {id, pid, rule}: the id cancel() takes.
        on_stdout_bytes/on_stderr_bytes (stream) get the output as the bytes the
        command wrote, in the pieces they arrive in, never decoded (for logs,
        archives, output that is not text); with on_stdout too, both are called.
        """
        body = self._exec_body(argv, command, timeout_ms, reason, wait_approval_ms, cwd, env, stdin)
        path = "/v1/phases/%s/exec" % phase_id
        raw = {_STDOUT: on_stdout_bytes, _STDERR: on_stderr_bytes}
        if on_stdout is None and on_stderr is None and on_waiting is None and on_started is None and on_stdout_bytes is None and on_stderr_bytes is None:
            return self.request("POST", path, body)["result"]
        # output arrives as bytes; a character split between frames is joined before the callback sees it
        text = {_STDOUT: codecs.getincrementaldecoder("utf-8")("replace"), _STDERR: codecs.getincrementaldecoder("utf-8")("replace")}
        say = {_STDOUT: on_stdout, _STDERR: on_stderr}

        def flush():
            for k in (_STDOUT, _STDERR):
                rest = text[k].decode(b"", final=True)
                if rest and say[k] is not None:
                    say[k](rest)

        for frame_kind, payload in self._frames("POST", path + "?stream=frames", body):
            if frame_kind in (_STDOUT, _STDERR):
                if raw[frame_kind] is not None:
                    raw[frame_kind](bytes(payload))
                if say[frame_kind] is None:
                    continue
                chunk = text[frame_kind].decode(payload)
                if chunk and say[frame_kind] is not None:
                    say[frame_kind](chunk)
                continue
            if frame_kind != _EVENT:
                continue  # frames of kinds newer daemons may add
            event = json.loads(payload.decode("utf-8"))
            kind = event.get("type")
            if kind in ("exit", "error"):
                flush()
            if kind == "started" and on_started is not None:
                on_started(event)
            elif kind == "waiting" and on_waiting is not None:
                on_waiting(event)
            elif kind == "exit":
                return event["result"]
            elif kind == "error":
                err = event.get("error") or {}
                raise SandboxdError(err.get("code", "SBX_ERR_INTERNAL"), err.get("message", "the command failed"),
                                    hint=err.get("hint"), details=err.get("details"))
            # other event types (newer daemons) are skipped
        raise SandboxdError("SBX_ERR_INTERNAL", "the exec stream ended without a result",
                            hint="the daemon may have stopped; check `sandboxd phase show %s`" % phase_id)

    # ----------------------------------------------------------- approvals

    @staticmethod
    def _exec_body(argv, command, timeout_ms, reason, wait_approval_ms, cwd, env, stdin):
        if (argv is None) == (command is None):
            raise ValueError("give exactly one of argv (a list) or command (a string)")
        body = {"argv": list(argv)} if argv is not None else {"command": command}
        if timeout_ms is not None:
            body["timeoutMs"] = int(timeout_ms)
        if reason is not None:
            body["reason"] = reason
        if wait_approval_ms is not None:
            body["waitApprovalMs"] = int(wait_approval_ms)
        if cwd is not None:
            body["cwd"] = cwd
        if env is not None:
            body["env"] = dict(env)
        if isinstance(stdin, str):
            body["stdin"] = stdin
        elif stdin is not None:
            body["stdinBase64"] = base64.b64encode(bytes(stdin)).decode("ascii")
        return body

    def execs(self, phase_id):
        """The phase's running commands (foreground and background jobs), each with its id."""
        return self.request("GET", "/v1/phases/%s/execs" % phase_id)["execs"]

    def cancel(self, phase_id, exec_id, note=None):
        """Cancels a running command by id (SIGTERM, SIGKILL after the kill grace)."""
        return self.request("POST", "/v1/phases/%s/execs/%s/cancel" % (phase_id, exec_id), {} if note is None else {"note": note})["exec"]

    # ------------------------------------------------------------ jobs

    def start_job(self, phase_id, argv=None, command=None, timeout_ms=None, reason=None, cwd=None, env=None, stdin=None):
        """Starts a background job; returns it ({id: "jb_…", state: "running", …}) as soon as it runs."""
        body = self._exec_body(argv, command, timeout_ms, reason, None, cwd, env, stdin)
        body["background"] = True
        return self.request("POST", "/v1/phases/%s/exec" % phase_id, body)["job"]

    def jobs(self, phase_id):
        return self.request("GET", "/v1/phases/%s/jobs" % phase_id)["jobs"]

    def job(self, phase_id, job_id):
        return self.request("GET", "/v1/phases/%s/jobs/%s" % (phase_id, job_id))["job"]

    def job_output(self, phase_id, job_id):
        """What the job printed so far: {stdout, stderr, stdoutBytes, …}."""
        return self.request("GET", "/v1/phases/%s/jobs/%s/output" % (phase_id, job_id))["output"]

    def wait_job(self, phase_id, job_id, timeout_ms=None):
        """Waits until the job ends or timeout_ms passes (default 30 s); the job then (state tells which)."""
        q = _query({"timeoutMs": None if timeout_ms is None else str(int(timeout_ms))})
        return self.request("GET", "/v1/phases/%s/jobs/%s/wait%s" % (phase_id, job_id, q))["job"]

    def kill_job(self, phase_id, job_id, note=None):
        return self.request("POST", "/v1/phases/%s/jobs/%s/kill" % (phase_id, job_id), {} if note is None else {"note": note})["job"]

    def approvals(self, phase_id=None, all=False):
        return self.request("GET", "/v1/approvals" + _query({"phase": phase_id, "all": "1" if all else None}))["approvals"]

    def approval(self, approval_id):
        return self.request("GET", "/v1/approvals/%s" % approval_id)["approval"]

    def approve(self, approval_id, note=None):
        return self.request("POST", "/v1/approvals/%s/approve" % approval_id, {} if note is None else {"note": note})["approval"]

    def deny(self, approval_id, note=None):
        return self.request("POST", "/v1/approvals/%s/deny" % approval_id, {} if note is None else {"note": note})["approval"]

    # --------------------------------------------------------------- audit

    def audit(self, phase_id=None, after=None, last=None):
        """Records of audit.jsonl (optionally one phase's, after a sequence number, or the last N)."""
        return self.request("GET", "/v1/audit" + _query({"phase": phase_id, "after": after, "last": last}))["records"]

    def follow_audit(self, phase_id=None, after=None):
        """Yields audit records as they are written, forever (close the generator to stop)."""
        return self._ndjson("GET", "/v1/audit" + _query({"phase": phase_id, "after": after, "follow": "1"}))

    def verify_audit(self):
        return self.request("GET", "/v1/audit/verify")["verify"]

    def audit_key(self):
        """The public key that signs the trail's anchors: {fingerprint, publicKey (PEM), keyFile}. Give it to auditors."""
        return self.request("GET", "/v1/audit/key")["key"]

    def export_audit(self, path, nonce=None):
        """`sandboxd audit export -o PATH`: the whole trail as a bundle (docs/AUDIT.md "Export bundle").

        Written to PATH.part, checked for its shape — a header, every record,
        the signed anchor at the last record, which is the export's own
        (`audit.export`, answering `nonce` when given) — then renamed to PATH.
        Returns {path, records, lastSeq, key, nonce}. The chain and the
        ed25519 signature are checked by `sandboxd audit verify --bundle PATH
        --key PUB [--nonce N]` (Python's standard library has no ed25519).
        """
        conn, resp = self._send("GET", "/v1/audit/export" + _query({"nonce": nonce}), timeout=None)
        part = path + ".part"
        header = last_record = anchor = None
        count = 0
        try:
            if resp.status >= 400:
                self._raise_for(resp, resp.read())
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                pending = None
                for line in resp:
                    out.write(line)
                    if header is None:
                        header = json.loads(line.decode("utf-8"))
                        continue
                    if pending is not None:
                        last_record = pending
                        count += 1
                    pending = line
                try:
                    anchor = json.loads(pending.decode("utf-8")).get("anchor") if pending else None
                except ValueError:
                    anchor = None  # cut short mid-line: reported below
        finally:
            conn.close()
        record = json.loads(last_record.decode("utf-8")) if last_record else {}
        problem = None
        if not header or header.get("bundle") != "sandboxd.audit.bundle.v1":
            problem = "no bundle header"
        elif not anchor or anchor.get("seq") != record.get("seq") or anchor.get("hash") != record.get("hash"):
            problem = "the bundle does not end with a signed anchor over its last record (cut short?)"
        elif record.get("type") != "audit.export" or header.get("records") != count:
            problem = "the bundle does not end at its own audit.export record, or its header counts other records"
        elif nonce is not None and record.get("nonce") != nonce:
            problem = "the bundle answers nonce %r, not %r" % (record.get("nonce"), nonce)
        if problem:
            raise SandboxdError("SBX_ERR_AUDIT_CORRUPT", "the exported bundle does not check: %s; left at %s" % (problem, part))
        os.replace(part, path)
        return {"path": path, "records": count, "lastSeq": anchor["seq"], "key": anchor["key"], "nonce": record.get("nonce")}
