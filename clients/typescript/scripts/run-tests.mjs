// Runs the compiled tests (build/test/*.test.js) with node:test.
import { readdirSync } from "node:fs";
import { spawnSync } from "node:child_process";

const files = readdirSync("build/test")
  .filter((f) => f.endsWith(".test.js"))
  .map((f) => `build/test/${f}`);
const { status } = spawnSync(process.execPath, ["--test", "--test-timeout=60000", ...process.argv.slice(2), ...files], { stdio: "inherit" });
process.exit(status ?? 1);
