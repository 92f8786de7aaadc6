#!/usr/bin/env node
// Build (or confirm) the sandbox image from sandbox/Dockerfile and the shim
// bundle. Runs against dist/, so `npm run build` first. `sandboxd image build`
// calls the same functions.
//
//   node scripts/build-image.mjs [--force] [--no-cache] [--base IMAGE] [--tag TAG] [--shim PATH]
import Docker from "dockerode";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");

function parseArgs(argv) {
  const opts = { force: false, noCache: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    if (a === "--force") opts.force = true;
    else if (a === "--no-cache") opts.noCache = opts.force = true;
    else if (a === "--base") opts.base = value();
    else if (a === "--tag") opts.tag = value();
    else if (a === "--shim") opts.shim = path.resolve(value());
    else throw new Error(`unknown argument ${a} (known: --force --no-cache --base IMAGE --tag TAG --shim PATH)`);
  }
  return opts;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  let image;
  try {
    image = await import("../dist/runtime/image.js");
  } catch (err) {
    throw Object.assign(new Error(`cannot load dist/runtime/image.js (${err.message})`), {
      hint: "run `npm run build` first",
    });
  }
  const started = Date.now();
  const log = (line) => process.stdout.write(`${line}\n`);
  const result = await image.ensureSandboxImage(new Docker(), {
    tag: args.tag ?? (process.env.SANDBOXD_IMAGE || image.DEFAULT_SANDBOX_IMAGE),
    ...(args.base === undefined ? {} : { base: args.base }),
    dockerfileDir: path.join(root, "sandbox"),
    shimBundlePath: args.shim ?? path.join(root, "dist", "shim", "shim.cjs"),
    force: args.force,
    noCache: args.noCache,
    log,
  });
  const secs = ((Date.now() - started) / 1000).toFixed(1);
  const what = result.built ? (result.cached ? "rebuilt from cache" : "built") : "already current";
  log(`${result.tag} ${what} in ${secs} s (image ${result.imageId.slice(7, 19)}, base ${result.base})`);
}

main().catch((err) => {
  process.stderr.write(`build-image: ${err.message}\n`);
  if (err.hint) process.stderr.write(`hint: ${err.hint}\n`);
  process.exitCode = 1;
});
