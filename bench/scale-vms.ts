import { IommufdClient } from "../client/client.js";
import { percentile, type Result } from "./harness.js";
import { MIB, rssBytes, sampleSum, sampleValue, scrapeMetrics, seriesCount, startServerChild } from "./server-child.js";
import { buildVm, fleetLimitArgs, LatencyBook, pool, rng, sleep, verifyVm } from "./vm-fleet.js";

/**
 * scale_vms (performance.md): 1000 VMs x 4 devices x nested HWPT, 1 GiB of
 * sparse guest RAM each, in an iommufd-service child process built over
 * gRPC (bench/vm-fleet.ts: INTEL_VTD, the IOAS maps all 1 GiB, one
 * first-stage table per device written to guest RAM, every device attached
 * to its nested HWPT and checked with a Translate). Measures the server's
 * RSS (/proc/<pid>/status VmRSS, target <= 1 GiB) and the wall time of a
 * GET /metrics scrape from an idle client (p50/p99 of 20, target <= 100 ms).
 *
 * SCALE_VMS=N overrides the VM count (the target is for 1000).
 */

const TARGET_VMS = 1000;
const DEVICES = 4;
const SCRAPES = 20;
const CLIENTS = 4;

export async function scaleVms(options: { quick: boolean }): Promise<Result[]> {
  const vms = Number(process.env.SCALE_VMS ?? TARGET_VMS);
  if (!Number.isInteger(vms) || vms < 1) throw new Error(`SCALE_VMS=${process.env.SCALE_VMS} is not a positive integer`);
  const server = await startServerChild({ args: fleetLimitArgs(vms) });
  const clients = Array.from({ length: CLIENTS }, () => new IommufdClient(server.grpc, { channelOptions: { "grpc.use_local_subchannel_pool": 1 } }));
  try {
    await Promise.all(clients.map((c) => c.waitForReady(10_000)));
    await scrapeMetrics(server.metrics);
    const rssIdle = rssBytes(server.pid);
    const book = new LatencyBook();
    const random = rng(1);
    const t0 = performance.now();
    const names = Array.from({ length: vms }, (_, i) => `scale-${String(i).padStart(5, "0")}`);
    await pool(names, CLIENTS * 2, async (vmId, worker) => {
      const vm = await buildVm(clients[worker % CLIENTS], book, vmId, { model: "vtd", devices: DEVICES, pages: 16, pagingStructureCaches: false, coalesce: true });
      await verifyVm(vm, 16, random);
    });
    const buildSeconds = (performance.now() - t0) / 1000;
    console.error(`  scale_vms: built ${vms} VMs x ${DEVICES} nested devices in ${buildSeconds.toFixed(1)} s`);

    // RSS of the idle server. The build's garbage may not be collected yet
    // (no --expose-gc in the server; V8 collects when it decides), as in a
    // real deployment right after its VMs came up.
    await sleep(options.quick ? 1000 : 3000);
    const rss = rssBytes(server.pid);

    const warm = await scrapeMetrics(server.metrics);
    const v8Heap = sampleValue(warm.text, "nodejs_heap_size_used_bytes") ?? 0;
    const external = sampleValue(warm.text, "nodejs_external_memory_bytes") ?? 0;
    const liveVms = sampleSum(warm.text, "iommufd_vms");
    const nested = sampleSum(warm.text, "iommufd_objects", { type: "hwpt_nested" });
    if (liveVms !== vms || nested !== vms * DEVICES) throw new Error(`scale_vms: /metrics reports ${liveVms} VMs and ${nested} nested HWPTs, expected ${vms} and ${vms * DEVICES}`);
    await scrapeMetrics(server.metrics);
    const ms = new Float64Array(SCRAPES);
    for (let i = 0; i < SCRAPES; i++) {
      ms[i] = (await scrapeMetrics(server.metrics)).ms;
      await sleep(50);
    }
    const rssAfterScrapes = rssBytes(server.pid);
    const scale = vms === TARGET_VMS ? "" : ` (SCALE_VMS=${vms}, not the target's ${TARGET_VMS})`;
    return [
      { scenario: "scale_vms_rss", value: rss / MIB, unit: "MiB RSS", ceiling: 1024, target: `≤ 1 GiB for ${vms} VMs x ${DEVICES} devices x nested HWPT, 1 GiB RAM each${scale}` },
      { scenario: "scale_vms_rss_per_vm", value: (rss - rssIdle) / vms / 1024, unit: "KiB/VM", ceiling: (1024 * 1024) / TARGET_VMS, target: `(RSS - idle ${(rssIdle / MIB).toFixed(0)} MiB) / VMs`, informational: true },
      {
        scenario: "scale_vms_rss_parts",
        value: external / MIB,
        unit: "MiB external",
        ceiling: rss / MIB,
        target: `of the RSS: typed arrays (ArrayBuffers; V8 heap used ${(v8Heap / MIB).toFixed(0)} MiB)`,
        informational: true,
      },
      { scenario: "scale_vms_scrape_p99", value: percentile(ms, 0.99), unit: "ms p99", ceiling: 100, target: `≤ 100 ms, ${SCRAPES} idle scrapes of ${(warm.bytes / 1024).toFixed(0)} KiB, ${seriesCount(warm.text)} samples` },
      { scenario: "scale_vms_scrape_p50", value: percentile(ms, 0.5), unit: "ms p50", ceiling: 100, target: "≤ 100 ms", informational: true },
      { scenario: "scale_vms_rss_after_scrapes", value: rssAfterScrapes / MIB, unit: "MiB RSS", ceiling: 1024, target: "≤ 1 GiB", informational: true },
      { scenario: "scale_vms_build", value: vms / buildSeconds, unit: "VMs/s", ceiling: vms / buildSeconds, target: `built in ${buildSeconds.toFixed(1)} s over ${CLIENTS} connections`, informational: true },
    ];
  } finally {
    for (const c of clients) c.close();
    await server.stop();
  }
}
