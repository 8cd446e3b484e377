import type { IommufdContext } from "../context.js";
import { IOMMU_NO_PASID } from "../device.js";
import type { DmaBatch } from "./dma-batch.js";
import { FAULT } from "./fault.js";

/**
 * A device's DMA: each access goes through whatever the device (or the
 * PASID) is attached to — blocked when nothing is — and the VM's counters
 * move by what the batch did.
 */
export function translate(ctx: IommufdContext, devId: number, pasid: number | undefined, batch: DmaBatch): void {
  const idev = ctx.getDevice(devId);
  const key = pasid ?? IOMMU_NO_PASID;
  const hwpt = idev.attachments.get(key);
  if (hwpt === undefined) batch.faultAll(FAULT.BLOCKED);
  else ctx.driver.translate(hwpt.domain, key, batch);
  const stats = ctx.stats;
  stats.translations += batch.count;
  stats.iotlbHits += batch.hits;
  stats.iotlbMisses += batch.misses;
  stats.memoryReferences += batch.references;
  stats.faults += batch.faults;
  if (batch.mode !== "blocked") {
    const depth = stats.walkDepth[batch.mode];
    for (let k = 0; k < depth.length; k++) depth[k] += batch.depthCounts[k];
    stats.walkDepthSum[batch.mode] += batch.references;
  }
  if (batch.faultReasons !== null) {
    for (let r = 0; r < 256; r++) stats.faultsByReason[r] += batch.faultReasons[r];
  }
}
