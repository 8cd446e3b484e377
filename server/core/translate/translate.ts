import type { IommufdContext } from "../context.js";
import { IOMMU_NO_PASID } from "../device.js";
import { checkQuota } from "../limits.js";
import type { DmaBatch } from "./dma-batch.js";
import { FAULT } from "./fault.js";

/** The Translate batch quota: a check on the request's shape, before any lookup. */
export function checkTranslateBatch(ctx: IommufdContext, batch: DmaBatch): void {
  checkQuota("translateBatch", ctx.limits, 0, batch.count, "request", "Translate IOVAs");
}

/**
 * A device's DMA, accesses [start, end) of the batch: each goes through
 * whatever the device (or the PASID) is attached to — blocked when nothing
 * is — and the VM's counters move by what these accesses did.
 */
export function translate(ctx: IommufdContext, devId: number, pasid: number | undefined, batch: DmaBatch, start = 0, end = batch.count): void {
  if (start === 0) checkTranslateBatch(ctx, batch);
  const idev = ctx.getDevice(devId);
  const key = pasid ?? IOMMU_NO_PASID;
  const hwpt = idev.attachments.get(key);
  const before = { hits: batch.hits, misses: batch.misses, references: batch.references, faults: batch.faults };
  if (hwpt === undefined) batch.faultRange(FAULT.BLOCKED, start, end);
  else ctx.driver.translate(hwpt.domain, key, batch, start, end);
  const stats = ctx.stats;
  stats.translations += end - start;
  stats.iotlbHits += batch.hits - before.hits;
  stats.iotlbMisses += batch.misses - before.misses;
  stats.memoryReferences += batch.references - before.references;
  stats.faults += batch.faults - before.faults;
  // The histogram and fault-reason counts are folded in and cleared: they
  // only feed the VM's counters.
  if (batch.mode !== "blocked") {
    const depth = stats.walkDepth[batch.mode];
    for (let k = 0; k < depth.length; k++) depth[k] += batch.depthCounts[k];
    stats.walkDepthSum[batch.mode] += batch.references - before.references;
    batch.depthCounts.fill(0);
  }
  if (batch.faultReasons !== null) {
    for (let r = 0; r < 256; r++) stats.faultsByReason[r] += batch.faultReasons[r];
    batch.faultReasons.fill(0);
  }
}
