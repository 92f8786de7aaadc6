#!/usr/bin/env node
// Bundles the CLI's entry (src/cli/main.ts) with what `sandboxd exec` needs
// (src/cli/exec*.ts, the HTTP client, the frame reader, a few small modules)
// into one CommonJS file, dist/cli/main.cjs, which bin/sandboxd runs. Agent
// harnesses start a CLI process per command: one file read and compiled,
// and no ES module loader to start, is milliseconds of every command.
// Everything else — commander, the command tree (./program.js), the daemon —
// stays outside, loaded by import() only when a command needs it.
// dist/cli/main.js (tsc's output, the same code unbundled) runs the same way.
import { build } from "esbuild";
import { statSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const entry = join(root, "src/cli/main.ts");
const outfile = join(root, "dist/cli/main.cjs");

const result = await build({
  entryPoints: [entry],
  outfile,
  bundle: true,
  platform: "node",
  target: "node20",
  format: "cjs",
  // the full command line, loaded (as ESM, by import()) only for the commands the hot path does not take
  external: ["./program.js"],
  packages: "external",
  minify: false,
  legalComments: "none",
  logLevel: "warning",
});
if (result.errors.length > 0) process.exit(1);

const { size } = statSync(outfile);
console.log(`bundled ${relative(root, entry)} -> ${relative(root, outfile)} (${(size / 1024).toFixed(1)} KiB)`);
