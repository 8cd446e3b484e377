import { IommuError } from "./errno.js";

/**
 * Fault injection for tests, after the kernel's fail_nth
 * (/proc/self/task/<tid>/fail-nth, driven by
 * tools/testing/selftests/iommu/iommufd_fail_nth.c): once armed with n, the
 * n-th fault point passed from then on fails with ENOMEM, as if the n-th
 * allocation of the call had failed. A test sweeps n = 1, 2, ... until the
 * call succeeds without reaching the armed point, proving every failure path
 * on the way unwinds.
 *
 * A fault point is a step that can fail in the kernel (or in the emulation):
 * an allocation, an id, a page table, a driver op. Each is named by a string
 * literal (the kernel function it stands for) for diagnostics. Disarmed, a
 * point costs one predictable branch; none sits on the translation path.
 *
 * Test-only: nothing in the service arms it. It is process-wide, like the
 * kernel's per-task switch is per thread, so it is meant for one call at a
 * time.
 */

let armed = false;
let nth = 0;
let passed = 0;
let failedAt: string | undefined;
const trace: string[] = [];

/** What an armed sweep step saw. */
export interface FailNthResult {
  /** Fault points passed since arm(). */
  readonly passed: number;
  /** The point that was made to fail, if the n-th was reached. */
  readonly failedAt: string | undefined;
  /** The names of the points passed, in order. */
  readonly trace: readonly string[];
}

export const failNth = {
  /** Make the n-th (1-based) fault point passed from now on fail with ENOMEM. */
  arm(n: number): void {
    if (!Number.isInteger(n) || n < 1) throw new RangeError(`fail_nth: n must be an integer >= 1, not ${n}`);
    nth = n;
    passed = 0;
    failedAt = undefined;
    trace.length = 0;
    armed = true;
  },

  /** Stop injecting; reports what happened since arm(). */
  disarm(): FailNthResult {
    armed = false;
    return { passed, failedAt, trace: [...trace] };
  },

  get armed(): boolean {
    return armed;
  },

  /** Fault points passed since arm(). */
  get passed(): number {
    return passed;
  },
};

function hit(name: string): void {
  passed++;
  trace.push(name);
  if (passed === nth) {
    failedAt = name;
    throw new IommuError("ENOMEM", `fail_nth: injected allocation failure at ${name} (fault point ${nth})`);
  }
}

/**
 * A fault point: fails with ENOMEM when it is the armed n-th. Call it before
 * the step it stands for changes anything, so that the caller's unwind is
 * what is being tested.
 */
export function faultPoint(name: string): void {
  if (armed) hit(name);
}
