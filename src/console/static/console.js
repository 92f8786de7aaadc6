// The operator console's page: phases, the approval queue and a phase's live
// audit stream, from the daemon's own /v1 API. Every string that comes from
// a sandbox (commands, output, SQL, reasons, names) reaches the page through
// textContent, never as markup, with control characters made visible.

const CSRF = document.querySelector('meta[name="sbx-csrf"]').content;
const $ = (id) => document.getElementById(id);

// ── text ─────────────────────────────────────────────────────────────────

// The same escapes as the CLI and build_audit.log (src/audit/format.ts, kept
// in step by hand: the page has no build): controls (ANSI escapes included),
// format characters (bidi overrides, zero-width), separators, surrogates,
// private-use and unassigned code points and look-alike spaces become
// `\x1b`, `\u202e`…, so output can neither repaint the page nor disguise itself.
const INVISIBLE = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Cs}\p{Co}\p{Cn}\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]/u;
const INVISIBLE_ALL = new RegExp(INVISIBLE.source, "gu");
const INVISIBLE_BUT_LINES = new RegExp(`(?![\\n\\t])${INVISIBLE.source}`, "gu");
const SAFE_ARG = /^[\w@%+=:,./-]+$/;

function escapeChar(ch) {
  if (ch === "\n") return "\\n";
  if (ch === "\r") return "\\r";
  if (ch === "\t") return "\\t";
  const cp = ch.codePointAt(0);
  if (cp <= 0xff) return `\\x${cp.toString(16).padStart(2, "0")}`;
  if (cp <= 0xffff) return `\\u${cp.toString(16).padStart(4, "0")}`;
  return `\\U${cp.toString(16).padStart(8, "0")}`;
}
/** Multi-line text (output): newlines and tabs kept, every other invisible character escaped. */
export function visible(s) {
  return String(s).replace(INVISIBLE_BUT_LINES, escapeChar);
}
/** One line: newlines and tabs escaped too. */
export function visibleLine(s) {
  return String(s).replace(INVISIBLE_ALL, escapeChar);
}
/** argv as a shell would read it: quoted where needed, `$'…'` with escapes when a word holds an invisible character. */
export function shellWords(argv) {
  return argv
    .map((a) => {
      if (a !== "" && SAFE_ARG.test(a)) return a;
      if (!INVISIBLE.test(a)) return `'${a.replace(/'/g, `'\\''`)}'`;
      let out = "";
      for (const ch of a) out += ch === "\\" || ch === "'" ? `\\${ch}` : INVISIBLE.test(ch) ? escapeChar(ch) : ch;
      return `$'${out}'`;
    })
    .join(" ");
}
function excerpt(s, max = 4000) {
  const t = String(s);
  return t.length > max ? `${t.slice(0, max)}… (${t.length - max} more characters)` : t;
}
export function age(fromIso, now = Date.now()) {
  const s = Math.max(0, Math.floor((now - Date.parse(fromIso)) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

/** An element; `text` is set with textContent (the one way text enters the page). */
function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else if (k === "data") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c) e.append(c);
  return e;
}

function say(msg) {
  $("status").textContent = msg ? visibleLine(msg) : "";
}

// ── API ──────────────────────────────────────────────────────────────────

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: { "x-sandboxd-csrf": CSRF, ...(body === undefined ? {} : { "content-type": "application/json" }) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401) {
    location.replace("/login");
    throw new Error("logged out");
  }
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const e = data.error ?? {};
    throw new Error(`${e.code ?? `HTTP ${res.status}`}: ${e.message ?? ""}${e.hint ? ` (${e.hint})` : ""}`);
  }
  return data;
}

// ── phases ───────────────────────────────────────────────────────────────

const state = { phases: [], selected: null, follow: null };

async function refreshPhases() {
  const { phases } = await api("GET", "/v1/phases");
  state.phases = phases;
  const showEnded = $("show-ended").checked;
  const live = new Set(["starting", "running", "stopping", "escalated", "paused"]);
  const rows = phases
    .filter((p) => showEnded || live.has(p.state) || p.id === state.selected)
    .reverse()
    .map((p) =>
      el(
        "tr",
        { data: { phase: p.id }, class: p.id === state.selected ? "selected" : "" },
        el("td", { text: visibleLine(p.name) }),
        el("td", { class: "mono", text: p.id }),
        el("td", { class: `state state-${p.state}`, text: p.state + (p.endReason ? ` (${visibleLine(p.endReason)})` : "") }),
        el("td", { text: p.mode }),
        el("td", { class: "age", text: age(p.createdAt) }),
        el("td", { class: "running", text: String(p.runningExecs ?? 0) }),
        el(
          "td",
          {},
          el("button", { type: "button", class: "watch", text: "Audit", onclick: () => selectPhase(p.id) }),
          live.has(p.state) ? el("button", { type: "button", class: "stop", text: "Stop", onclick: () => stopPhase(p.id) }) : null,
        ),
      ),
    );
  $("phases").tBodies[0].replaceChildren(...rows);
}

async function stopPhase(id) {
  say(`stopping ${id}…`);
  try {
    await api("DELETE", `/v1/phases/${id}`);
    say("");
  } catch (e) {
    say(e.message);
  }
  await refreshPhases().catch(() => undefined);
}

$("start-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  say("starting a phase…");
  try {
    const { phase } = await api("POST", "/v1/phases", { project: $("start-project").value.trim(), phase: $("start-name").value.trim(), mode: $("start-mode").value });
    say("");
    await refreshPhases();
    selectPhase(phase.id);
  } catch (e) {
    say(e.message);
  }
});
$("show-ended").addEventListener("change", () => void refreshPhases());

// ── audit stream ─────────────────────────────────────────────────────────

const MAX_AUDIT_ROWS = 2000;
const DECISION = { allow: "allow", ask: "ask", forbid: "forbid", deny: "deny" };

/** What a record says, as elements built from text. */
function describe(r) {
  const parts = [];
  const line = (text, cls) => parts.push(el("code", { class: `mono ${cls ?? ""}`, text: visibleLine(text) }));
  const block = (label, text) => parts.push(el("pre", { class: `out ${label}`, text: visible(excerpt(text)) }));
  if (Array.isArray(r.argv)) line(shellWords(r.argv), "cmd-text");
  else if (typeof r.command === "string") line(r.command, "cmd-text");
  if (typeof r.sql === "string") line(r.sql, "sql");
  if (r.decision) parts.push(el("span", { class: `decision ${DECISION[r.decision] ?? ""}`, text: ` ${r.decision}` }));
  if (r.type === "exec.result") {
    parts.push(el("span", { class: "exit", text: ` exit ${r.exitCode ?? `signal ${r.signal}`}${r.timedOut ? " (timeout)" : ""} · ${r.durationMs} ms` }));
    if (r.stdout) block("stdout", r.stdout);
    if (r.stderr) block("stderr", r.stderr);
  }
  if (r.rule) parts.push(el("span", { class: "muted", text: ` ${r.rule}${r.clause ? ` — ${visibleLine(r.clause)}` : ""}` }));
  // everything else the record carries, as one line of JSON text
  const shown = new Set(["seq", "ts", "prev", "hash", "type", "phase", "argv", "command", "sql", "decision", "rule", "clause", "stdout", "stderr", "exitCode", "signal", "timedOut", "durationMs"]);
  const rest = Object.fromEntries(Object.entries(r).filter(([k, v]) => !shown.has(k) && v !== null && !(Array.isArray(v) && v.length === 0)));
  if (Object.keys(rest).length) parts.push(el("div", { class: "muted mono rest", text: visibleLine(excerpt(JSON.stringify(rest), 1000)) }));
  return parts;
}

function appendAudit(r) {
  const list = $("audit");
  const refused = /refus|deny|denied|forbid/.test(r.type) || r.decision === "forbid";
  const li = el(
    "li",
    { data: { seq: String(r.seq), type: r.type }, class: refused ? "refused" : "" },
    el("span", { class: "ts", text: String(r.ts ?? "").slice(11, 23) }),
    el("span", { class: "type", text: visibleLine(r.type) }),
    ...describe(r),
  );
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
  list.append(li);
  while (list.children.length > MAX_AUDIT_ROWS) list.firstElementChild.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

async function followAudit(id, signal) {
  const res = await fetch(`/v1/audit?phase=${id}&follow=1&last=500`, { credentials: "same-origin", signal });
  if (res.status === 401) return location.replace("/login");
  if (!res.ok || !res.body) throw new Error(`audit stream: HTTP ${res.status}`);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (line.trim()) appendAudit(JSON.parse(line));
    }
  }
}

function selectPhase(id) {
  if (state.selected === id) return;
  state.follow?.abort();
  state.selected = id;
  const ac = new AbortController();
  state.follow = ac;
  const p = state.phases.find((x) => x.id === id);
  $("audit-phase").textContent = p ? `${visibleLine(p.name)} · ${id}` : id;
  $("audit").replaceChildren();
  for (const tr of $("phases").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.phase === id);
  followAudit(id, ac.signal).catch((e) => {
    if (!ac.signal.aborted) say(e.message);
  });
}

// ── approvals ────────────────────────────────────────────────────────────

const cards = new Map();

function approvalCard(a) {
  const note = el("input", { class: "note", placeholder: "note (optional, recorded in the audit trail)", maxlength: "2000" });
  const decide = (decision) => async () => {
    say(`${decision === "approve" ? "approving" : "denying"} ${a.id}…`);
    try {
      await api("POST", `/v1/approvals/${a.id}/${decision}`, note.value ? { note: note.value } : {});
      say("");
    } catch (e) {
      say(e.message);
    }
    await refreshApprovals().catch(() => undefined);
  };
  const what = a.workspace ? `iteration ${a.workspace.iteration}: ${a.workspace.paths.join(", ")}` : a.argv ? shellWords(a.argv) : (a.command ?? a.sql ?? "");
  const phase = state.phases.find((p) => p.id === a.phaseId);
  const li = el(
    "li",
    { data: { approval: a.id } },
    el(
      "div",
      {},
      el("span", { class: "waited", text: `waiting ${age(a.requestedAt)}` }),
      el("span", { class: "muted", text: ` · ${a.id} · phase ${phase ? visibleLine(phase.name) : ""} ${a.phaseId}${a.sql ? " · SQL" : ""}` }),
    ),
    el("code", { class: "cmd", text: visibleLine(what) }),
    el("div", { class: "rule" }, el("strong", { text: visibleLine(a.ruleId) }), el("span", { class: "muted", text: ` — ${visibleLine(a.clause ?? "")}` })),
    a.policyReason ? el("div", { class: "policy-reason muted", text: `policy: ${visibleLine(a.policyReason)}` }) : null,
    el("div", { class: "reason", text: `agent's reason: ${a.requestReason ? visibleLine(a.requestReason) : "(none given)"}` }),
    ...(a.laterReasons ?? []).map((r) => el("div", { class: "reason later muted", text: `later (${r.at}): ${visibleLine(r.reason)}` })),
    a.files?.length ? el("div", { class: "files muted mono", text: `runs: ${a.files.map((f) => `${visibleLine(f.path)} ${f.sha256 ? f.sha256.slice(0, 12) : `(${f.note})`}`).join(", ")}` }) : null,
    a.retries ? el("div", { class: "muted", text: `asked ${a.retries + 1} times` }) : null,
    el(
      "div",
      { class: "actions" },
      note,
      el("button", { type: "button", class: "approve", text: "Approve", onclick: decide("approve") }),
      el("button", { type: "button", class: "deny", text: "Deny", onclick: decide("deny") }),
    ),
  );
  return li;
}

async function refreshApprovals() {
  const { approvals } = await api("GET", "/v1/approvals");
  const ids = new Set(approvals.map((a) => a.id));
  for (const [id, li] of cards) {
    if (!ids.has(id)) {
      li.remove();
      cards.delete(id);
    }
  }
  // oldest first: the one waiting longest is at the top. A card is built once, so a note being typed survives refreshes.
  for (const a of approvals) {
    if (!cards.has(a.id)) {
      const li = approvalCard(a);
      cards.set(a.id, li);
      $("approvals").append(li);
    }
    cards.get(a.id).querySelector(".waited").textContent = `waiting ${age(a.requestedAt)}`;
  }
  $("approval-count").textContent = approvals.length ? String(approvals.length) : "";
  $("approvals-empty").hidden = approvals.length > 0;
}

// ── iterations and escalations ───────────────────────────────────────────

const reviews = new Map();

/** A card built once (a note being typed survives refreshes), removed when its subject is no longer waiting. */
function keepCards(list, wanted) {
  for (const [key, li] of reviews) {
    if (li.parentElement === list && !wanted.has(key)) {
      li.remove();
      reviews.delete(key);
    }
  }
  for (const [key, make] of wanted) {
    if (!reviews.has(key)) {
      const li = make();
      reviews.set(key, li);
      list.append(li);
    }
  }
}

/** A pending iteration (docs/WORKSPACE.md): its changes, why it waits, the diff, accept or reject with a note. */
function iterationCard(p, it) {
  const note = el("input", { class: "note", placeholder: "note (optional, recorded in the audit trail)", maxlength: "2000" });
  const diff = el("pre", { class: "out diff", text: "loading the diff…" });
  api("GET", `/v1/phases/${p.id}/diff`)
    .then((d) => (diff.textContent = visible(excerpt(d.diff || "(no textual difference)", 20000))))
    .catch((e) => (diff.textContent = visibleLine(e.message)));
  const decide = (decision) => async () => {
    say(`${decision === "accept" ? "accepting" : "rejecting"} iteration ${it.n} of ${p.id}…`);
    try {
      await api("POST", `/v1/phases/${p.id}/iterations/${it.n}/${decision}`, note.value ? { note: note.value } : {});
      say("");
    } catch (e) {
      say(e.message);
    }
    await tick();
  };
  return el(
    "li",
    { data: { iteration: `${p.id}/${it.n}` } },
    el("div", {}, el("strong", { text: `iteration ${it.n}` }), el("span", { class: "muted", text: ` · phase ${visibleLine(p.name)} ${p.id} · ${visibleLine(it.trigger ?? "")}${it.at ? ` · waiting ${age(it.at)}` : ""}` })),
    el("div", { class: "message", text: visibleLine(it.message ?? "") }),
    ...(it.failures ?? []).map((f) => el("div", { class: "failure" }, el("strong", { text: visibleLine(f.rule) }), el("span", { class: "muted", text: ` ${f.path ? `${visibleLine(f.path)}: ` : ""}${visibleLine(f.message)} — ${visibleLine(f.clause ?? "")}` }))),
    (it.changes ?? []).length ? el("div", { class: "files muted mono", text: `changes: ${it.changes.map((c) => `${c.kind} ${visibleLine(c.path)}`).join(", ")}` }) : null,
    diff,
    el(
      "div",
      { class: "actions" },
      note,
      el("button", { type: "button", class: "accept", text: "Accept", onclick: decide("accept") }),
      el("button", { type: "button", class: "reject", text: "Reject", onclick: decide("reject") }),
    ),
  );
}

/** An open escalation (SKILLS.md Human Escalation Log): the report's text; resume (a note is required) or abort. */
function escalationCard(e) {
  const note = el("input", { class: "note", placeholder: "note (required to resume; recorded in the audit trail)", maxlength: "2000" });
  const report = el("pre", { class: "out report", text: "loading the report…" });
  api("GET", `/v1/phases/${e.phase}/escalation`)
    .then((r) => (report.textContent = visible(excerpt(r.text ?? "(the report could not be read)", 20000))))
    .catch((err) => (report.textContent = visibleLine(err.message)));
  const act = (what) => async () => {
    say(`${what === "resume" ? "resuming" : "aborting"} ${e.phase}…`);
    try {
      await api("POST", `/v1/phases/${e.phase}/${what}`, note.value ? { note: note.value } : {});
      say("");
    } catch (err) {
      say(err.message);
    }
    await tick();
  };
  return el(
    "li",
    { data: { escalation: `${e.phase}/${e.n}` } },
    el("div", {}, el("strong", { text: `escalation ${e.n}: ${visibleLine(e.category ?? "")}` }), el("span", { class: "muted", text: ` · phase ${visibleLine(e.name)} ${e.phase} · waiting ${age(e.at)}` })),
    el("div", { class: "summary", text: visibleLine(e.summary ?? "") }),
    report,
    el(
      "div",
      { class: "actions" },
      note,
      el("button", { type: "button", class: "resume", text: "Resume", onclick: act("resume") }),
      el("button", { type: "button", class: "abort", text: "Abort", onclick: act("abort") }),
    ),
  );
}

async function refreshReviews() {
  const wantedIt = new Map();
  for (const p of state.phases) {
    if (p.state !== "running") continue;
    for (const it of p.workspace?.iterations ?? []) if (it.state === "pending") wantedIt.set(`it:${p.id}:${it.n}`, () => iterationCard(p, it));
  }
  keepCards($("iterations"), wantedIt);
  const { escalations } = await api("GET", "/v1/escalations");
  const wantedEsc = new Map(escalations.map((e) => [`esc:${e.phase}:${e.n}`, () => escalationCard(e)]));
  keepCards($("escalations"), wantedEsc);
  const n = wantedIt.size + wantedEsc.size;
  $("review-count").textContent = n ? String(n) : "";
  $("review-empty").hidden = n > 0;
}

// ── start ────────────────────────────────────────────────────────────────

$("logout").addEventListener("click", async () => {
  await fetch("/logout", { method: "POST", credentials: "same-origin", headers: { "x-sandboxd-csrf": CSRF } });
  location.replace("/login");
});

async function tick() {
  try {
    await refreshPhases();
    await refreshApprovals();
    await refreshReviews();
  } catch (e) {
    say(e.message);
  }
}

api("GET", "/v1/health")
  .then((h) => ($("daemon").textContent = `v${h.version} · ${h.instance}`))
  .catch(() => undefined);
await tick();
setInterval(tick, 1000);
