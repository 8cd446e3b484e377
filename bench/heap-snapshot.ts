import { readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { sleep } from "./vm-fleet.js";

/**
 * A heap snapshot of a server child started with
 * --heapsnapshot-signal=SIGUSR2 --diagnostic-dir=DIR: V8 runs a full GC
 * before writing it, and the summary counts what is still alive by
 * constructor, so a leak shows as live instances of the emulator's classes
 * after every VM was destroyed.
 *
 * Writing a snapshot takes seconds and its own memory: only for diagnosis,
 * after the RSS measurements.
 */

/** The emulator's per-VM classes: none may be alive once every VM is destroyed. */
export const VM_CLASSES = [
  "Vm",
  "IommufdContext",
  "GuestMemory",
  "VtdDriver",
  "MockDriver",
  "VtdCaches",
  "TranslationCache",
  "VtdWalker",
  "SecondStageTable",
  "VtdPagingDomain",
  "VtdNestedDomain",
  "MockPagingDomain",
  "MockNestedDomain",
  "DmaBatch",
  "VmImport",
  "VmSnapshotImport",
  "SnapshotDecoder",
];

export interface HeapSummary {
  file: string;
  bytes: number;
  /** Live instances of VM_CLASSES (only those with any). */
  vmObjects: Record<string, number>;
  /** The largest constructors by self size: [name, count, self MiB]. */
  top: [string, number, number][];
  totalSelfMiB: number;
  /** The server's RSS right after the snapshot (set by the caller). */
  rssAfterMiB?: number;
}

interface Snapshot {
  snapshot: { meta: { node_fields: string[]; node_types: [string[]] } };
  nodes: number[];
  strings: string[];
}

/** Sends SIGUSR2 to `pid`, waits for the .heapsnapshot in `dir`, summarises it and deletes it. */
export async function heapSnapshot(pid: number, dir: string, timeoutMs = 120_000): Promise<HeapSummary> {
  const before = new Set(readdirSync(dir));
  process.kill(pid, "SIGUSR2");
  const deadline = Date.now() + timeoutMs;
  let file: string | undefined;
  let lastSize = -1;
  // The file appears at once and grows while V8 writes it; done when its size stops changing.
  while (Date.now() < deadline) {
    await sleep(500);
    file ??= readdirSync(dir).find((f) => f.endsWith(".heapsnapshot") && !before.has(f));
    if (file === undefined) continue;
    const size = statSync(join(dir, file)).size;
    if (size > 0 && size === lastSize) {
      try {
        return summarise(join(dir, file), size);
      } catch {
        // still being written (a pause between chunks): keep waiting
      }
    }
    lastSize = size;
  }
  throw new Error(`no complete heap snapshot from ${pid} in ${dir} within ${timeoutMs / 1000} s`);
}

function summarise(path: string, bytes: number): HeapSummary {
  const snap = JSON.parse(readFileSync(path, "utf8")) as Snapshot;
  rmSync(path, { force: true });
  const fields = snap.snapshot.meta.node_fields;
  const width = fields.length;
  const typeAt = fields.indexOf("type");
  const nameAt = fields.indexOf("name");
  const sizeAt = fields.indexOf("self_size");
  const types = snap.snapshot.meta.node_types[0];
  const objectType = types.indexOf("object");
  const byName = new Map<string, { count: number; size: number }>();
  let total = 0;
  for (let i = 0; i < snap.nodes.length; i += width) {
    const size = snap.nodes[i + sizeAt];
    total += size;
    if (snap.nodes[i + typeAt] !== objectType) continue;
    const name = snap.strings[snap.nodes[i + nameAt]];
    const e = byName.get(name) ?? { count: 0, size: 0 };
    e.count++;
    e.size += size;
    byName.set(name, e);
  }
  const vmObjects: Record<string, number> = {};
  for (const name of VM_CLASSES) {
    const n = byName.get(name)?.count ?? 0;
    if (n > 0) vmObjects[name] = n;
  }
  const top = [...byName]
    .sort((a, b) => b[1].size - a[1].size)
    .slice(0, 12)
    .map(([name, e]): [string, number, number] => [name, e.count, Math.round((e.size / 2 ** 20) * 100) / 100]);
  return { file: path, bytes, vmObjects, top, totalSelfMiB: Math.round((total / 2 ** 20) * 10) / 10 };
}
