/**
 * The OpenAPI 3.1 document of the socket API, generated from the route
 * table (routes.ts) and the zod schemas the server parses with
 * (schemas.ts), by @asteasolutions/zod-to-openapi: what the document says a
 * route takes is what the server accepts. Served at GET /v1/openapi.json.
 *
 * Answers are described in words (docs/API.md gives their fields); every
 * error has the one shape `{error: {code, message, hint, details?}}`, its
 * `code` one of src/errors.ts.
 */
import { OpenAPIRegistry, OpenApiGeneratorV31, extendZodWithOpenApi } from "@asteasolutions/zod-to-openapi";
import { z } from "zod";
import { ERRORS, type ErrorCode } from "../errors.js";
import { VERSION } from "../version.js";
import { ROUTES, type RouteDef } from "./routes.js";

// The library reads parameters and components through a method it adds to zod's types
// (its documented set-up); it adds methods only, and changes no parse.
extendZodWithOpenApi(z);

/** `/v1/phases/:id` → `/v1/phases/{id}` */
export function openApiPath(path: string): string {
  // fastify's trailing wildcard is the file's path (`/v1/phases/:id/files/*`)
  return path.replace(/:(\w+)/g, "{$1}").replace(/\/\*$/, "/{path}");
}

const ALWAYS: readonly ErrorCode[] = ["SBX_ERR_VALIDATION", "SBX_ERR_BAD_JSON", "SBX_ERR_INTERNAL"];

function content(kind: RouteDef["ok"]["content"]): Record<string, { schema: z.ZodTypeAny }> {
  const any = z.any();
  switch (kind) {
    case "json":
      return { "application/json": { schema: any } };
    case "ndjson":
      return { "application/x-ndjson": { schema: z.string() } };
    case "text":
      return { "text/plain": { schema: z.string() } };
    case "json-or-ndjson":
      return { "application/json": { schema: any }, "application/x-ndjson": { schema: z.string() } };
    case "bytes":
      return { "application/octet-stream": { schema: z.string() } };
  }
}

let cached: unknown = null;

export function openApiDocument(): unknown {
  if (cached) return cached;
  const registry = new OpenAPIRegistry();
  const codes = Object.keys(ERRORS) as [ErrorCode, ...ErrorCode[]];
  const error = registry.register(
    "Error",
    z
      .object({
        error: z
          .object({
            code: z.enum(codes),
            message: z.string(),
            hint: z.string().optional(),
            details: z.unknown().optional(),
          })
          .strict(),
      })
      .strict(),
  );
  for (const r of ROUTES as readonly RouteDef[]) {
    const errs = [...new Set([...ALWAYS, ...(r.errors ?? [])])];
    const byStatus = new Map<number, ErrorCode[]>();
    for (const c of errs) byStatus.set(ERRORS[c].status, [...(byStatus.get(ERRORS[c].status) ?? []), c]);
    const responses: Record<string, { description: string; content?: Record<string, { schema: z.ZodTypeAny }> }> = {
      [String(r.ok.status)]: { description: r.ok.description, content: content(r.ok.content) },
    };
    for (const [status, cs] of [...byStatus].sort((a, b) => a[0] - b[0])) {
      responses[String(status)] = { description: cs.join(", "), content: { "application/json": { schema: error } } };
    }
    registry.registerPath({
      method: r.method.toLowerCase() as "get" | "post" | "delete" | "put",
      path: openApiPath(r.path),
      operationId: operationId(r),
      summary: r.summary,
      tags: [r.tag],
      request: {
        ...(r.params ? { params: r.params } : {}),
        ...(r.query ? { query: r.query } : {}),
        ...(r.body ? { body: { required: false, content: { "application/json": { schema: r.body } } } } : {}),
        ...(r.rawBody ? { body: { required: true, content: { [r.rawBody]: { schema: z.string() } } } } : {}),
      },
      responses,
    });
  }
  cached = new OpenApiGeneratorV31(registry.definitions).generateDocument({
    openapi: "3.1.0",
    info: {
      title: "sandboxd socket API",
      version: VERSION,
      description: "HTTP/1.1 over the daemon's unix socket (and the operator console's loopback port). docs/API.md describes each route's answers.",
    },
    servers: [{ url: "http://localhost", description: "over the unix socket: curl --unix-socket SOCKET http://x/v1/…" }],
  });
  return cached;
}

/** A stable name per route: `POST /v1/phases/:id/iterations/:n/accept` → `postPhasesIdIterationsNAccept`. */
function operationId(r: Pick<RouteDef, "method" | "path">): string {
  const words = r.path
    .replace(/^\/v1\//, "")
    .split(/[/.]/)
    .filter(Boolean)
    .map((w) => w.replace(/^:/, ""))
    .map((w) => w.charAt(0).toUpperCase() + w.slice(1));
  return r.method.toLowerCase() + words.join("");
}
