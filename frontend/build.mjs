// Builds the page into the folder given as the argument (the committed `dist/` by default):
// index.html and style.css are copied, app.ts and worklet.ts are bundled by esbuild. The output is
// deterministic, so the browser test can rebuild into a temporary folder and compare.
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2] ?? join(here, "dist");
mkdirSync(out, { recursive: true });
for (const f of ["index.html", "style.css"]) copyFileSync(join(here, "src", f), join(out, f));
await build({
  // Paths in the bundle's comments are relative to this folder, wherever the build runs from.
  absWorkingDir: here,
  entryPoints: ["src/app.ts", "src/worklet.ts"],
  outdir: out,
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: false,
  legalComments: "none",
  charset: "utf8",
  logLevel: "warning",
});
