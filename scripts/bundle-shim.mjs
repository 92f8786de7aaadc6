#!/usr/bin/env node
// Bundles the in-container shim (src/shim/main.ts) into one self-contained
// CommonJS file for the phase image. The image's Node is Debian bookworm's
// 18.20 and the image cannot reach npm, so everything (zod included) is
// inlined and the syntax targets node18. sandbox/Dockerfile COPYs the result
// to /opt/sandboxd/shim.cjs.
import { build } from "esbuild";
import { statSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const entry = join(root, "src/shim/main.ts");
const outfile = join(root, "dist/shim/shim.cjs");

const result = await build({
  entryPoints: [entry],
  outfile,
  bundle: true,
  platform: "node",
  target: "node18",
  format: "cjs",
  minify: false,
  legalComments: "none",
  logLevel: "warning",
});
if (result.errors.length > 0) process.exit(1);

const { size } = statSync(outfile);
console.log(`bundled ${relative(root, entry)} -> ${relative(root, outfile)} (${(size / 1024).toFixed(1)} KiB)`);
