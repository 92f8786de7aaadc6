/**
 * The OpenAPI document, the server and docs/API.md name the same routes:
 * the document is generated from the route table, the server registers
 * handlers only through it, and docs/API.md must spell out each one.
 */
import { readFileSync } from "node:fs";
import path from "node:path";
import pino from "pino";
import { describe, expect, it } from "vitest";
import { buildApp, registeredRoutes } from "../../src/api/app.js";
import { openApiDocument, openApiPath } from "../../src/api/openapi.js";

const root = path.resolve(import.meta.dirname, "../..");

type Doc = { openapi: string; paths: Record<string, Record<string, { parameters?: Array<{ name: string; in: string }>; requestBody?: { content: Record<string, { schema: Record<string, unknown> }> } }>> };

function docRoutes(doc: Doc): string[] {
  return Object.entries(doc.paths)
    .flatMap(([p, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${p}`))
    .sort();
}

/** Every `METHOD /v1/…` docs/API.md names, in the document's path form. */
function apiMdRoutes(text: string): string[] {
  const found = new Set<string>();
  for (const m of text.matchAll(/\b(GET|POST|DELETE|PUT|PATCH) (\/v1\/[A-Za-z0-9_.:/{}-]*)/g)) {
    found.add(`${m[1]} ${openApiPath(m[2]!.replace(/[.:]$/, ""))}`);
  }
  return [...found].sort();
}

function app() {
  return buildApp({
    // the handlers are not called here: the table and the registration are what is tested
    manager: {} as never,
    approvals: {} as never,
    stateDir: "/nonexistent",
    logger: pino({ level: "silent" }),
    info: { version: "test", instance: "0", pid: 0, stateDir: "/nonexistent", socket: "/nonexistent" },
  });
}

describe("OpenAPI document", () => {
  const doc = openApiDocument() as Doc;

  it("is OpenAPI 3.1 with the request schemas the server validates with", () => {
    expect(doc.openapi).toBe("3.1.0");
    const exec = doc.paths["/v1/phases/{id}/exec"]!.post!;
    expect(exec.parameters).toEqual(expect.arrayContaining([expect.objectContaining({ name: "id", in: "path" }), expect.objectContaining({ name: "stream", in: "query" })]));
    const body = exec.requestBody!.content["application/json"]!.schema;
    // strict: unknown fields are errors, as the server says
    expect(body.additionalProperties).toBe(false);
    expect(Object.keys(body.properties as object)).toEqual(expect.arrayContaining(["argv", "command", "timeoutMs", "reason", "waitApprovalMs"]));
  });

  it("lists every route the server registers, and no other", () => {
    const registered = registeredRoutes(app()).map((k) => {
      const [m, p] = k.split(" ");
      return `${m} ${openApiPath(p!)}`;
    });
    expect(registered.length).toBeGreaterThan(20);
    expect([...registered].sort()).toEqual(docRoutes(doc));
  });

  it("names exactly the routes docs/API.md names", () => {
    const md = apiMdRoutes(readFileSync(path.join(root, "docs/API.md"), "utf8"));
    const inDoc = docRoutes(doc);
    expect({ missingFromApiMd: inDoc.filter((r) => !md.includes(r)), notInOpenApi: md.filter((r) => !inDoc.includes(r)) }).toEqual({
      missingFromApiMd: [],
      notInOpenApi: [],
    });
  });

  it("is served at GET /v1/openapi.json", async () => {
    const a = app();
    const res = await a.inject({ method: "GET", url: "/v1/openapi.json" });
    expect(res.statusCode).toBe(200);
    expect(res.json()).toEqual(doc);
    const bad = await a.inject({ method: "GET", url: "/v1/phases/nope" });
    expect(bad.statusCode).toBe(400);
    expect(bad.json().error.code).toBe("SBX_ERR_VALIDATION");
    await a.close();
  });
});
