/**
 * One Translate request: the device's accesses in, per-access results out.
 * Inputs are u64 IOVAs as u32 halves; outputs are typed arrays filled by the
 * driver, plus counters — nothing is allocated per access.
 */
export type WalkMode = "nested" | "stage2" | "blocked";

/**
 * Upper bounds of the walk-depth histogram (entries read by one walk): the
 * exact counts of the walk shapes — 4 (4-level stage 2), 19, 24, 29, 35
 * (nested) — sit on bucket bounds.
 */
export const WALK_DEPTH_BOUNDS = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 29, 35] as const;

/** depth -> histogram bucket (the last bucket is +Inf). */
const DEPTH_BUCKET = Uint8Array.from({ length: 64 }, (_, refs) => {
  const i = WALK_DEPTH_BOUNDS.findIndex((bound) => refs <= bound);
  return i < 0 ? WALK_DEPTH_BOUNDS.length : i;
});

export function depthBucket(refs: number): number {
  return refs < 64 ? DEPTH_BUCKET[refs] : WALK_DEPTH_BOUNDS.length;
}

export class DmaBatch {
  /** Host address per access (offset into guest RAM); 0 when it faulted. */
  readonly addr: Float64Array;
  /** Page-table entries read per access; 0 on an IOTLB hit. */
  readonly refs: Uint32Array;
  /** Fault reason per access; 0 when it translated. */
  readonly fault: Uint8Array;
  hits = 0;
  misses = 0;
  faults = 0;
  /** Total entries read by the walks of this batch. */
  references = 0;
  mode: WalkMode = "blocked";
  /** Walks of this batch per walk-depth bucket (WALK_DEPTH_BOUNDS, then +Inf). */
  readonly depthCounts = new Float64Array(WALK_DEPTH_BOUNDS.length + 1);
  /** Faults of this batch per reason code; allocated on the first fault. */
  faultReasons: Float64Array | null = null;

  constructor(
    readonly iovaLo: Uint32Array,
    readonly iovaHi: Uint32Array,
    readonly write: boolean,
  ) {
    const n = iovaLo.length;
    this.addr = new Float64Array(n);
    this.refs = new Uint32Array(n);
    this.fault = new Uint8Array(n);
  }

  get count(): number {
    return this.iovaLo.length;
  }

  /** Accesses [start, end) fault with `reason` (no walk, neither hit nor miss). */
  faultRange(reason: number, start: number, end: number): void {
    this.fault.fill(reason, start, end);
    this.faults += end - start;
    (this.faultReasons ??= new Float64Array(256))[reason] += end - start;
  }

  /** Record access i's fault (the walk's slow path). */
  recordFault(i: number, reason: number): void {
    this.fault[i] = reason;
    this.faults++;
    (this.faultReasons ??= new Float64Array(256))[reason]++;
  }

  /** A batch from bigint IOVAs (the API edge; not the hot path). */
  static fromIovas(iovas: readonly bigint[], write: boolean): DmaBatch {
    const lo = new Uint32Array(iovas.length);
    const hi = new Uint32Array(iovas.length);
    for (let i = 0; i < iovas.length; i++) {
      lo[i] = Number(iovas[i] & 0xffffffffn);
      hi[i] = Number((iovas[i] >> 32n) & 0xffffffffn);
    }
    return new DmaBatch(lo, hi, write);
  }
}
