import { createHash } from "node:crypto";
import { mkdir, open, readdir, readFile, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import type { Logger } from "pino";
import type { Vm, VmRegistry } from "./core/vm.js";
import { exportVmSnapshot, VmSnapshotImport } from "./rpc/snapshot.js";
import { checkSnapshot } from "./rpc/snapshot-codec.js";

/**
 * --state-dir: every VM as one snapshot file (the ExportVm byte stream of
 * snapshot.proto), restored at start, written at graceful shutdown and every
 * --snapshot-interval. Each file is replaced atomically (temp file, fsync,
 * rename, fsync of the directory), so a crash leaves each VM as of its last
 * completed snapshot; files are written one after another, so after a crash
 * two VMs may come from consecutive rounds.
 */

const SUFFIX = ".vmsnap";
const TEMP = ".tmp";

/**
 * The file of a VM: tenants are arbitrary identities (URIs), so they are
 * named by a digest; the file's header holds the real one. vm_ids are DNS
 * labels, safe as they are.
 */
function fileName(vm: Vm): string {
  const tenant = vm.tenant === "" ? "default" : createHash("sha256").update(vm.tenant).digest("hex").slice(0, 24);
  return `${tenant}.${vm.id}${SUFFIX}`;
}

async function fsyncPath(path: string, flags: string): Promise<void> {
  const handle = await open(path, flags);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export interface RestoreReport {
  restored: number;
  failed: number;
}

export class StateDir {
  /** Writes and deletions, one at a time, in the order they were asked for. */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly dir: string,
    private readonly vms: VmRegistry,
    private readonly log: Logger,
  ) {
    // A destroyed VM must not come back at the next start.
    vms.onDestroyed((vm) => void this.enqueue(() => this.remove(vm)));
  }

  /**
   * Imports every snapshot file under its own tenant and vm_id. A file that
   * fails (corrupt, partial, over a quota) is reported and left in place;
   * leftover temp files of an interrupted write are removed.
   */
  async restore(): Promise<RestoreReport> {
    await mkdir(this.dir, { recursive: true });
    const report: RestoreReport = { restored: 0, failed: 0 };
    for (const name of (await readdir(this.dir)).sort()) {
      const path = join(this.dir, name);
      if (name.endsWith(TEMP)) {
        this.log.warn({ file: path }, "removing a partial snapshot left by an interrupted write");
        await rm(path, { force: true });
        continue;
      }
      if (!name.endsWith(SUFFIX)) continue;
      const importing = new VmSnapshotImport(this.vms, undefined, "");
      try {
        const bytes = await readFile(path);
        // A damaged file is reported as such, whatever else is wrong with it.
        checkSnapshot(bytes);
        importing.push(bytes);
        const vm = importing.end();
        report.restored++;
        this.log.info({ file: path, vm: vm.name, objects: vm.ctx.objectCount }, "restored VM");
      } catch (err) {
        importing.abort();
        report.failed++;
        this.log.error({ file: path, err }, "cannot restore VM from snapshot file: skipped");
      }
    }
    return report;
  }

  /**
   * Snapshots every VM, each file atomically; a VM that cannot be written
   * (disk full, ...) is reported and the others still are.
   */
  saveAll(): Promise<{ saved: number; failed: number }> {
    return this.enqueue(async () => {
      const result = { saved: 0, failed: 0 };
      for (const vm of [...this.vms.all()]) {
        // A VM destroyed while the round runs is not written back.
        if (!this.vms.isLive(vm)) continue;
        try {
          await this.save(vm);
          result.saved++;
        } catch (err) {
          result.failed++;
          this.log.error({ vm: vm.name, err }, "cannot save VM snapshot");
        }
      }
      return result;
    });
  }

  private enqueue<T>(task: () => Promise<T>): Promise<T> {
    const run = this.queue.then(task);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async save(vm: Vm): Promise<void> {
    const path = join(this.dir, fileName(vm));
    const temp = path + TEMP;
    const chunks = exportVmSnapshot(vm);
    const handle = await open(temp, "w");
    try {
      await handle.writev(chunks);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temp, path);
    await fsyncPath(this.dir, "r");
  }

  /** A namesake created meanwhile gets its own file in a later round (the queue is in order). */
  private async remove(vm: Vm): Promise<void> {
    await rm(join(this.dir, fileName(vm)), { force: true });
  }
}
