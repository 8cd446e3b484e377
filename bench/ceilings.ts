import type { GuestMemory } from "../server/core/guest-memory.js";

/**
 * Ceilings: the same memory work as a scenario with nothing else, run beside
 * it so that ratios survive the ±25% drift of shared machines.
 */

/**
 * The raw hash probe an IOTLB hit needs: the key (tag, page lo, page hi) in
 * separate typed arrays behind a bucket-head array and an index chain (the
 * layout of TranslationCache), one probe per IOVA, the cached address plus
 * the page offset written out — no size classes, generations, permissions,
 * replacement bits or counters.
 */
export function rawProbeCeiling(iovas: Uint32Array) {
  const n = iovas.length;
  let buckets = 1;
  while (buckets < n * 2) buckets <<= 1;
  const mask = buckets - 1;
  const head = new Int32Array(buckets).fill(-1);
  const next = new Int32Array(n);
  const tag = new Int32Array(n);
  const keyLo = new Uint32Array(n);
  const keyHi = new Uint32Array(n);
  const value = new Float64Array(n);
  const hash = (t: number, lo: number, hi: number) => {
    const h = Math.imul(lo ^ Math.imul(t, 0x9e3779b1) ^ Math.imul(hi, 0x85ebca77), 0xc2b2ae3d);
    return (h ^ (h >>> 15)) & mask;
  };
  for (let i = 0; i < n; i++) {
    const lo = iovas[i] >>> 12;
    const b = hash(1, lo, 0);
    tag[i] = 1;
    keyLo[i] = lo;
    value[i] = lo * 4096 + 0x4000000;
    next[i] = head[b];
    head[b] = i;
  }
  const out = new Float64Array(n);
  return () => {
    for (let i = 0; i < n; i++) {
      const iova = iovas[i];
      const lo = iova >>> 12;
      let e = head[hash(1, lo, 0)];
      while (keyLo[e] !== lo || tag[e] !== 1 || keyHi[e] !== 0) e = next[e];
      out[i] = value[e] + (iova & 0xfff);
    }
    return out;
  };
}

/**
 * A raw 4-over-4 nested walk: the 24 dependent reads of a cold walk, indexed
 * from u32 halves as the walker does, over the scenario's own second-stage
 * pool and guest tables — no checks, permissions, A/D, caches or counters.
 */
export function rawNestedWalkCeiling(ss: Uint32Array, memory: GuestMemory, root: number, iovas: Uint32Array) {
  const out = new Float64Array(iovas.length);
  let hpa = 0;
  // Stage 2 of a GPA below 4 GiB (the scenario's tables and data are).
  const ssWalk = (gpa: number): void => {
    let t = ss[0] >>> 12; // below 512 GiB the level-4 index is 0
    let w = (t << 10) + (((gpa >>> 30) & 511) << 1);
    t = ss[w] >>> 12;
    w = (t << 10) + (((gpa >>> 21) & 511) << 1);
    t = ss[w] >>> 12;
    w = (t << 10) + (((gpa >>> 12) & 511) << 1);
    hpa = (ss[w + 1] & 0xfffff) * 4294967296 + ((ss[w] & 0xfffff000) >>> 0) + (gpa & 0xfff);
  };
  return () => {
    for (let i = 0; i < iovas.length; i++) {
      const iova = iovas[i];
      let gpa = root;
      for (let level = 4; level >= 1; level--) {
        ssWalk(gpa);
        const page = memory.page(hpa / 4096);
        const x = level === 4 ? 0 : ((iova >>> (3 + 9 * level)) & 511) << 1;
        gpa = ((page[x] & 0xfffff000) >>> 0) + (level === 1 ? iova & 0xfff : 0);
      }
      ssWalk(gpa);
      out[i] = hpa;
    }
    return out;
  };
}
