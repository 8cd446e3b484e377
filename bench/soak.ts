import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { IommufdClient, type VmMethods } from "../client/client.js";
import { SZ_4K, Stage1PageTable } from "../client/pagetable.js";
import { type HeapSummary, heapSnapshot } from "./heap-snapshot.js";
import { MIB, cpuSeconds, rssBreakdown, rssBytes, sampleSum, sampleValue, scrapeMetrics, type ServerChild, startServerChild } from "./server-child.js";
import {
  buildVm,
  checkTranslate,
  dataGpa,
  type FleetDevice,
  type FleetVm,
  fleetLimitArgs,
  LatencyBook,
  MOCK_EXTRA_BYTES,
  MOCK_EXTRA_IOVA,
  pool,
  rng,
  s1PageIova,
  sleep,
  timedVm,
  translateCase,
  VTD_EXTRA_BYTES,
  VTD_EXTRA_IOVA,
  verifyVm,
} from "./vm-fleet.js";

/**
 * npm run soak [-- --duration 30s --vms 1000 --clients 4 --json]
 *
 * "Nothing lost": a bounded soak of a real iommufd-service child process over
 * loopback. It builds --vms VMs (1 GiB sparse RAM, 4 devices, each on its own
 * nested HWPT; INTEL_VTD with first-stage tables in guest RAM written through
 * client/pagetable.ts, and --mock-percent MOCK VMs with selftest nesting),
 * runs mixed load from --clients connections for --duration (Translate
 * batches checked address by address, Invalidate, Map/Unmap,
 * attach/replace/detach, nested HWPT alloc/destroy, first-stage remaps through
 * WriteGuestMemory + Invalidate, guest RAM write/read-back, GetStats, ListVms,
 * create/destroy churn, ExportVm/ImportVm copies and migrations, /metrics
 * scrapes), destroys everything and lets the server settle.
 *
 * It reports the server's RSS over time (/proc/<pid>/status VmRSS: the server
 * alone) with a /proc/<pid>/smaps breakdown, p50/p99 per RPC kind, errors
 * (any failed call, wrong translation, or non-OK grpc_server_handled_total),
 * and a leak verdict:
 *
 * - "no leak": RSS after destroy + settle <= RSS before the first VM +
 *   --tolerance-mib (64 MiB: what V8 legitimately keeps after a load, i.e.
 *   new-space semi-spaces grown to 2 x 16 MiB, JIT code of every path used,
 *   HTTP/2 and gRPC buffers, malloc slack; the smallest leak it must see, the
 *   fleet itself, is ~350 KiB x VMs).
 * - If RSS stays above that, a heap snapshot (node --heapsnapshot-signal; V8
 *   runs a full GC first) tells why: any live per-VM object, or V8 heap used
 *   or external (ArrayBuffer) memory above start + 16 MiB, is a "leak".
 *   Otherwise the excess is memory glibc malloc keeps (it returns freed
 *   chunks to the OS only from the top of the brk heap), and the refill
 *   check decides: the same fleet built again must fit in the peak RSS of
 *   setup and load + tolerance ("no leak (allocator retention)"); leaked
 *   memory cannot be reused and would push it higher. --strict-rss turns
 *   this allowance off (with glibc malloc the soak then fails by design).
 *
 * Exit status: 0 = no errors and no leak; 1 otherwise.
 *
 * Short (CI):  npm run soak -- --duration 20s --vms 200     (45-50 s on this 2-core box)
 * Default:     npm run soak                                 (1000 VMs, 30 s of load: 60-75 s)
 * Long:        npm run soak -- --duration 30m               (1000 VMs, 30 min of load; RSS
 *              plateaus after ~7 min, the trend line reports the slope of the second half)
 * Diagnosis:   --cpu-prof DIR (server CPU profile), --heap-snapshot always, --server-env
 *              LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (another allocator)
 */

/** A bad command line: the message and exit status 2. */
function usage(message: string): never {
  console.error(`soak: ${message} (npm run soak -- --help)`);
  process.exit(2);
}

const { values: flags } = (() => {
  try {
    return parseArgs({
      options: {
        duration: { type: "string", default: "30s" },
        vms: { type: "string", default: "1000" },
        clients: { type: "string", default: "4" },
        "per-client": { type: "string", default: "2" },
        devices: { type: "string", default: "4" },
        "mock-percent": { type: "string", default: "10" },
        batch: { type: "string", default: "256" },
        "tolerance-mib": { type: "string", default: "64" },
        "settle-max": { type: "string", default: "90s" },
        "scrape-interval": { type: "string", default: "1s" },
        seed: { type: "string", default: "1" },
        "settle-scrape-interval": { type: "string", default: "5s" },
        "settle-quiet": { type: "string", default: "15s" },
        "heap-snapshot": { type: "string", default: "auto" },
        "server-env": { type: "string", multiple: true, default: [] },
        "strict-rss": { type: "boolean", default: false },
        "cpu-prof": { type: "string" },
        json: { type: "boolean", default: false },
        help: { type: "boolean", default: false },
      },
      strict: true,
    });
  } catch (e) {
    return usage((e as Error).message);
  }
})();

if (flags.help) {
  console.log(`usage: npm run soak -- [options]
  --duration D         load phase length: 30s (default), 5m, 30m, 1h
  --vms N              VMs built before the load (default 1000)
  --clients N          gRPC connections (default 4), each with --per-client workers (default 2)
  --devices N          devices per VM, each on its own nested HWPT (default 4, at most 60)
  --mock-percent P     share of MOCK VMs, the rest INTEL_VTD (default 10)
  --batch N            IOVAs per Translate (default 256)
  --tolerance-mib M    leak verdict: RSS after destroy + settle <= start + M MiB (default 64)
  --settle-max D       longest wait after destroy for RSS to come back (default 90s)
  --settle-quiet D     settled once RSS made no new low for this long (default 15s; 5s once within tolerance)
  --settle-scrape-interval D  /metrics scrapes while settling (default 5s; off)
  --server-env K=V     extra environment of the server process (repeatable; e.g. glibc malloc tunables)
  --heap-snapshot W    auto (default: when RSS misses the tolerance), always, never: a heap
                       snapshot of the server after settling (full GC, live VM objects by class)
  --scrape-interval D  /metrics scrape period during the run (default 1s)
  --seed N             PRNG seed (default 1)
  --cpu-prof DIR        write a V8 CPU profile of the server into DIR (bench/cpuprofile-top.ts reads it)
  --strict-rss         no allocator-retention verdict: RSS must come back within the tolerance
  --json               print only the final JSON line on stdout (progress goes to stderr)`);
  process.exit(0);
}

function duration(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(text);
  if (!m) usage(`${what}: "${text}" is not a duration like 30s, 5m, 1h`);
  return Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? "s") as "ms" | "s" | "m" | "h"];
}
function count(text: string, what: string, min = 1): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < min) usage(`${what}: "${text}" is not an integer >= ${min}`);
  return n;
}

const cfg = {
  durationMs: duration(flags.duration!, "--duration"),
  vms: count(flags.vms!, "--vms"),
  clients: count(flags.clients!, "--clients"),
  perClient: count(flags["per-client"]!, "--per-client"),
  // Each device's first-stage tables take 256 KiB of guest RAM from 1 MiB, below the data pages at 16 MiB.
  devices: Math.min(60, count(flags.devices!, "--devices")),
  mockPercent: count(flags["mock-percent"]!, "--mock-percent", 0),
  batch: count(flags.batch!, "--batch"),
  toleranceMiB: count(flags["tolerance-mib"]!, "--tolerance-mib", 0),
  settleMaxMs: duration(flags["settle-max"]!, "--settle-max"),
  scrapeIntervalMs: duration(flags["scrape-interval"]!, "--scrape-interval"),
  seed: count(flags.seed!, "--seed", 0),
  settleScrapeIntervalMs: flags["settle-scrape-interval"] === "off" ? 0 : duration(flags["settle-scrape-interval"]!, "--settle-scrape-interval"),
  settleQuietMs: duration(flags["settle-quiet"]!, "--settle-quiet"),
  serverEnv: Object.fromEntries(
    (flags["server-env"] as string[]).map((kv) => {
      const i = kv.indexOf("=");
      if (i <= 0) usage(`--server-env: "${kv}" is not NAME=VALUE`);
      return [kv.slice(0, i), kv.slice(i + 1)];
    }),
  ),
  heapSnapshot: ((v: string) => {
    if (v !== "auto" && v !== "always" && v !== "never") usage(`--heap-snapshot: "${v}" is not auto, always or never`);
    return v;
  })(flags["heap-snapshot"]!),
  strictRss: flags["strict-rss"]!,
  cpuProfDir: flags["cpu-prof"],
  json: flags.json!,
};

/** Human-readable output: stdout normally, stderr with --json (stdout carries only the JSON line). */
const say = (text: string) => (cfg.json ? console.error(text) : console.log(text));
const progress = (text: string) => console.error(`[soak ${((performance.now() - T0) / 1000).toFixed(1).padStart(6)} s] ${text}`);
const T0 = performance.now();

type Phase = "start" | "setup" | "load" | "destroy" | "settle" | "gc" | "refill";
let phase: Phase = "start";

// ---- bookkeeping ---------------------------------------------------------

interface RssSample {
  t: number;
  phase: Phase;
  rss: number;
}
const rssSamples: RssSample[] = [];
/** From the server's own /metrics: V8 heap used and external (ArrayBuffer) memory, at the last scrape. */
let heapUsed = 0;
let heapTotal = 0;
let external = 0;
const setupBook = new LatencyBook();
const loadBook = new LatencyBook();
const opCounts = new Map<string, number>();
const errors: string[] = [];
let errorCount = 0;

function error(what: string, e: unknown): void {
  errorCount++;
  const text = `${phase}: ${what}: ${e instanceof Error ? e.message : String(e)}`;
  if (errors.length < 25) errors.push(text);
  if (errorCount <= 5) progress(`ERROR ${text}`);
}

// ---- the server and its samplers -----------------------------------------

let server!: ServerChild;

interface MemoryPoint {
  rss: number;
  heapUsed: number;
  heapTotal: number;
  external: number;
  breakdown: ReturnType<typeof rssBreakdown>;
}

/** RSS with the server's V8 heap figures of the last scrape and the /proc/<pid>/smaps breakdown. */
const memoryPoint = (rss: number): MemoryPoint => ({ rss, heapUsed, heapTotal, external, breakdown: rssBreakdown(server.pid) });

function sampleRss(): number {
  const rss = rssBytes(server.pid);
  rssSamples.push({ t: (performance.now() - T0) / 1000, phase, rss });
  return rss;
}

async function scrape(book: LatencyBook | undefined): Promise<string> {
  const s = await scrapeMetrics(server.metrics);
  book?.record("metrics_scrape", s.ms);
  heapUsed = sampleValue(s.text, "nodejs_heap_size_used_bytes") ?? 0;
  heapTotal = sampleValue(s.text, "nodejs_heap_size_total_bytes") ?? 0;
  external = sampleValue(s.text, "nodejs_external_memory_bytes") ?? 0;
  if (!s.text.includes("iommufd_vms")) throw new Error("/metrics lacks iommufd_vms");
  return s.text;
}

/** Samples RSS every second and scrapes /metrics every --scrape-interval until stopped. */
function startSamplers(): () => Promise<void> {
  let running = true;
  const rssLoop = (async () => {
    while (running) {
      // The settle loop samples on its own, twice a second.
      const last = rssSamples[rssSamples.length - 1];
      if (phase !== "settle" && (last === undefined || performance.now() - T0 - last.t * 1000 > 500)) sampleRss();
      await sleep(1000);
    }
  })();
  const scrapeLoop = (async () => {
    while (running) {
      const settling = phase === "settle";
      if (!settling || cfg.settleScrapeIntervalMs > 0) {
        try {
          await scrape(phase === "load" ? loadBook : phase === "setup" ? setupBook : undefined);
        } catch (e) {
          error("GET /metrics", e);
        }
      }
      const interval = settling ? cfg.settleScrapeIntervalMs || 100 : cfg.scrapeIntervalMs;
      for (const due = performance.now() + interval; running && performance.now() < due && (phase === "settle") === settling; ) await sleep(Math.min(100, due - performance.now()));
    }
  })();
  return async () => {
    running = false;
    await Promise.all([rssLoop, scrapeLoop]);
  };
}

// ---- the fleet -----------------------------------------------------------

const random = rng(cfg.seed);
/** guest_rw's 16 pages: above every first-stage table and data page the fleet uses. */
const GUEST_RW_AT = 0x8000000n;
const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)];
let clients: IommufdClient[] = [];
const fleet: FleetVm[] = [];
let serial = 0;
/** Pool VMs being migrated (absent between their DestroyVm and ImportVm), and migrations ever begun. */
let migrating = 0;
let migrationsBegun = 0;

const modelOf = (i: number): "vtd" | "mock" => (cfg.mockPercent > 0 && i % Math.round(100 / cfg.mockPercent) === 0 ? "mock" : "vtd");
const buildOptions = (i: number) => ({ model: modelOf(i), devices: cfg.devices, pages: 16, pagingStructureCaches: i % 4 === 1, coalesce: true });

/** Takes a random idle pool VM (marks it busy), or undefined if none was found quickly. */
function takeVm(): FleetVm | undefined {
  for (let tries = 0; tries < 16; tries++) {
    const vm = pick(fleet);
    if (!vm.busy) {
      vm.busy = true;
      return vm;
    }
  }
  return undefined;
}

async function translateChecked(vm: FleetVm, dev: FleetDevice, what: string, write = false): Promise<void> {
  const c = translateCase(vm, dev, cfg.batch, random);
  const r = await vm.vm.translate({ devId: dev.devId, iovas: c.iovas, write });
  const why = checkTranslate(c, r);
  if (why) throw new Error(`${what}: ${vm.vmId} dev ${dev.devId} (${dev.attached}): ${why}`);
}

/** Re-binds a pool VM's RPCs to a client (so every connection serves every VM over time). */
const on = (vm: FleetVm, client: IommufdClient): VmMethods => (vm.vm = timedVm(client.vm(vm.vmId), loadBook));

// ---- operations ----------------------------------------------------------

type Op = (client: IommufdClient) => Promise<void>;

/** A pool VM operation: takes an idle VM, runs fn on it through `client`, releases it. */
const withVm =
  (fn: (vm: FleetVm, client: IommufdClient) => Promise<void>): Op =>
  async (client) => {
    const vm = takeVm();
    if (vm === undefined) return;
    try {
      on(vm, client);
      await fn(vm, client);
    } finally {
      vm.busy = false;
    }
  };

const OPS: [name: string, weight: number, op: Op][] = [
  // DMA: a checked batch through whatever the device is attached to.
  ["translate", 40, withVm((vm) => translateChecked(vm, pick(vm.devices), "translate", random() < 0.3))],
  // A guest IOTLB flush: a page range, or the whole domain.
  [
    "invalidate",
    10,
    withVm(async (vm) => {
      const dev = pick(vm.devices);
      if (dev.attached !== "nested") return;
      if (vm.model === "vtd") {
        const whole = random() < 0.2;
        const entries = whole ? [Stage1PageTable.invalidateAll()] : [Stage1PageTable.invalidation(s1PageIova(Math.floor(random() * 16)), SZ_4K * 4n)];
        const r = await vm.vm.invalidate({ hwptId: dev.nestedId, requests: { case: "vtdS1", value: { entries } } });
        if (r.entriesHandled !== 1) throw new Error(`invalidate: ${r.entriesHandled} entries handled, expected 1`);
      } else {
        const r = await vm.vm.invalidate({ hwptId: dev.nestedId, requests: { case: "selftest", value: { entries: [{ iotlbId: Math.floor(random() * 4), all: random() < 0.3 }] } } });
        if (r.entriesHandled !== 1) throw new Error(`invalidate: ${r.entriesHandled} entries handled, expected 1`);
      }
      await translateChecked(vm, dev, "translate after invalidate");
    }),
  ],
  // Stage-2 change: map an extra window of guest RAM, unmap it again (drops nested IOTLB entries).
  [
    "map_unmap",
    6,
    withVm(async (vm) => {
      const [iova, length] = vm.model === "vtd" ? [VTD_EXTRA_IOVA, VTD_EXTRA_BYTES] : [MOCK_EXTRA_IOVA, MOCK_EXTRA_BYTES];
      await vm.vm.mapIoas({ ioasId: vm.ioasId, userVa: 0x200000n, length, iova, readable: true, writeable: true });
      const r = await vm.vm.unmapIoas({ ioasId: vm.ioasId, iova, length });
      if (r.length !== length) throw new Error(`unmap: ${r.length} bytes unmapped, expected ${length}`);
      await translateChecked(vm, pick(vm.devices), "translate after unmap");
    }),
  ],
  // Attachments: replace onto the nest parent and back, or detach and re-attach.
  [
    "attach_replace_detach",
    6,
    withVm(async (vm) => {
      const dev = pick(vm.devices);
      if (random() < 0.5) {
        await vm.vm.attachDevice({ devId: dev.devId, ptId: vm.parentId, replace: true });
        dev.attached = "parent";
      } else {
        await vm.vm.detachDevice({ devId: dev.devId });
        dev.attached = "none";
      }
      await translateChecked(vm, dev, `translate while ${dev.attached}`);
      await vm.vm.attachDevice({ devId: dev.devId, ptId: dev.nestedId, replace: dev.attached !== "none" });
      dev.attached = "nested";
      await translateChecked(vm, dev, "translate re-attached");
    }),
  ],
  // A second nested HWPT over the same guest tables: allocate, switch to it, switch back, destroy it.
  [
    "hwpt_cycle",
    4,
    withVm(async (vm) => {
      const dev = pick(vm.devices);
      const data =
        vm.model === "vtd"
          ? ({ case: "vtdS1", value: { pgtblAddr: dev.s1!.root, addrWidth: dev.s1!.addrWidth } } as const)
          : ({ case: "selftest", value: { iotlb: 7 } } as const);
      const { hwptId } = await vm.vm.allocHwpt({ devId: dev.devId, ptId: vm.parentId, data });
      const keep = dev.nestedId;
      await vm.vm.attachDevice({ devId: dev.devId, ptId: hwptId, replace: true });
      await translateChecked(vm, dev, "translate on a second nested HWPT");
      await vm.vm.attachDevice({ devId: dev.devId, ptId: keep, replace: true });
      await vm.vm.destroy({ id: hwptId });
    }),
  ],
  // The guest changes a first-stage leaf (WriteGuestMemory), flushes it, and DMA sees the new page.
  [
    "s1_remap",
    8,
    withVm(async (vm) => {
      if (vm.model !== "vtd") return;
      const dev = pick(vm.devices);
      const i = Math.floor(random() * dev.pageGpa.length);
      const moved = dev.pageGpa[i] === dataGpa(dev.index, i, false);
      await dev.s1!.map(s1PageIova(i), dataGpa(dev.index, i, moved), SZ_4K);
      dev.pageGpa[i] = dataGpa(dev.index, i, moved);
      if (dev.attached === "nested") {
        await vm.vm.invalidate({ hwptId: dev.nestedId, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidation(s1PageIova(i), SZ_4K)] } } });
      }
      await translateChecked(vm, dev, "translate after remap");
    }),
  ],
  // Guest RAM traffic: write 4 KiB, read it back. Always the same 16 data
  // pages per VM (one 64 KiB chunk of the server's guest RAM), so that touched
  // RAM stops growing early and a long run's RSS trend means something.
  [
    "guest_rw",
    6,
    withVm(async (vm) => {
      const gpa = GUEST_RW_AT + BigInt(Math.floor(random() * 16)) * SZ_4K;
      const data = new Uint8Array(4096);
      const seed = Math.floor(random() * 256);
      for (let k = 0; k < data.length; k++) data[k] = (k * 31 + seed) & 0xff;
      await vm.vm.writeGuestMemory({ gpa, data });
      const back = await vm.vm.readGuestMemory({ gpa, length: 4096 });
      if (Buffer.compare(Buffer.from(back.data), Buffer.from(data)) !== 0) throw new Error(`guest RAM at 0x${gpa.toString(16)} reads back different bytes`);
    }),
  ],
  // Counters: monotonic, also across export/import.
  [
    "get_stats",
    6,
    withVm(async (vm) => {
      const { stats } = await vm.vm.getStats();
      if (stats === undefined || stats.translations < vm.translationsSeen) throw new Error(`${vm.vmId}: translations went from ${vm.translationsSeen} to ${stats?.translations}`);
      vm.translationsSeen = stats.translations;
    }),
  ],
  // The VMM's view: every VM, page by page.
  [
    "list_vms",
    1,
    async (client) => {
      // A pool VM may be missing while it migrates during the listing.
      const inFlight = migrating;
      const begun = migrationsBegun;
      let token = "";
      let n = 0;
      do {
        const page = await loadBook.time("listVms", () => client.listVms({ pageSize: 500, pageToken: token }));
        n += page.vms.length;
        token = page.nextPageToken;
      } while (token !== "");
      const moving = inFlight + migrationsBegun - begun;
      if (n < cfg.vms - moving) throw new Error(`ListVms returned ${n} VMs, the pool alone has ${cfg.vms} (${moving} migrating meanwhile)`);
    },
  ],
  // Churn: a whole VM comes and goes.
  [
    "vm_churn",
    2,
    async (client) => {
      const i = serial++;
      const vmId = `churn-${i}`;
      const vm = await buildVm(client, loadBook, vmId, buildOptions(i));
      try {
        await verifyVm(vm, 32, random);
      } finally {
        await loadBook.time("destroyVm", () => client.destroyVm({ vmId }));
      }
    },
  ],
  // Snapshots: export a pool VM and import it as a copy (checked, destroyed),
  // or migrate it: export, destroy, import under the same vm_id, carry on.
  [
    "export_import",
    2,
    withVm(async (vm, client) => {
      const snapshot = await loadBook.time("exportVm", () => client.exportVm({ vmId: vm.vmId }));
      if (random() < 0.5) {
        const copyId = `copy-${serial++}`;
        await loadBook.time("importVm", () => client.importVm({ vmId: copyId, snapshot }));
        try {
          await verifyVm({ ...vm, vm: timedVm(client.vm(copyId), loadBook) }, 32, random);
        } finally {
          await loadBook.time("destroyVm", () => client.destroyVm({ vmId: copyId }));
        }
      } else {
        migrating++;
        migrationsBegun++;
        try {
          await loadBook.time("destroyVm", () => client.destroyVm({ vmId: vm.vmId }));
          await loadBook.time("importVm", () => client.importVm({ vmId: vm.vmId, snapshot }));
        } finally {
          migrating--;
        }
        await verifyVm(vm, 32, random);
      }
    }),
  ],
];

const totalWeight = OPS.reduce((s, [, w]) => s + w, 0);
function pickOp(): [string, Op] {
  let x = random() * totalWeight;
  for (const [name, w, op] of OPS) {
    if ((x -= w) < 0) return [name, op];
  }
  return [OPS[0][0], OPS[0][2]];
}

async function loadWorker(client: IommufdClient, until: number): Promise<void> {
  while (performance.now() < until) {
    const [name, op] = pickOp();
    const t0 = performance.now();
    try {
      await op(client);
      loadBook.record(`op:${name}`, performance.now() - t0);
      opCounts.set(name, (opCounts.get(name) ?? 0) + 1);
    } catch (e) {
      error(name, e);
    }
  }
}

// ---- reporting -----------------------------------------------------------

const mib = (b: number) => b / MIB;
const f1 = (x: number) => x.toFixed(1);

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}

/** About `max` RSS samples spread over the run, always keeping each phase's first and last. */
function rssTimeline(max: number): RssSample[] {
  const keep = new Set<number>();
  for (let i = 0; i < rssSamples.length; i++) {
    if (i === 0 || i === rssSamples.length - 1 || rssSamples[i].phase !== rssSamples[i - 1].phase || rssSamples[i].phase !== rssSamples[i + 1]?.phase) keep.add(i);
  }
  const step = Math.max(1, Math.ceil(rssSamples.length / max));
  for (let i = 0; i < rssSamples.length; i += step) keep.add(i);
  return [...keep].sort((a, b) => a - b).map((i) => rssSamples[i]);
}

/**
 * Least-squares slope of RSS over the second half of [from, to] (ms since
 * the epoch of performance.now()), in MiB per minute: in a long run a leak
 * shows as a steady climb once the pool and caches are warm.
 */
function rssTrend(from: number, to: number): number {
  const t0 = (from + (to - from) / 2 - T0) / 1000;
  const xs = rssSamples.filter((x) => x.phase === "load" && x.t >= t0);
  if (xs.length < 3) return 0;
  const mt = xs.reduce((a, x) => a + x.t, 0) / xs.length;
  const mr = xs.reduce((a, x) => a + x.rss, 0) / xs.length;
  const num = xs.reduce((a, x) => a + (x.t - mt) * (x.rss - mr), 0);
  const den = xs.reduce((a, x) => a + (x.t - mt) ** 2, 0);
  return den === 0 ? 0 : (num / den / MIB) * 60;
}

// ---- the run ---------------------------------------------------------------

const snapshotDir = mkdtempSync(join(tmpdir(), "iommufd-soak-"));
/** V8 heap used and external memory after the forced GC may exceed their start level by this much. */
const HEAP_SLACK = 16 * MIB;

/** Builds the pool of --vms VMs over every worker; every device is checked with a Translate. Seconds. */
async function buildFleet(): Promise<number> {
  const t0 = performance.now();
  let built = 0;
  const indexes = Array.from({ length: cfg.vms }, (_, i) => i);
  await pool(indexes, cfg.clients * cfg.perClient, async (i, worker) => {
    const vm = await buildVm(clients[worker % cfg.clients], setupBook, `soak-${String(i).padStart(5, "0")}`, buildOptions(i));
    await verifyVm(vm, 16, random);
    fleet.push(vm);
    if (++built % 250 === 0) progress(`${phase}: ${built} VMs, RSS ${f1(mib(rssBytes(server.pid)))} MiB`);
  });
  return (performance.now() - t0) / 1000;
}

/** Destroys every VM the server lists (the pool; churn and copies must be gone already). Seconds. */
async function destroyAll(): Promise<number> {
  const t0 = performance.now();
  const all: string[] = [];
  for (let token = ""; ; ) {
    const page = await clients[0].listVms({ pageSize: 1000, pageToken: token });
    all.push(...page.vms.map((v) => v.vmId));
    token = page.nextPageToken;
    if (token === "") break;
  }
  if (all.length !== cfg.vms) error("destroy", new Error(`ListVms shows ${all.length} VMs before destroy, expected the ${cfg.vms} of the pool (churn or copies left behind?)`));
  await pool(all, cfg.clients * cfg.perClient, async (vmId, worker) => {
    await setupBook.time("destroyVm", () => clients[worker % cfg.clients].destroyVm({ vmId }));
  }).catch((e) => error("destroyVm", e));
  fleet.length = 0;
  const left = await clients[0].listVms({});
  if (left.vms.length !== 0) error("destroy", new Error(`${left.vms.length} VMs left after destroying all`));
  return (performance.now() - t0) / 1000;
}

/** /metrics must show nothing of any VM: no VM, no object, no per-VM series. */
function checkNothingLeft(text: string, when: string): void {
  const vmsLeft = sampleSum(text, "iommufd_vms");
  const objectsLeft = sampleSum(text, "iommufd_objects");
  const vmSeriesLeft = text.split("\n").filter((l) => l.startsWith("iommufd_") && /vm="(?!_other")/.test(l)).length;
  if (vmsLeft !== 0 || objectsLeft !== 0 || vmSeriesLeft !== 0) error(when, new Error(`/metrics still shows ${vmsLeft} VMs, ${objectsLeft} objects, ${vmSeriesLeft} per-VM series`));
}

async function main(): Promise<number> {
  progress(`server: 1 child process; ${cfg.vms} VMs x ${cfg.devices} devices, load ${cfg.durationMs / 1000} s from ${cfg.clients} x ${cfg.perClient} workers`);
  // --heapsnapshot-signal is inert until signalled (see --heap-snapshot).
  server = await startServerChild({
    args: fleetLimitArgs(cfg.vms),
    nodeArgs: [
      "--heapsnapshot-signal=SIGUSR2",
      `--diagnostic-dir=${snapshotDir}`,
      ...(cfg.cpuProfDir ? ["--cpu-prof", `--cpu-prof-dir=${cfg.cpuProfDir}`] : []),
    ],
    env: cfg.serverEnv,
  });
  clients = Array.from({ length: cfg.clients }, () => new IommufdClient(server.grpc, { channelOptions: { "grpc.use_local_subchannel_pool": 1 } }));
  await Promise.all(clients.map((c) => c.waitForReady(10_000)));
  const cpuAtStart = cpuSeconds(server.pid);

  // Start level: the server up, every listener touched once, idle.
  await clients[0].listVms({});
  await scrape(undefined);
  await sleep(2000);
  await scrape(undefined);
  const start = memoryPoint(sampleRss());
  const limit = start.rss + cfg.toleranceMiB * MIB;
  progress(`start: RSS ${f1(mib(start.rss))} MiB (V8 heap used ${f1(mib(heapUsed))} MiB, external ${f1(mib(external))} MiB)`);
  const stopSamplers = startSamplers();

  phase = "setup";
  const setupSeconds = await buildFleet();
  const afterSetup = memoryPoint(sampleRss());
  progress(`setup: ${cfg.vms} VMs in ${f1(setupSeconds)} s, RSS ${f1(mib(afterSetup.rss))} MiB`);

  phase = "load";
  const loadT0 = performance.now();
  const until = loadT0 + cfg.durationMs;
  const ticker = setInterval(() => {
    const ops = [...opCounts.values()].reduce((a, b) => a + b, 0);
    progress(`load: ${ops} ops, ${errorCount} errors, RSS ${f1(mib(rssBytes(server.pid)))} MiB, V8 heap used ${f1(mib(heapUsed))} MiB`);
  }, Math.max(5000, Math.min(60_000, cfg.durationMs / 10)));
  await Promise.all(clients.flatMap((c) => Array.from({ length: cfg.perClient }, () => loadWorker(c, until))));
  clearInterval(ticker);
  const loadSeconds = (performance.now() - loadT0) / 1000;
  const endOfLoad = memoryPoint(sampleRss());
  const trend = rssTrend(loadT0, performance.now());

  phase = "destroy";
  const destroySeconds = await destroyAll();

  // Settle. The server has no --expose-gc: its heap shrinks when V8 decides
  // to collect, which an idle Node process does through V8's memory reducer,
  // typically 10-40 s after its last major GC, or not at all when that
  // already ran. So: poll RSS every 0.5 s (and scrape /metrics every
  // --settle-scrape-interval, as a Prometheus would) until RSS is within the
  // tolerance and has made no new low for 5 s, or has made no new low for
  // --settle-quiet, or --settle-max has passed.
  phase = "settle";
  const settleT0 = performance.now();
  let rss = sampleRss();
  let low = rss;
  let lowAt = performance.now();
  for (;;) {
    const quiet = performance.now() - lowAt;
    if (performance.now() - settleT0 >= cfg.settleMaxMs || quiet >= cfg.settleQuietMs || (rss <= limit && quiet >= 5000)) break;
    await sleep(500);
    rss = sampleRss();
    if (rss < low - MIB) lowAt = performance.now();
    low = Math.min(low, rss);
  }
  const settleSeconds = (performance.now() - settleT0) / 1000;
  const settledText = await scrape(undefined);
  const settled = memoryPoint(rss);
  checkNothingLeft(settledText, "after destroy");
  const withinTolerance = settled.rss <= limit;
  progress(`settled: RSS ${f1(mib(settled.rss))} MiB after ${f1(settleSeconds)} s (limit ${f1(mib(limit))} MiB)`);

  // A heap snapshot forces a full GC and lists what is still alive: any
  // per-VM object is a leak. Then, if RSS did not come back, the refill
  // check: the same fleet built again must fit in the RSS the first one
  // needed (memory that malloc keeps is reused; leaked memory is not).
  let heap: HeapSummary | undefined;
  let afterGc: MemoryPoint | undefined;
  if (cfg.heapSnapshot === "always" || (cfg.heapSnapshot === "auto" && !withinTolerance)) {
    phase = "gc";
    progress("heap snapshot of the server (V8 runs a full GC first)");
    try {
      heap = await heapSnapshot(server.pid, snapshotDir);
      await scrape(undefined);
      afterGc = memoryPoint(sampleRss());
      heap.rssAfterMiB = Math.round(mib(afterGc.rss) * 10) / 10;
    } catch (e) {
      error("heap snapshot", e);
    }
  }
  const peak = rssSamples.filter((x) => x.phase === "setup" || x.phase === "load").reduce((m, x) => Math.max(m, x.rss), 0);
  let refill: { point: MemoryPoint; seconds: number; ok: boolean } | undefined;
  if (!withinTolerance) {
    phase = "refill";
    const seconds = await buildFleet();
    await sleep(1000);
    const point = memoryPoint(sampleRss());
    refill = { point, seconds, ok: point.rss <= peak + cfg.toleranceMiB * MIB };
    progress(`refill: ${cfg.vms} VMs again in ${f1(seconds)} s, RSS ${f1(mib(point.rss))} MiB (peak of setup and load: ${f1(mib(peak))} MiB)`);
    phase = "destroy";
    await destroyAll();
  }
  await stopSamplers();

  const finalText = await scrape(undefined);
  checkNothingLeft(finalText, "at the end");
  const grpcErrors = finalText
    .split("\n")
    .filter((l) => l.startsWith("grpc_server_handled_total{") && !l.includes('grpc_code="OK"'))
    .reduce((sum, l) => sum + Number(l.slice(l.lastIndexOf(" ") + 1)), 0);
  if (grpcErrors !== 0) error("at the end", new Error(`grpc_server_handled_total counts ${grpcErrors} non-OK calls`));
  const serverCpu = cpuSeconds(server.pid) - cpuAtStart;
  if (server.errorLines.length > 0) error("server log", new Error(`${server.errorLines.length} error lines, first: ${server.errorLines[0].slice(0, 300)}`));

  for (const c of clients) c.close();
  const exit = await server.stop();
  rmSync(snapshotDir, { recursive: true, force: true });
  if (exit !== 0) error("server exit", new Error(`the server exited with ${exit} on SIGTERM`));

  // ---- verdict ----
  const liveVmObjects = heap ? Object.entries(heap.vmObjects).map(([k, v]) => `${k} ${v}`) : [];
  const heapBack = afterGc !== undefined && afterGc.heapUsed <= start.heapUsed + HEAP_SLACK && afterGc.external <= start.external + HEAP_SLACK;
  let verdict: "no leak" | "no leak (allocator retention)" | "leak";
  let why: string;
  if (liveVmObjects.length > 0) {
    verdict = "leak";
    why = `VM objects alive after a full GC: ${liveVmObjects.join(", ")}`;
  } else if (afterGc !== undefined && !heapBack) {
    verdict = "leak";
    why = `after a full GC the server's V8 heap used ${f1(mib(afterGc.heapUsed))} MiB / external ${f1(mib(afterGc.external))} MiB exceed start (${f1(mib(start.heapUsed))} / ${f1(mib(start.external))} MiB) + 16 MiB`;
  } else if (withinTolerance) {
    verdict = "no leak";
    why = `RSS after destroy + settle ${f1(mib(settled.rss))} MiB <= start ${f1(mib(start.rss))} MiB + ${cfg.toleranceMiB} MiB`;
  } else if (afterGc !== undefined && refill?.ok && !cfg.strictRss) {
    verdict = "no leak (allocator retention)";
    why =
      `RSS after destroy + settle ${f1(mib(settled.rss))} MiB > start ${f1(mib(start.rss))} MiB + ${cfg.toleranceMiB} MiB, but it is memory malloc keeps for reuse ` +
      `(brk heap ${f1(mib(settled.breakdown.brkHeap))} MiB vs ${f1(mib(start.breakdown.brkHeap))} at start): after a full GC no VM object is alive and V8 heap used ` +
      `${f1(mib(afterGc.heapUsed))} MiB / external ${f1(mib(afterGc.external))} MiB are back to start (${f1(mib(start.heapUsed))} / ${f1(mib(start.external))} MiB), ` +
      `and the same fleet built again needs ${f1(mib(refill.point.rss))} MiB RSS <= peak ${f1(mib(peak))} MiB + ${cfg.toleranceMiB} MiB (RSS does not ratchet up)`;
  } else {
    verdict = "leak";
    why =
      `RSS after destroy + settle ${f1(mib(settled.rss))} MiB > start ${f1(mib(start.rss))} MiB + ${cfg.toleranceMiB} MiB` +
      (afterGc === undefined ? " (and no heap snapshot to tell why: --heap-snapshot never, or it failed)" : "") +
      (refill && !refill.ok ? `; the same fleet built again needs ${f1(mib(refill.point.rss))} MiB > peak ${f1(mib(peak))} MiB + ${cfg.toleranceMiB} MiB` : "");
  }
  const ok = errorCount === 0 && verdict !== "leak";
  const ops = [...opCounts.values()].reduce((a, b) => a + b, 0);

  // ---- output ----
  say(`\niommufd-service soak: ${cfg.vms} VMs x ${cfg.devices} devices (nested HWPTs, 1 GiB sparse RAM each, ${cfg.mockPercent}% MOCK), ${cfg.clients} x ${cfg.perClient} workers`);
  say(
    `phases: setup ${f1(setupSeconds)} s, load ${f1(loadSeconds)} s (${ops} ops, ${f1(ops / loadSeconds)} ops/s), destroy ${f1(destroySeconds)} s, settle ${f1(settleSeconds)} s` +
      `${refill ? `, refill ${f1(refill.seconds)} s` : ""}; server CPU ${f1(serverCpu)} s`,
  );
  say(
    loadSeconds >= 120
      ? `RSS trend over the second half of the load: ${trend >= 0 ? "+" : ""}${trend.toFixed(2)} MiB/min (informational; a leak climbs steadily in a long run)\n`
      : "RSS trend: n/a (load under 2 min: RSS is still warming up)\n",
  );
  say("server RSS over time (VmRSS of the server process)");
  say(table(["t (s)", "phase", "RSS MiB"], rssTimeline(40).map((x) => [f1(x.t), x.phase, f1(mib(x.rss))])));
  say("\nlatency per RPC kind during the load (ms; op:* = a whole checked operation)");
  const loadRows = loadBook.rows();
  say(table(["kind", "count", "p50", "p99", "max"], loadRows.map((r) => [r.kind, String(r.count), r.p50.toFixed(2), r.p99.toFixed(2), r.max.toFixed(2)])));
  say("\nlatency while building and destroying the fleet (ms)");
  const setupRows = setupBook.rows();
  say(table(["kind", "count", "p50", "p99", "max"], setupRows.map((r) => [r.kind, String(r.count), r.p50.toFixed(2), r.p99.toFixed(2), r.max.toFixed(2)])));
  say("\nserver memory, MiB: RSS and where it is (/proc/<pid>/smaps: malloc's brk heap; other anonymous = V8 heap pages,");
  say("mmapped malloc chunks, thread arenas; files = code), and V8's figures from the server's /metrics at that time");
  const memRow = (name: string, m: MemoryPoint) => [
    name,
    f1(mib(m.rss)),
    f1(mib(m.breakdown.brkHeap)),
    f1(mib(m.breakdown.anonymous)),
    f1(mib(m.breakdown.files)),
    f1(mib(m.heapUsed)),
    f1(mib(m.heapTotal)),
    f1(mib(m.external)),
  ];
  say(
    table(
      ["point", "RSS", "brk heap", "other anon", "files", "V8 heap used", "V8 heap total", "external"],
      [
        memRow("start (before VMs)", start),
        memRow("after setup", afterSetup),
        memRow("end of load", endOfLoad),
        ["peak (setup, load)", f1(mib(peak)), "", "", "", "", "", ""],
        memRow("after destroy + settle", settled),
        ...(afterGc ? [memRow("after a forced full GC", afterGc)] : []),
        ...(refill ? [memRow("fleet built again", refill.point)] : []),
      ],
    ),
  );
  if (heap) {
    say(`\nheap snapshot after settling (${f1(heap.bytes / MIB)} MiB file, ${heap.totalSelfMiB} MiB live)`);
    say(`  VM objects alive: ${liveVmObjects.length === 0 ? "none" : liveVmObjects.join(", ")}`);
    say(`  largest constructors: ${heap.top.map(([n, c, m]) => `${n} x${c} ${m} MiB`).join("; ")}`);
  }
  say(`\nerrors: ${errorCount}`);
  for (const e of errors) say(`  ${e}`);
  say(`verdict: ${verdict}: ${why}`);
  say(`result: ${ok ? "PASS" : "FAIL"}`);

  const round = (x: number) => Math.round(x * 1000) / 1000;
  const memJson = (m: MemoryPoint) => ({
    rss: round(mib(m.rss)),
    brkHeap: round(mib(m.breakdown.brkHeap)),
    otherAnonymous: round(mib(m.breakdown.anonymous)),
    files: round(mib(m.breakdown.files)),
    v8HeapUsed: round(mib(m.heapUsed)),
    v8HeapTotal: round(mib(m.heapTotal)),
    external: round(mib(m.external)),
  });
  const latencies = (rows: ReturnType<LatencyBook["rows"]>) => Object.fromEntries(rows.map((r) => [r.kind, { count: r.count, p50: round(r.p50), p99: round(r.p99), max: round(r.max) }]));
  const summary = {
    soak: {
      vms: cfg.vms,
      devices: cfg.devices,
      clients: cfg.clients,
      workersPerClient: cfg.perClient,
      mockPercent: cfg.mockPercent,
      durationSeconds: round(loadSeconds),
      setupSeconds: round(setupSeconds),
      settleSeconds: round(settleSeconds),
      ops,
      opsPerSecond: round(ops / loadSeconds),
      opCounts: Object.fromEntries(opCounts),
      errors: errorCount,
      firstErrors: errors,
      rssMiB: {
        start: round(mib(start.rss)),
        afterSetup: round(mib(afterSetup.rss)),
        endOfLoad: round(mib(endOfLoad.rss)),
        peak: round(mib(peak)),
        afterDestroy: round(mib(settled.rss)),
        afterGc: afterGc ? round(mib(afterGc.rss)) : null,
        refill: refill ? round(mib(refill.point.rss)) : null,
      },
      memoryMiB: {
        start: memJson(start),
        afterSetup: memJson(afterSetup),
        endOfLoad: memJson(endOfLoad),
        afterDestroy: memJson(settled),
        ...(afterGc ? { afterGc: memJson(afterGc) } : {}),
        ...(refill ? { refill: memJson(refill.point) } : {}),
      },
      rssTrendMiBPerMinute: loadSeconds >= 120 ? round(trend) : null,
      toleranceMiB: cfg.toleranceMiB,
      withinTolerance,
      verdict,
      why,
      heapSnapshot: heap === undefined ? null : { vmObjects: heap.vmObjects, liveMiB: heap.totalSelfMiB, top: heap.top },
      serverCpuSeconds: round(serverCpu),
      latencyMs: latencies(loadRows),
      setupLatencyMs: latencies(setupRows),
      rssTimeline: rssTimeline(60).map((x) => ({ t: round(x.t), phase: x.phase, rssMiB: round(mib(x.rss)) })),
      ok,
    },
  };
  console.log(JSON.stringify(summary));
  return ok ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  async (e: unknown) => {
    console.error(`soak: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    await server?.stop();
    rmSync(snapshotDir, { recursive: true, force: true });
    process.exit(1);
  },
);
