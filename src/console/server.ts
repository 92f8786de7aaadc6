/**
 * The operator console: a second listener, on a loopback TCP port, serving
 * one page (src/console/static) and the very /v1 API the socket serves —
 * daemon.ts hands over an app from the same `buildApp`, and the console puts
 * its gate (./auth.ts) in front of every route and adds the page's own.
 * Loaded by the daemon only when a console address is set.
 */
import { readFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import type { FastifyInstance, FastifyReply } from "fastify";
import type { Logger } from "pino";
import { z } from "zod";
import { SandboxdError } from "../errors.js";
import type { ConsoleAddress } from "../config/console.js";
import { CSRF_HEADER, ConsoleGate } from "./auth.js";

export interface RunningConsole {
  /** the console's address, without the token */
  url: string;
  close(): Promise<void>;
}

const STATIC = new URL("./static/", import.meta.url);
const FILES = {
  "/": ["index.html", "text/html; charset=utf-8"],
  "/console.js": ["console.js", "text/javascript; charset=utf-8"],
  "/console.css": ["console.css", "text/css; charset=utf-8"],
  "/login": ["login.html", "text/html; charset=utf-8"],
  "/login.js": ["login.js", "text/javascript; charset=utf-8"],
} as const;

/** Sent with every answer, streams and refusals included. */
const SECURITY_HEADERS: Record<string, string> = {
  // no inline script or style, nothing from elsewhere, no framing, no plugin content
  "content-security-policy":
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
  "x-content-type-options": "nosniff",
  "x-frame-options": "DENY",
  "referrer-policy": "no-referrer",
  "cache-control": "no-store",
  "cross-origin-opener-policy": "same-origin",
  "cross-origin-resource-policy": "same-origin",
};

const loginBody = z.object({ token: z.string().max(200) }).strict();

function refuse(reply: FastifyReply, code: "SBX_ERR_CONSOLE_AUTH" | "SBX_ERR_CONSOLE_FORBIDDEN", why: string) {
  const e = new SandboxdError(code, `console: ${why}`);
  // the refusal says what to do and nothing about the daemon's state
  return reply.status(e.status).header("content-type", "application/json; charset=utf-8").send(e.toBody());
}

/** `app`: a fresh instance from api/app.ts's buildApp, not yet listening; the console owns it from here. */
export async function startConsole(app: FastifyInstance, addr: ConsoleAddress, log: Logger, gate = new ConsoleGate()): Promise<RunningConsole> {
  const files = new Map<string, { body: string; type: string }>();
  for (const [route, [name, type]] of Object.entries(FILES)) {
    files.set(route, { body: await readFile(new URL(name, STATIC), "utf8"), type });
  }

  app.addHook("onRequest", async (req, reply) => {
    // raw headers, so hijacked answers (audit follow, streamed exec) carry them too
    for (const [k, v] of Object.entries(SECURITY_HEADERS)) reply.raw.setHeader(k, v);
    const h = req.headers;
    const verdict = gate.check({
      method: req.method,
      path: req.url.split("?")[0]!,
      host: h.host,
      origin: h.origin,
      authorization: h.authorization,
      cookie: h.cookie,
      csrf: typeof h[CSRF_HEADER] === "string" ? h[CSRF_HEADER] : undefined,
    });
    if (!verdict.ok) return refuse(reply, verdict.code, verdict.why);
    (req as { consoleSession?: { id: string; csrf: string } }).consoleSession = verdict.session;
  });

  for (const [route, f] of files) {
    app.get(route, async (req, reply) => {
      let body = f.body;
      if (route === "/") {
        // the page's CSRF value, for its X-Sandboxd-CSRF header (base64url: safe in an attribute)
        const s = (req as { consoleSession?: { csrf: string } }).consoleSession;
        body = body.replace("__CSRF__", s?.csrf ?? "");
      }
      return reply.header("content-type", f.type).send(body);
    });
  }

  app.post("/login", async (req, reply) => {
    const parsed = loginBody.safeParse(req.body ?? {});
    const session = parsed.success ? gate.login(parsed.data.token) : null;
    if (!session) {
      log.warn({ mod: "console" }, "console login refused: wrong token");
      return refuse(reply, "SBX_ERR_CONSOLE_AUTH", "that token is not this console's");
    }
    log.info({ mod: "console" }, "console login");
    return reply.status(204).header("set-cookie", gate.sessionCookie(session.id)).send();
  });

  app.post("/logout", async (req, reply) => {
    const s = (req as { consoleSession?: { id: string } }).consoleSession;
    if (s) gate.logout(s.id);
    return reply.status(204).header("set-cookie", gate.clearedCookie()).send();
  });

  try {
    await app.listen({ host: addr.host, port: addr.port });
  } catch (err) {
    await app.close().catch((e: Error) => log.warn({ mod: "console", err: e.message }, "closing the console after a failed listen"));
    throw new SandboxdError("SBX_ERR_CONSOLE_ADDRESS", `the console cannot listen on ${addr.host}:${addr.port}: ${(err as Error).message}`);
  }
  const port = (app.server.address() as AddressInfo).port;
  gate.bind(addr.host, port);
  const base = `http://${addr.host === "::1" ? "[::1]" : addr.host}:${port}`;
  // The one time the token is shown: whoever reads the daemon's output may log in.
  log.info({ mod: "console", console: base, login: `${base}/login#${gate.token}` }, "operator console listening; open the login URL (shown only now)");
  return { url: base, close: () => app.close() };
}
