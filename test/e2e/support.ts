import { execFile } from "node:child_process";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import type { TestContext } from "vitest";

/** Shared by the end-to-end tests: paths and external tools. */

export const REPO_ROOT = fileURLToPath(new URL("../../", import.meta.url));

/** The buf binary of the @bufbuild/buf devDependency (what `npx buf` runs). */
export const BUF = join(REPO_ROOT, "node_modules/.bin/buf");

export const execFileAsync = promisify(execFile);

/**
 * Skips the running test with `note`. The default reporter shows neither
 * skipped tests' names nor their notes, so the note also goes to stderr,
 * which it does show.
 */
export function skipBecause(ctx: TestContext, note: string): never {
  console.warn(`SKIPPED: ${note}`);
  return ctx.skip(note);
}
