import { afterAll, beforeAll, describe, expect, it } from "vitest";
import pg from "pg";
import { startPostgres, type TestPostgres } from "../helpers/postgres.js";

let db: TestPostgres;
beforeAll(async () => {
  db = await startPostgres();
}, 120_000);
afterAll(async () => {
  await db?.stop();
});

describe("test postgres helper", () => {
  it("serves both databases with the gateway role's grants", async () => {
    expect((await db.psql("SELECT count(*) FROM orders", "trading")).trim()).toBe("3");
    const c = new pg.Client({ host: db.host, port: db.port, user: db.gateway.user, password: db.gateway.password, database: "trading" });
    await c.connect();
    try {
      expect((await c.query("SELECT count(*)::int AS n FROM signals")).rows[0].n).toBe(3);
      await expect(c.query("DELETE FROM orders")).rejects.toThrow(/permission denied/);
      await c.query("INSERT INTO paper_orders (symbol, side, qty, price, status) VALUES ('X','buy',1,1,'new')");
    } finally {
      await c.end();
    }
  });
});
