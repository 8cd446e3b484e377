import { create } from "@bufbuild/protobuf";
import type * as grpc from "@grpc/grpc-js";
import { ExportVmResponseSchema, type ExportVmRequest, type ImportVmRequest, type ImportVmResponse, ImportVmResponseSchema } from "../../gen/iommufd/v1/snapshot_pb.js";
import { IommuError } from "../core/errno.js";
import { capturePages, captureVm, VmImport } from "../core/vm-state.js";
import type { Vm, VmRegistry } from "../core/vm.js";
import type { CallContext, callIdentity } from "./identity.js";
import { encodeVmSnapshot, SnapshotDecoder } from "./snapshot-codec.js";
import { vmToPb } from "./service.js";

/** ExportVm and ImportVm: the snapshot byte stream of snapshot-codec.ts over gRPC streams. */

type Caller = (call: Parameters<typeof callIdentity>[0]) => CallContext;
type ToStatus = (error: unknown) => Partial<grpc.StatusObject>;

/** The VM's snapshot byte stream, as one consistent instant. */
export function exportVmSnapshot(vm: Vm): Buffer[] {
  return encodeVmSnapshot(captureVm(vm), capturePages(vm));
}

/** Resolves when the stream can take more, or will never need to (cancelled, closed). */
function writable(call: grpc.ServerWritableStream<unknown, unknown>): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      call.off("drain", done).off("cancelled", done).off("close", done);
      resolve();
    };
    call.on("drain", done).on("cancelled", done).on("close", done);
  });
}

/** ExportVm: the VM is captured at once; the chunks then flow at the pace the client reads. */
export function exportVmHandler(vms: VmRegistry, caller: Caller, toStatus: ToStatus, maxMessageBytes: number): grpc.handleServerStreamingCall<ExportVmRequest | IommuError, unknown> {
  // Room for the ExportVmResponse framing of the chunk (tag + length varint).
  const piece = Math.max(1, maxMessageBytes - 16);
  return async (call) => {
    try {
      const req = call.request;
      if (req instanceof IommuError) throw req;
      const chunks = exportVmSnapshot(vms.get(caller(call).tenant, req.vmId));
      for (const chunk of chunks) {
        for (let i = 0; i < chunk.length; i += piece) {
          if (call.cancelled) return;
          if (!call.write(create(ExportVmResponseSchema, { chunk: chunk.subarray(i, i + piece) }))) await writable(call);
        }
      }
      call.end();
    } catch (e) {
      call.emit("error", toStatus(e));
    }
  };
}

/**
 * Reads a snapshot byte stream into a new VM of `tenant`; nothing is visible
 * until the whole stream checked out, and a failure leaves nothing behind.
 */
export class VmSnapshotImport {
  private readonly target: VmImport;
  private readonly decoder: SnapshotDecoder;

  /** tenant undefined = the snapshot's own; vmId "" = the snapshot's own. */
  constructor(vms: VmRegistry, tenant: string | undefined, vmId: string) {
    this.target = new VmImport(vms, tenant, vmId);
    this.decoder = new SnapshotDecoder(this.target);
  }

  push(chunk: Uint8Array): void {
    this.guard(() => this.decoder.push(chunk));
    // Refused content: give the VM and its quota back now; the answer waits
    // for the end of the stream (see SnapshotDecoder.refused).
    if (this.decoder.refused) this.target.abort();
  }

  /** The stream is complete: check it and publish the VM. */
  end(): Vm {
    return this.guard(() => {
      this.decoder.end();
      return this.target.commit();
    });
  }

  abort(): void {
    this.target.abort();
  }

  private guard<T>(fn: () => T): T {
    try {
      return fn();
    } catch (e) {
      this.target.abort();
      throw e;
    }
  }
}

/** ImportVm: the VM goes to the calling tenant, under the first message's vm_id if it names one. */
export function importVmHandler(vms: VmRegistry, caller: Caller, toStatus: ToStatus): grpc.handleClientStreamingCall<ImportVmRequest | IommuError, ImportVmResponse> {
  return (call, callback) => {
    let importing: VmSnapshotImport | undefined;
    let finished = false;
    const finish = (error: unknown, vm?: Vm) => {
      if (finished) return;
      finished = true;
      call.removeAllListeners("data");
      if (error !== undefined) {
        importing?.abort();
        callback(toStatus(error));
      } else {
        callback(null, create(ImportVmResponseSchema, { vm: vmToPb(vm!) }));
      }
    };
    call.on("data", (req: ImportVmRequest | IommuError) => {
      try {
        if (req instanceof IommuError) throw req;
        importing ??= new VmSnapshotImport(vms, caller(call).tenant, req.vmId);
        importing.push(req.chunk);
      } catch (e) {
        finish(e);
      }
    });
    call.on("end", () => {
      try {
        if (importing === undefined) throw new IommuError("EINVAL", "snapshot is corrupt: the stream is empty");
        finish(undefined, importing.end());
      } catch (e) {
        finish(e);
      }
    });
    // A client that goes away mid-stream leaves nothing behind (and there
    // is nobody left to answer).
    // grpc-js also reports "cancelled" once a finished call's stream closes:
    // by then the VM is published (or already discarded) and is not touched.
    const gone = () => {
      if (finished) return;
      finished = true;
      importing?.abort();
    };
    call.on("cancelled", gone);
    call.on("error", gone);
  };
}
