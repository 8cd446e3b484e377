import { hwptInvalidate } from "../server/core/hwpt.js";
import { DmaBatch } from "../server/core/translate/dma-batch.js";
import type { VtdNestedDomain } from "../server/core/drivers/vtd/domains.js";
import { rawNestedWalkCeiling, rawProbeCeiling } from "./ceilings.js";
import { GIB, map4k, nestedFixture, resetBatch } from "./fixtures.js";
import { percentile, type Result, throughput } from "./harness.js";

/** The in-process translation scenarios of performance.md. */

export function iotlbHit(budgetMs: number): Result[] {
  const f = nestedFixture("iotlb-hit", { iotlbEntries: 4096 });
  map4k(f, 4096);
  const batch = f.batch(4096);
  f.run(batch);
  const ours = throughput(budgetMs, batch.count, () => {
    resetBatch(batch);
    f.run(batch);
    if (batch.hits !== batch.count) throw new Error(`iotlb_hit: only ${batch.hits} of ${batch.count} hit`);
  });
  const probe = rawProbeCeiling(batch.iovaLo);
  const ceiling = throughput(budgetMs, batch.count, probe);
  return [{ scenario: "iotlb_hit", value: ours, unit: "translations/s", ceiling, target: "≥ 50 M/s and ≥ 0.3× ceiling" }];
}

export function nestedWalkCold(budgetMs: number): Result[] {
  const f = nestedFixture("walk-cold", { iotlbEntries: 0, hugePages: false });
  map4k(f, 4096);
  const batch = f.batch(4096);
  f.run(batch);
  if (batch.references !== 24 * batch.count) throw new Error(`nested_walk_cold: ${batch.references / batch.count} refs per walk, not 24`);
  const ours = throughput(budgetMs, batch.count, () => {
    resetBatch(batch);
    f.run(batch);
  });
  const parent = (f.ctx.getObject(f.nestedId) as unknown as { domain: VtdNestedDomain }).domain.parent;
  const raw = rawNestedWalkCeiling(parent.table.words, f.ctx.memory, f.stage1.root, batch.iovaLo);
  const check = raw();
  if (check[7] !== batch.addr[7]) throw new Error("nested_walk_cold: the ceiling walk disagrees with the walker");
  const ceiling = throughput(budgetMs, batch.count, raw);
  return [{ scenario: "nested_walk_cold", value: ours, unit: "walks/s", ceiling, target: "≥ 8 M/s and ≥ 0.4× ceiling" }];
}

/** References of one cold walk per configuration: a count, not a speed. */
export function walkRefsExact(): Result[] {
  const cold = (name: string, expected: number, options: Parameters<typeof nestedFixture>[1], leafLevel = 1) => {
    const f = nestedFixture(`refs-${name.replaceAll("_", "-")}`, { iotlbEntries: 0, ...options });
    f.stage1.map(0x200000, 0x4000000, leafLevel);
    const batch = f.batch(1);
    batch.iovaLo[0] = 0x200000 + 0x123;
    if (options?.stage1Levels === 5 && !options.fiveLevel) {
      // 5-level stage 1 over a 4-level stage 2: the API couples FL5LP with
      // 5-level stage-2 tables, so this one drives the walker directly.
      const domain = (f.ctx.getObject(f.nestedId) as unknown as { domain: VtdNestedDomain }).domain;
      f.driver.walker.walkNested(domain, f.driver.caches.tagOf(domain, 0), batch.iovaLo[0], 0, false);
      batch.references = f.driver.walker.refs;
    } else {
      f.run(batch);
      if (batch.faults !== 0) throw new Error(`${name}: fault 0x${batch.fault[0].toString(16)}`);
    }
    return { scenario: `walk_refs_exact_${name}`, value: batch.references, unit: "refs", ceiling: expected, target: `exactly ${expected}` };
  };
  return [
    cold("4_4", 24, { hugePages: false }),
    cold("5_4", 29, { hugePages: false, stage1Levels: 5, attach: false }),
    cold("4_5", 29, { hugePages: false, fiveLevel: true }),
    cold("5_5", 35, { hugePages: false, fiveLevel: true, stage1Levels: 5 }),
    cold("2m_s1_4k_s2", 19, { hugePages: false }, 2),
    cold("4k_s1_2m_s2", 19, { guestBytes: GIB / 2 }),
  ];
}

/** Mean references per IOTLB miss for a sequential 4 KiB stride over 1 GiB. */
export function walkRefsCached(): Result[] {
  const run = (name: string, hugePages: boolean): Result => {
    // The default (HUGE_PAGES 1) maps stage 2 with 1 GiB/2 MiB leaves; the
    // 4 KiB variant shows the cost when every data page needs its own
    // stage-2 walk (the second-stage cache holds leaf translations only).
    const f = nestedFixture(`refs-cached${name.replaceAll("_", "-")}`, { pagingStructureCaches: true, hugePages });
    const pages = GIB / 4096;
    map4k(f, pages);
    let refs = 0;
    let misses = 0;
    const lo = new Uint32Array(4096);
    for (let first = 0; first < pages; first += lo.length) {
      for (let i = 0; i < lo.length; i++) lo[i] = (first + i) * 4096;
      const batch = new DmaBatch(lo, new Uint32Array(lo.length), false);
      f.run(batch);
      refs += batch.references;
      misses += batch.misses;
    }
    return { scenario: `walk_refs_cached${name}`, value: refs / misses, unit: "refs/miss", ceiling: 5, target: "≤ 5", informational: !hugePages };
  };
  return [run("", true), run("_4k_s2", false)];
}

/** p99 latency of single-page invalidations with a full IOTLB of `entries`. */
function pageInvalidationP99(entries: number, samples: number): number {
  const f = nestedFixture(`inv-page-${entries}`, { iotlbEntries: entries });
  map4k(f, entries);
  const batch = f.batch(entries);
  f.run(batch);
  const one = new DmaBatch(new Uint32Array(1), new Uint32Array(1), false);
  const times = new Float64Array(samples);
  for (let s = 0; s < samples; s++) {
    const page = (s * 7919) % entries;
    const t0 = process.hrtime.bigint();
    hwptInvalidate(f.ctx, f.nestedId, { kind: "vtd_s1", entries: [{ addr: BigInt(page * 4096), npages: 1n, leaf: true }] });
    times[s] = Number(process.hrtime.bigint() - t0) / 1000;
    // Refill the page so the IOTLB stays full.
    one.iovaLo[0] = page * 4096;
    resetBatch(one);
    f.run(one);
  }
  return percentile(times, 0.99);
}

export function invalidatePage(samples: number): Result[] {
  // Warm the JIT on both sizes before measuring either.
  pageInvalidationP99(4096, samples);
  pageInvalidationP99(65536, samples);
  const small = pageInvalidationP99(4096, samples);
  const large = pageInvalidationP99(65536, samples);
  return [
    { scenario: "invalidate_page", value: small, unit: "µs p99", ceiling: 5, target: "≤ 5 µs" },
    { scenario: "invalidate_page_65536_vs_4096", value: large / small, unit: "× p99", ceiling: 1.5, target: "≤ 1.5×" },
  ];
}

export function invalidateDomain(samples: number): Result[] {
  const f = nestedFixture("inv-domain", { iotlbEntries: 4096 });
  map4k(f, 4096);
  const batch = f.batch(4096);
  const warmUp = 100;
  const times = new Float64Array(warmUp + samples);
  for (let s = 0; s < times.length; s++) {
    resetBatch(batch);
    f.run(batch);
    const full = f.driver.iotlbOccupancy;
    if (full !== 4096) throw new Error(`invalidate_domain: the IOTLB holds ${full}, not 4096`);
    const t0 = process.hrtime.bigint();
    hwptInvalidate(f.ctx, f.nestedId, { kind: "vtd_s1", entries: [{ addr: 0n, npages: (1n << 64n) - 1n, leaf: false }] });
    times[s] = Number(process.hrtime.bigint() - t0) / 1000;
    if (f.driver.iotlbOccupancy !== 0) throw new Error("invalidate_domain left entries behind");
  }
  return [{ scenario: "invalidate_domain", value: percentile(times.subarray(warmUp), 0.99), unit: "µs p99", ceiling: 50, target: "≤ 50 µs" }];
}
