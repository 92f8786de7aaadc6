import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
/** From package.json (src/ and dist/ both sit one level below it). */
export const VERSION: string = (require("../package.json") as { version: string }).version;
