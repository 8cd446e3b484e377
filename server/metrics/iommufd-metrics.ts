import type { Registry } from "prom-client";
import { INVALIDATION_DATA_TYPES, INVALIDATION_SECONDS_BOUNDS, type InvalidationDataType, type VmStats } from "../core/context.js";
import type { ObjectType } from "../core/objects.js";
import { WALK_DEPTH_BOUNDS } from "../core/translate/dma-batch.js";
import { FAULT, FAULT_NAMES } from "../core/translate/fault.js";
import type { IommuModel, Vm, VmRegistry } from "../core/vm.js";
import { ComputedMetric, histogramSamples, type Sample } from "./computed.js";

/**
 * The iommufd_* series of metrics.md, computed at scrape time from the
 * core's plain counters.
 *
 * - Per-VM series carry a `vm` label for at most `vmLabelCap` VMs (the first
 *   ones created); the others are summed under vm="_other". A labelled VM's
 *   series disappear with it.
 * - Counters stay monotonic when VMs go away: model-level totals (faults by
 *   reason, the histograms) and the `_other` per-VM sums keep what destroyed
 *   VMs had counted.
 */

const MODELS: readonly IommuModel[] = ["mock", "intel_vtd"];
const MODES = ["nested", "stage1", "stage2"] as const;
const OTHER = "_other";

/** The per-VM counters behind the vm-labelled series. */
interface VmCounters {
  hits: number;
  misses: number;
  translations: number;
  faults: number;
  invalidationEntries: number;
  entriesInvalidated: number;
}

const zeroCounters = (): VmCounters => ({ hits: 0, misses: 0, translations: 0, faults: 0, invalidationEntries: 0, entriesInvalidated: 0 });

function countersOf(vm: Vm): VmCounters {
  const s = vm.ctx.stats;
  return {
    hits: s.iotlbHits,
    misses: s.iotlbMisses,
    translations: s.translations,
    faults: s.faults,
    invalidationEntries: s.invalidationEntries,
    entriesInvalidated: vm.ctx.driver.iotlbEntriesInvalidated,
  };
}

function addCounters(into: VmCounters, from: VmCounters): void {
  into.hits += from.hits;
  into.misses += from.misses;
  into.translations += from.translations;
  into.faults += from.faults;
  into.invalidationEntries += from.invalidationEntries;
  into.entriesInvalidated += from.entriesInvalidated;
}

/** Model-level totals: what the histograms and fault counters sum. */
interface ModelTotals {
  faultsByReason: Float64Array;
  walkDepth: Record<"nested" | "stage2", Float64Array>;
  walkDepthSum: Record<"nested" | "stage2", number>;
  invalidationSeconds: Record<InvalidationDataType, Float64Array>;
  invalidationSecondsSum: Record<InvalidationDataType, number>;
}

function zeroTotals(): ModelTotals {
  const depth = () => new Float64Array(WALK_DEPTH_BOUNDS.length + 1);
  const inv = () => new Float64Array(INVALIDATION_SECONDS_BOUNDS.length + 1);
  return {
    faultsByReason: new Float64Array(256),
    walkDepth: { nested: depth(), stage2: depth() },
    walkDepthSum: { nested: 0, stage2: 0 },
    invalidationSeconds: { vtd_s1: inv(), selftest: inv(), arm_smmuv3: inv(), other: inv() },
    invalidationSecondsSum: { vtd_s1: 0, selftest: 0, arm_smmuv3: 0, other: 0 },
  };
}

function addArray(into: Float64Array, from: ArrayLike<number>): void {
  for (let i = 0; i < into.length; i++) into[i] += from[i];
}

function addTotals(into: ModelTotals, s: VmStats | ModelTotals): void {
  addArray(into.faultsByReason, s.faultsByReason);
  for (const mode of ["nested", "stage2"] as const) {
    addArray(into.walkDepth[mode], s.walkDepth[mode]);
    into.walkDepthSum[mode] += s.walkDepthSum[mode];
  }
  for (const t of INVALIDATION_DATA_TYPES) {
    addArray(into.invalidationSeconds[t], s.invalidationSeconds[t]);
    into.invalidationSecondsSum[t] += s.invalidationSecondsSum[t];
  }
}

export class IommufdMetrics {
  private readonly labelled = new Set<string>();
  private readonly retiredTotals = new Map<IommuModel, ModelTotals>(MODELS.map((m) => [m, zeroTotals()]));
  private readonly retiredOther = new Map<IommuModel, VmCounters>(MODELS.map((m) => [m, zeroCounters()]));

  constructor(
    private readonly vms: VmRegistry,
    private readonly vmLabelCap: number,
  ) {
    for (const vm of vms.all()) this.created(vm);
    vms.onCreated((vm) => this.created(vm));
    vms.onDestroyed((vm) => this.destroyed(vm));
  }

  private created(vm: Vm): void {
    if (this.labelled.size < this.vmLabelCap) this.labelled.add(vm.id);
  }

  private destroyed(vm: Vm): void {
    addTotals(this.totalsOf(this.retiredTotals, vm.model), vm.ctx.stats);
    if (!this.labelled.delete(vm.id)) addCounters(this.totalsOf(this.retiredOther, vm.model, zeroCounters), countersOf(vm));
  }

  private totalsOf<T>(map: Map<IommuModel, T>, model: IommuModel, make?: () => T): T {
    let t = map.get(model);
    if (t === undefined) {
      t = make ? make() : (zeroTotals() as T);
      map.set(model, t);
    }
    return t;
  }

  /** Per-VM counters grouped by (vm label, model): labelled VMs alone, the rest under _other. */
  private vmSeries(): { vm: string; model: IommuModel; counters: VmCounters; iotlbEntries: number }[] {
    const other = new Map<IommuModel, { counters: VmCounters; iotlbEntries: number }>();
    for (const [model, retired] of this.retiredOther) {
      if (retired.translations + retired.invalidationEntries + retired.entriesInvalidated > 0) other.set(model, { counters: { ...retired }, iotlbEntries: 0 });
    }
    const out: { vm: string; model: IommuModel; counters: VmCounters; iotlbEntries: number }[] = [];
    for (const vm of this.vms.all()) {
      const counters = countersOf(vm);
      if (this.labelled.has(vm.id)) {
        out.push({ vm: vm.id, model: vm.model, counters, iotlbEntries: vm.ctx.driver.iotlbOccupancy });
        continue;
      }
      let o = other.get(vm.model);
      if (o === undefined) {
        o = { counters: zeroCounters(), iotlbEntries: 0 };
        other.set(vm.model, o);
      }
      addCounters(o.counters, counters);
      o.iotlbEntries += vm.ctx.driver.iotlbOccupancy;
    }
    for (const [model, o] of other) out.push({ vm: OTHER, model, ...o });
    return out;
  }

  /** Model-level totals: retired VMs plus the live ones. */
  private modelTotals(): Map<IommuModel, ModelTotals> {
    const totals = new Map<IommuModel, ModelTotals>();
    for (const [model, retired] of this.retiredTotals) {
      const t = zeroTotals();
      addTotals(t, retired);
      totals.set(model, t);
    }
    for (const vm of this.vms.all()) addTotals(this.totalsOf(totals, vm.model), vm.ctx.stats);
    return totals;
  }

  register(registry: Registry): void {
    const perVm = (name: string, help: string, pick: (c: VmCounters) => number) =>
      new ComputedMetric(name, help, "counter", () => this.vmSeries().map((s) => ({ labels: { vm: s.vm, model: s.model }, value: pick(s.counters) }))).register(
        registry,
      );

    perVm("iommufd_iotlb_hits_total", "Translations answered by the IOTLB.", (c) => c.hits);
    perVm("iommufd_iotlb_misses_total", "Translations that had to walk (IOTLB lookups that found nothing).", (c) => c.misses);
    perVm("iommufd_invalidation_entries_total", "Invalidation entries handled (IOMMU_HWPT_INVALIDATE entry_num out).", (c) => c.invalidationEntries);
    perVm("iommufd_iotlb_entries_invalidated_total", "Cached translations dropped by invalidation.", (c) => c.entriesInvalidated);

    new ComputedMetric("iommufd_translations_total", "Every Translate access, by result.", "counter", () =>
      this.vmSeries().flatMap((s) => [
        { labels: { vm: s.vm, model: s.model, result: "ok" }, value: s.counters.translations - s.counters.faults },
        { labels: { vm: s.vm, model: s.model, result: "fault" }, value: s.counters.faults },
      ]),
    ).register(registry);

    new ComputedMetric("iommufd_iotlb_entries", "IOTLB occupancy now.", "gauge", () =>
      this.vmSeries().map((s) => ({ labels: { vm: s.vm, model: s.model }, value: s.iotlbEntries })),
    ).register(registry);

    new ComputedMetric("iommufd_translation_faults_total", "Translation faults by VT-d reason.", "counter", () => {
      const out: Sample[] = [];
      for (const [model, t] of this.modelTotals()) {
        for (const reason of FAULT_NAMES) out.push({ labels: { model, reason }, value: t.faultsByReason[FAULT[reason]] });
      }
      return out;
    }).register(registry);

    new ComputedMetric("iommufd_page_walk_depth", "Page-table entries read by one walk.", "histogram", () => {
      const out: Sample[] = [];
      const none = new Float64Array(WALK_DEPTH_BOUNDS.length + 1);
      for (const [model, t] of this.modelTotals()) {
        for (const mode of MODES) {
          const counts = mode === "stage1" ? none : t.walkDepth[mode];
          const sum = mode === "stage1" ? 0 : t.walkDepthSum[mode];
          out.push(...histogramSamples("iommufd_page_walk_depth", { model, mode }, WALK_DEPTH_BOUNDS, counts, sum));
        }
      }
      return out;
    }).register(registry);

    new ComputedMetric("iommufd_invalidation_duration_seconds", "Wall time of one Invalidate request inside the emulator.", "histogram", () => {
      const out: Sample[] = [];
      for (const [model, t] of this.modelTotals()) {
        for (const dataType of INVALIDATION_DATA_TYPES) {
          const counts = t.invalidationSeconds[dataType];
          if (dataType === "other" && counts.every((c) => c === 0)) continue;
          out.push(
            ...histogramSamples("iommufd_invalidation_duration_seconds", { model, data_type: dataType }, INVALIDATION_SECONDS_BOUNDS, counts, t.invalidationSecondsSum[dataType]),
          );
        }
      }
      return out;
    }).register(registry);

    new ComputedMetric("iommufd_vms", "Live VMs (iommufd contexts).", "gauge", () => {
      const counts = new Map<IommuModel, number>(MODELS.map((m) => [m, 0]));
      for (const vm of this.vms.all()) counts.set(vm.model, (counts.get(vm.model) ?? 0) + 1);
      return [...counts].map(([model, value]) => ({ labels: { model }, value }));
    }).register(registry);

    new ComputedMetric("iommufd_objects", "Live iommufd objects of all VMs.", "gauge", () => {
      const counts: Record<ObjectType, number> = { ioas: 0, hwpt_paging: 0, hwpt_nested: 0, device: 0 };
      for (const vm of this.vms.all()) for (const obj of vm.ctx.objects()) counts[obj.type]++;
      return Object.entries(counts).map(([type, value]) => ({ labels: { type }, value }));
    }).register(registry);
  }
}
