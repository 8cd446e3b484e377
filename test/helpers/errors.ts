import { expect } from "vitest";
import { IommufdError } from "../../client/client.js";

/** Awaits a call that must fail with `errno` (and, if given, entries_handled). */
export async function expectErrno(call: Promise<unknown>, errno: string, entriesHandled?: number): Promise<IommufdError> {
  const error = await call.then(
    (value) => {
      throw new Error(`expected ${errno}, but the call succeeded with ${JSON.stringify(value, (_k, v) => (typeof v === "bigint" ? v.toString() : v))}`);
    },
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(IommufdError);
  const e = error as IommufdError;
  expect(e.errno, e.message).toBe(errno);
  if (entriesHandled !== undefined) expect(e.entriesHandled).toBe(entriesHandled);
  return e;
}
