#!/usr/bin/env node
// Bundles the two programs that must start fast or stand alone, each into
// one CommonJS file:
//
// - The CLI's entry (src/cli/main.ts) with what `sandboxd exec` needs
//   (src/cli/exec*.ts, the HTTP client, the frame reader, a few small
//   modules) → dist/cli/main.cjs, which bin/sandboxd runs. Agent harnesses
//   start a CLI process per command: one file read and compiled, and no ES
//   module loader to start, is milliseconds of every command. Everything
//   else — commander, the command tree (./program.js), the daemon — stays
//   outside, loaded by import() only when a command needs it.
//   dist/cli/main.js (tsc's output, the same code unbundled) runs the same way.
// - The in-container shim (src/shim/main.ts) → dist/shim/shim.cjs, for the
//   phase image. The image's Node is Debian bookworm's 18.20 and the image
//   cannot reach npm, so everything (zod included) is inlined and the syntax
//   targets node18. sandbox/Dockerfile COPYs the result to /opt/sandboxd/shim.cjs.
import { build } from "esbuild";
import { statSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");

const bundles = [
  {
    entry: "src/cli/main.ts",
    outfile: "dist/cli/main.cjs",
    target: "node20",
    // the full command line, loaded (as ESM, by import()) only for the commands the hot path does not take
    external: ["./program.js"],
    packages: "external",
  },
  { entry: "src/shim/main.ts", outfile: "dist/shim/shim.cjs", target: "node18" },
];

const results = await Promise.all(
  bundles.map(({ entry, outfile, ...options }) =>
    build({
      entryPoints: [join(root, entry)],
      outfile: join(root, outfile),
      bundle: true,
      platform: "node",
      format: "cjs",
      minify: false,
      legalComments: "none",
      logLevel: "warning",
      ...options,
    }),
  ),
);
if (results.some((r) => r.errors.length > 0)) process.exit(1);

for (const { entry, outfile } of bundles) {
  const { size } = statSync(join(root, outfile));
  console.log(`bundled ${entry} -> ${relative(root, join(root, outfile))} (${(size / 1024).toFixed(1)} KiB)`);
}
