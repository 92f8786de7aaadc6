//! `sandboxd exec`'s fast path, for agent harnesses that start a process per
//! command: the plain form `sandboxd [--socket S] exec ID [--timeout SECS]
//! [--] COMMAND…`, run without starting Node (about 20 ms of every command on
//! these machines, a third of `docker exec`'s whole run).
//!
//! It speaks exactly what the Node CLI's streaming path speaks
//! (src/cli/exec.ts, src/client/frame-stream.ts, src/frames.ts): one
//! `POST /v1/phases/ID/exec?stream=frames`, the frames printed as they come
//! (output as its bytes, events said on stderr), and the same exit status.
//! The texts it prints and the tables behind them (which characters are
//! escaped, the error codes' hints and exit statuses, the signal numbers) are
//! generated from the TypeScript at build time (scripts/build-native.mjs), so
//! the two cannot drift apart.
//!
//! Any other form — another option, `--help`, an argument that is not UTF-8,
//! no socket it can name, a socket it cannot connect to — is handed to the
//! Node CLI (`node dist/cli/main.cjs`) before anything is sent, and Node
//! answers it with its own parsing, errors and hints.

use std::env;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{self, Command};

mod tables {
    include!(env!("SANDBOXD_EXEC_TABLES"));
}
mod json;

use json::Json;

/// What the fast path takes: everything else goes to Node.
struct Request {
    socket: String,
    id: String,
    argv: Vec<String>,
    timeout_ms: Option<u64>,
}

fn main() {
    let args: Vec<OsString> = env::args_os().skip(1).collect();
    let Some(req) = plain_form(&args) else { to_node(&args) };
    // Nothing is sent before the connection is made: a socket that cannot be
    // reached is Node's to report (its message names the cause and the fix).
    let Ok(sock) = UnixStream::connect(&req.socket) else { to_node(&args) };
    process::exit(run(&req, sock));
}

/// Replaces this process with the Node CLI, with the same arguments.
fn to_node(args: &[OsString]) -> ! {
    let main = env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("../cli/main.cjs")))
        .unwrap_or_else(|| PathBuf::from("dist/cli/main.cjs"));
    let err = Command::new("node").arg(main).args(args).exec();
    eprintln!("sandboxd: cannot start node for this command: {err}");
    process::exit(tables::EXIT_SANDBOXD_FAILED);
}

/// The plain form, read as src/cli/exec-args.ts reads it; None for anything else.
fn plain_form(args: &[OsString]) -> Option<Request> {
    let args: Vec<&str> = args.iter().map(|a| a.to_str()).collect::<Option<_>>()?;
    let mut i = 0;
    let mut socket = None;
    if args.first() == Some(&"--socket") && args.len() > 1 {
        socket = Some(args[1].to_string());
        i = 2;
    } else if let Some(s) = args.first().and_then(|a| a.strip_prefix("--socket=")) {
        socket = Some(s.to_string());
        i = 1;
    }
    if args.get(i) != Some(&"exec") {
        return None;
    }
    i += 1;
    let mut positional: Vec<&str> = Vec::new();
    let mut timeout_ms = None;
    while i < args.len() {
        let a = args[i];
        if a == "--" {
            positional.extend_from_slice(&args[i + 1..]);
            break;
        }
        if !a.starts_with('-') || a == "-" {
            positional.push(a);
        } else if timeout_ms.is_none() && (a == "--timeout" || a.starts_with("--timeout=")) {
            let value = match a.strip_prefix("--timeout=") {
                Some(v) => v,
                None => {
                    i += 1;
                    *args.get(i)?
                }
            };
            timeout_ms = Some(seconds(value)?);
        } else {
            return None;
        }
        i += 1;
    }
    let (id, argv) = positional.split_first()?;
    if argv.is_empty() {
        return None;
    }
    let socket = match socket {
        Some(s) => s,
        None => default_socket()?,
    };
    let socket = resolve(&socket)?;
    Some(Request { socket, id: id.to_string(), argv: argv.iter().map(|s| s.to_string()).collect(), timeout_ms })
}

/// `--timeout` in plain decimal seconds (digits, an optional fraction); other spellings are Node's to read.
fn seconds(value: &str) -> Option<u64> {
    let (whole, frac) = value.split_once('.').unwrap_or((value, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(frac) {
        return None;
    }
    let ms = (value.parse::<f64>().ok()? * 1000.0).round();
    // 0 ms (a timeout Node would send as none) and the absurd are Node's to answer
    (1.0..1e15).contains(&ms).then_some(ms as u64)
}

/// src/config/paths.ts clientSocket without --socket, where it needs no more than the environment.
fn default_socket() -> Option<String> {
    // set but not UTF-8: Node names it (with U+FFFD for the bytes), never the default socket
    if let Some(s) = env::var_os("SANDBOXD_SOCKET").filter(|s| !s.is_empty()) {
        return s.into_string().ok();
    }
    if real_uid()? == 0 {
        return Some("/run/sandboxd/sandboxd.sock".into());
    }
    let run = env::var("XDG_RUNTIME_DIR").ok().filter(|s| !s.is_empty())?;
    Some(format!("{}/sandboxd/sandboxd.sock", run.trim_end_matches('/')))
}

/// Node's path.resolve: absolute against the working directory, `.` and `..` taken by the letter (not
/// through symlinks), so both clients reach the same socket, and neither one whose absolute path is too long.
fn resolve(p: &str) -> Option<String> {
    let cwd = if p.starts_with('/') { String::new() } else { env::current_dir().ok()?.into_os_string().into_string().ok()? };
    let mut parts: Vec<&str> = Vec::new();
    for part in cwd.split('/').chain(p.split('/')) {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            _ => parts.push(part),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

fn real_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

/* ------------------------------ the request ------------------------------ */

fn run(req: &Request, mut sock: UnixStream) -> i32 {
    let mut body = String::from("{\"argv\":[");
    for (k, a) in req.argv.iter().enumerate() {
        if k > 0 {
            body.push(',');
        }
        json::quote(&mut body, a);
    }
    body.push(']');
    if let Some(ms) = req.timeout_ms {
        body.push_str(&format!(",\"timeoutMs\":{ms}"));
    }
    body.push('}');
    // head and body in one write: one wake-up of the daemon, not two
    let request = format!(
        "POST /v1/phases/{}/exec?stream=frames HTTP/1.1\r\nHost: sandboxd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        encode_uri_component(&req.id),
        body.len(),
        body
    );
    if let Err(e) = sock.write_all(request.as_bytes()) {
        return fail(&Failure::Plain(io_message("write", &e)));
    }
    let mut stream = Stream::new();
    match stream.follow(&mut sock) {
        Ok(code) => code,
        Err(f) => fail(&f),
    }
}

/// JavaScript's encodeURIComponent.
fn encode_uri_component(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How the exec ended without an exit status of the command's: said on stderr as printError says it.
enum Failure {
    /// a SandboxdError: code, message, hint
    Coded(String, Vec<u32>, Vec<u32>),
    /// any other error: its message
    Plain(String),
    /// the reader of our stdout went away
    BrokenPipe,
}

fn internal(message: String) -> Failure {
    Failure::Coded("SBX_ERR_INTERNAL".into(), cps(&message), cps(tables::hint("SBX_ERR_INTERNAL").unwrap_or("")))
}

fn fail(f: &Failure) -> i32 {
    match f {
        Failure::BrokenPipe => tables::EXIT_BROKEN_PIPE,
        Failure::Coded(code, message, hint) => {
            let mut text = cps("sandboxd: ");
            text.extend(message);
            text.extend(cps(&format!(" [{code}]\n  hint: ")));
            text.extend(hint);
            say(&text);
            tables::refusal_exit(code)
        }
        Failure::Plain(message) => {
            say(&cps(&format!("sandboxd: {message}")));
            tables::refusal_exit("")
        }
    }
}

/// Node's message for a socket error: `read ECONNRESET`.
fn io_message(op: &str, e: &io::Error) -> String {
    match e.raw_os_error().and_then(tables::errno_name) {
        Some(name) => format!("{op} {name}"),
        None => e.to_string(),
    }
}

/* ------------------------------ the response ----------------------------- */

const MAX_HEAD: usize = 64 * 1024;
const READ_BYTES: usize = 256 * 1024;
const FRAME_HEADER: usize = 5;
const MAX_STREAM_FRAME: usize = 16 * 1024 * 1024;
const FRAME_EVENT: u8 = 1;
const FRAME_STDOUT: u8 = 2;
const FRAME_STDERR: u8 = 3;

struct Head {
    status: u32,
    chunked: bool,
    /// None: not given (the body runs until the connection ends)
    length: Option<u64>,
}

#[derive(PartialEq)]
enum Chunk {
    Size,
    Data(usize),
    Crlf,
    Trailer,
    Done,
}

struct Stream {
    head: Option<Head>,
    head_bytes: Vec<u8>,
    chunk: Chunk,
    line: Vec<u8>,
    body_seen: u64,
    error_body: Vec<u8>,
    /// a frame's header or an event's payload gathered so far
    pending: Vec<u8>,
    /// bytes still to come of the output frame being written, and its kind
    out_left: usize,
    out_kind: u8,
    /// an event frame being gathered: its length
    event_len: Option<usize>,
    code: i32,
    stdout: ManuallyDrop<File>,
    stderr: ManuallyDrop<File>,
}

impl Stream {
    fn new() -> Stream {
        // the descriptors as they are, unbuffered: output is written as it comes
        let (stdout, stderr) = unsafe { (File::from_raw_fd(1), File::from_raw_fd(2)) };
        Stream {
            head: None,
            head_bytes: Vec::new(),
            chunk: Chunk::Size,
            line: Vec::new(),
            body_seen: 0,
            error_body: Vec::new(),
            pending: Vec::new(),
            out_left: 0,
            out_kind: 0,
            event_len: None,
            code: tables::EXIT_SANDBOXD_FAILED,
            stdout: ManuallyDrop::new(stdout),
            stderr: ManuallyDrop::new(stderr),
        }
    }

    /// Reads the response to its end; the exit status, or how it failed.
    fn follow(&mut self, sock: &mut UnixStream) -> Result<i32, Failure> {
        let mut buf = vec![0u8; READ_BYTES];
        loop {
            let n = match sock.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Plain(io_message("read", &e))),
            };
            if n == 0 {
                return self.end();
            }
            if self.on_chunk(&buf[..n])? {
                return self.end();
            }
        }
    }

    /// true when the response is complete
    fn on_chunk(&mut self, chunk: &[u8]) -> Result<bool, Failure> {
        let mut rest = chunk;
        if self.head.is_none() {
            self.head_bytes.extend_from_slice(chunk);
            let Some(end) = find(&self.head_bytes, b"\r\n\r\n") else {
                if self.head_bytes.len() > MAX_HEAD {
                    return Err(internal("the daemon's response head is over 64 KiB".into()));
                }
                return Ok(false);
            };
            self.head = Some(parse_head(&self.head_bytes[..end])?);
            let after = self.head_bytes.len() - (end + 4);
            rest = &chunk[chunk.len() - after..];
            self.head_bytes = Vec::new();
        }
        let head = self.head.as_ref().unwrap();
        if head.chunked {
            self.dechunk(rest)?;
            Ok(self.chunk == Chunk::Done)
        } else {
            let n = match head.length {
                Some(len) => (rest.len() as u64).min(len - self.body_seen.min(len)) as usize,
                None => rest.len(),
            };
            self.body_seen += n as u64;
            let length = head.length;
            self.on_body(&rest[..n])?;
            Ok(matches!(length, Some(len) if self.body_seen >= len))
        }
    }

    fn dechunk(&mut self, buf: &[u8]) -> Result<(), Failure> {
        let mut i = 0;
        while i < buf.len() && self.chunk != Chunk::Done {
            if let Chunk::Data(left) = self.chunk {
                let n = left.min(buf.len() - i);
                self.on_body(&buf[i..i + n])?;
                i += n;
                self.chunk = if left == n { Chunk::Crlf } else { Chunk::Data(left - n) };
                continue;
            }
            let nl = buf[i..].iter().position(|&b| b == b'\n').map(|p| p + i);
            let end = nl.unwrap_or(buf.len());
            self.line.extend_from_slice(&buf[i..end]);
            if self.line.len() > 1024 {
                return Err(internal("the exec stream's chunked framing is broken (a line over 1 KiB)".into()));
            }
            i = end;
            if nl.is_none() {
                break;
            }
            i += 1;
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            match self.chunk {
                Chunk::Crlf => {
                    if !line.is_empty() {
                        return Err(internal("the exec stream's chunked framing is broken (no CRLF after a chunk)".into()));
                    }
                    self.chunk = Chunk::Size;
                }
                Chunk::Size => {
                    let text = String::from_utf8_lossy(&line);
                    let size = text.split(';').next().unwrap_or("").trim();
                    let Ok(size) = usize::from_str_radix(size, 16) else {
                        let shown: String = text.chars().take(20).collect();
                        return Err(internal(format!("the exec stream's chunked framing is broken (chunk size {})", js_quote(&shown))));
                    };
                    self.chunk = if size == 0 { Chunk::Trailer } else { Chunk::Data(size) };
                }
                _ => {
                    if line.is_empty() {
                        self.chunk = Chunk::Done;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_body(&mut self, mut piece: &[u8]) -> Result<(), Failure> {
        if self.head.as_ref().unwrap().status >= 400 {
            self.error_body.extend_from_slice(piece);
            return Ok(());
        }
        while !piece.is_empty() {
            if self.out_left > 0 {
                let n = self.out_left.min(piece.len());
                self.output(self.out_kind, &piece[..n])?;
                self.out_left -= n;
                piece = &piece[n..];
                continue;
            }
            if let Some(len) = self.event_len {
                let n = (len - self.pending.len()).min(piece.len());
                self.pending.extend_from_slice(&piece[..n]);
                piece = &piece[n..];
                if self.pending.len() == len {
                    let payload = std::mem::take(&mut self.pending);
                    self.event_len = None;
                    self.event(&payload)?;
                }
                continue;
            }
            let n = (FRAME_HEADER - self.pending.len()).min(piece.len());
            self.pending.extend_from_slice(&piece[..n]);
            piece = &piece[n..];
            if self.pending.len() < FRAME_HEADER {
                continue;
            }
            let kind = self.pending[0];
            let length = u32::from_be_bytes([self.pending[1], self.pending[2], self.pending[3], self.pending[4]]) as usize;
            self.pending.clear();
            if length > MAX_STREAM_FRAME {
                return Err(Failure::Plain(format!(
                    "exec stream: a frame of {length} bytes (at most {MAX_STREAM_FRAME}): not a sandboxd frame stream"
                )));
            }
            if kind == FRAME_STDOUT || kind == FRAME_STDERR {
                self.out_left = length;
                self.out_kind = kind;
            } else {
                // an event, or a newer daemon's kind: gathered (and skipped unless an event)
                self.event_len = Some(length);
                self.out_kind = kind;
                if length == 0 {
                    self.event_len = None;
                    self.event(&[])?;
                }
            }
        }
        Ok(())
    }

    fn output(&mut self, kind: u8, bytes: &[u8]) -> Result<(), Failure> {
        if kind == FRAME_STDOUT {
            if let Err(e) = write_all(&mut self.stdout, bytes) {
                // a reader that stops early (`| head`) ends us as SIGPIPE ends a shell tool
                return Err(if e.kind() == io::ErrorKind::BrokenPipe { Failure::BrokenPipe } else { Failure::Plain(io_message("write", &e)) });
            }
        } else {
            let _ = write_all(&mut self.stderr, bytes);
        }
        Ok(())
    }

    fn event(&mut self, payload: &[u8]) -> Result<(), Failure> {
        if self.out_kind != FRAME_EVENT {
            return Ok(());
        }
        let ev = json::parse(payload).ok_or_else(|| Failure::Plain("Unexpected token in JSON at position 0 (an exec event)".into()))?;
        match ev.get("type").and_then(Json::as_str).as_deref() {
            Some("exit") => {
                let result = ev.get("result").unwrap_or(&Json::Null);
                self.code = exit_code_for(result);
                if let Some(esc) = result.get("escalation").filter(|e| e.truthy()) {
                    let mut text = cps("sandboxd: fail-fast: phase escalated (");
                    text.extend(js_string(esc.get("summary")));
                    text.extend(cps("); report "));
                    text.extend(js_string(esc.get("report")));
                    say(&text);
                }
                if result.get("timedOut").is_some_and(Json::truthy) {
                    let mut text = cps("sandboxd: command killed after its timeout (");
                    text.extend(js_string(result.get("durationMs")));
                    text.extend(cps(" ms)"));
                    say(&text);
                }
            }
            Some("error") => {
                let e = ev.get("error").unwrap_or(&Json::Null);
                let mut text = cps("sandboxd: ");
                text.extend(js_string(e.get("message")));
                text.extend(cps(" ["));
                text.extend(js_string(e.get("code")));
                text.extend(cps("]\n  hint: "));
                text.extend(js_string(e.get("hint")));
                say(&text);
                self.code = tables::refusal_exit(&e.get("code").and_then(Json::as_str).unwrap_or_default());
            }
            // "started", "waiting" (asked for only with --wait-approval, which Node takes) and newer types print nothing
            _ => {}
        }
        Ok(())
    }

    /// The connection ended (or the response is complete).
    fn end(&mut self) -> Result<i32, Failure> {
        let Some(head) = &self.head else {
            return Err(internal("the daemon closed the connection without answering".into()));
        };
        if head.status >= 400 {
            return Err(error_from_body(&self.error_body, head.status));
        }
        let complete = if head.chunked { self.chunk == Chunk::Done } else { head.length.is_none_or(|len| self.body_seen >= len) };
        // an event frame's header counts as Node counts it: bytes received of the unfinished frame
        let header = if self.event_len.is_some() { FRAME_HEADER } else { 0 };
        let cut = header + self.pending.len() + self.out_left + usize::from(!complete);
        if cut > 0 {
            say(&cps(&format!("sandboxd: the exec stream was cut off ({cut} bytes of an unfinished frame)")));
        }
        Ok(self.code)
    }
}

fn write_all(f: &mut File, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match f.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // O_NONBLOCK belongs to the pipe or terminal, set by any of its holders: wait until it drains, as Node does
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(f.as_raw_fd()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// poll(2) for POLLOUT (std has no wrapper; it links the C library that has it)
fn wait_writable(fd: i32) {
    #[repr(C)]
    struct PollFd {
        fd: i32,
        events: i16,
        revents: i16,
    }
    extern "C" {
        fn poll(fds: *mut PollFd, nfds: std::ffi::c_ulong, timeout: i32) -> i32;
    }
    const POLLOUT: i16 = 4;
    let mut p = PollFd { fd, events: POLLOUT, revents: 0 };
    // an error or hang-up shows in the next write
    unsafe { poll(&mut p, 1, -1) };
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(bytes: &[u8]) -> Result<Head, Failure> {
    let text: String = bytes.iter().map(|&b| b as char).collect(); // latin1, as Node reads it
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let status = first
        .strip_prefix("HTTP/1.")
        .filter(|r| r.starts_with("0 ") || r.starts_with("1 "))
        .map(|r| &r[2..])
        .filter(|r| r.len() >= 3 && r.as_bytes()[..3].iter().all(u8::is_ascii_digit))
        .and_then(|r| r[..3].parse::<u32>().ok());
    let Some(status) = status else {
        let shown: String = first.chars().take(80).collect();
        return Err(internal(format!("the daemon answered something that is not HTTP/1.1: {}", js_quote(&shown))));
    };
    let mut head = Head { status, chunked: false, length: None };
    for line in lines {
        let Some(colon) = line.find(':').filter(|&c| c > 0) else { continue };
        let name = line[..colon].trim().to_ascii_lowercase();
        let value = line[colon + 1..].trim().to_ascii_lowercase();
        if name == "transfer-encoding" {
            head.chunked = value.split(',').any(|s| s.trim() == "chunked");
        } else if name == "content-length" {
            head.length = value.parse().ok();
        }
    }
    Ok(head)
}

/// src/client/errors.ts errorFromBody
fn error_from_body(body: &[u8], status: u32) -> Failure {
    let json = json::parse(body).unwrap_or(Json::Null);
    if let Some(e) = json.get("error") {
        if let Some(code) = e.get("code").and_then(Json::as_str) {
            if let Some(default_hint) = tables::hint(&code) {
                let hint = match e.get("hint") {
                    None => cps(default_hint),
                    h => js_string(h),
                };
                return Failure::Coded(code, js_string(e.get("message")), hint);
            }
        }
    }
    internal(format!("daemon answered HTTP {status} without a coded error"))
}

/// src/cli/exit-codes.ts exitCodeFor
fn exit_code_for(result: &Json) -> i32 {
    if result.get("timedOut").is_some_and(Json::truthy) {
        return tables::EXIT_TIMEOUT;
    }
    match result.get("exitCode") {
        Some(Json::Num(n)) => return *n as i32,
        Some(Json::Null) | None => {}
        Some(_) => return tables::EXIT_SANDBOXD_FAILED,
    }
    match result.get("signal").and_then(Json::as_str).and_then(|s| tables::signal(&s)) {
        Some(n) if n > 0 => 128 + n,
        _ => tables::EXIT_SANDBOXD_FAILED,
    }
}

/* ------------------------------- the texts ------------------------------- */

fn cps(s: &str) -> Vec<u32> {
    s.chars().map(u32::from).collect()
}

/// `${value}` in a JavaScript template
fn js_string(v: Option<&Json>) -> Vec<u32> {
    match v {
        None => cps("undefined"),
        Some(Json::Str(s)) => s.clone(),
        Some(Json::Num(n)) => cps(&json::js_number(*n)),
        Some(Json::Bool(b)) => cps(if *b { "true" } else { "false" }),
        Some(Json::Null) => cps("null"),
        Some(Json::Arr(items)) => {
            let mut out = Vec::new();
            for (k, item) in items.iter().enumerate() {
                if k > 0 {
                    out.push(u32::from(','));
                }
                if !matches!(item, Json::Null) {
                    out.extend(js_string(Some(item)));
                }
            }
            out
        }
        Some(Json::Obj(_)) => cps("[object Object]"),
    }
}

/// JSON.stringify of a string (for the short excerpts in broken-stream messages)
fn js_quote(s: &str) -> String {
    let mut out = String::new();
    json::quote(&mut out, s);
    out
}

/// Said on stderr as src/cli/exec.ts `visible` says it: each line's invisible characters escaped.
fn say(text: &[u32]) {
    let mut out = String::new();
    for &cp in text {
        if cp == u32::from('\n') || !tables::invisible(cp) {
            out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
            continue;
        }
        match cp {
            0x0d => out.push_str("\\r"),
            0x09 => out.push_str("\\t"),
            0..=0xff => out.push_str(&format!("\\x{cp:02x}")),
            0x100..=0xffff => out.push_str(&format!("\\u{cp:04x}")),
            _ => out.push_str(&format!("\\U{cp:08x}")),
        }
    }
    out.push('\n');
    let mut stderr = ManuallyDrop::new(unsafe { File::from_raw_fd(2) });
    let _ = write_all(&mut stderr, out.as_bytes());
}
