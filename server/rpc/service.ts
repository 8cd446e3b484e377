import { create, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { type AllocHwptRequest, InvalidateResponseSchema } from "../../gen/iommufd/v1/hwpt_pb.js";
import { HwInfoResponseSchema } from "../../gen/iommufd/v1/device_pb.js";
import { IommuOption as IommuOptionPb } from "../../gen/iommufd/v1/ioas_pb.js";
import { IommufdService } from "../../gen/iommufd/v1/service_pb.js";
import { IommuModel as IommuModelPb, type VmSchema } from "../../gen/iommufd/v1/vm_pb.js";
import { deviceAttach, deviceBind, deviceDetach, deviceHwInfo, deviceUnbind, type HwInfo, IOMMU_NO_PASID } from "../core/device.js";
import { guestMemoryRead, guestMemoryWrite } from "../core/guest-memory.js";
import { hwptAlloc, hwptDumpIotlb, HwptInvalidation, iommufdDestroy } from "../core/hwpt.js";
import { ioasAlloc, ioasAllowIovas, ioasCopy, ioasIovaRanges, ioasMap, ioasUnmap, iommuOption, type IommuOption } from "../core/ioas.js";
import { decodeHwInfo, type HwptData } from "../core/uapi.js";
import { DmaBatch } from "../core/translate/dma-batch.js";
import { checkTranslateBatch, translate } from "../core/translate/translate.js";
import * as grpc from "@grpc/grpc-js";
import { checkResponseSize, EncodedResponse, type MethodCodec } from "./bridge.js";
import type { Device } from "../core/objects.js";
import type { Turns } from "./turns.js";
import { IommuError } from "../core/errno.js";
import { decodeTranslateRequest, encodeTranslateResponse, type TranslateWireRequest } from "./translate-codec.js";
import { decodeInvalidateRequest, type InvalidateWireRequest } from "./invalidate-codec.js";
import { ALL_TENANTS, type IommuModel, type Vm, type VmRegistry } from "../core/vm.js";
import type { CallContext } from "./identity.js";
import type { UnaryImplementation } from "./bridge.js";

/**
 * One handler per RPC: decode the request into a core command, call the core,
 * encode the result. No semantics live here: every check and errno is the
 * core's.
 */

type Service = typeof IommufdService extends { method: infer M } ? M : never;

const MODEL_FROM_PB: Partial<Record<IommuModelPb, IommuModel>> = {
  [IommuModelPb.MOCK]: "mock",
  [IommuModelPb.INTEL_VTD]: "intel_vtd",
  [IommuModelPb.ARM_SMMUV3]: "arm_smmuv3",
};

const MODEL_TO_PB: Record<IommuModel, IommuModelPb> = {
  mock: IommuModelPb.MOCK,
  intel_vtd: IommuModelPb.INTEL_VTD,
  arm_smmuv3: IommuModelPb.ARM_SMMUV3,
};

const OPTION_FROM_PB: Partial<Record<IommuOptionPb, IommuOption>> = {
  [IommuOptionPb.HUGE_PAGES]: "huge_pages",
};

export function vmToPb(vm: Vm): MessageInitShape<typeof VmSchema> {
  return {
    vmId: vm.id,
    model: MODEL_TO_PB[vm.model],
    guestMemoryBytes: BigInt(vm.guestMemoryBytes),
    options: {
      iotlbEntries: vm.options.iotlbEntries,
      pagingStructureCaches: vm.options.pagingStructureCaches,
      fiveLevel: vm.options.fiveLevel,
    },
    objectCount: vm.ctx.objectCount,
    tenant: vm.tenant,
  };
}

function hwptDataOf(data: AllocHwptRequest["data"]): HwptData | undefined {
  switch (data.case) {
    case undefined:
      return undefined;
    case "vtdS1":
      return { kind: "vtd_s1", ...data.value };
    case "armSmmuv3":
      return { kind: "arm_smmuv3", ste0: data.value.ste0, ste1: data.value.ste1 };
    case "selftest":
      return { kind: "selftest", iotlb: data.value.iotlb };
    case "raw":
      return { kind: "raw", dataType: data.value.dataType, data: data.value.data };
  }
}

function hwInfoToPb(info: HwInfo): MessageInitShape<typeof HwInfoResponseSchema> {
  const decoded = decodeHwInfo(info.type, info.data);
  const common = { dataType: info.type, data: info.data, capabilities: info.capabilities, maxPasidLog2: info.maxPasidLog2 };
  switch (decoded.kind) {
    case "vtd":
      return { ...common, info: { case: "vtd", value: { flags: decoded.flags, capReg: decoded.capReg, ecapReg: decoded.ecapReg } } };
    case "selftest":
      return { ...common, info: { case: "selftest", value: { flags: decoded.flags, testReg: decoded.testReg } } };
    case "none":
      return common;
  }
}

const hwInfoCache = new WeakMap<Device, Map<number, EncodedResponse>>();

export function iommufdServiceImplementation(vms: VmRegistry): UnaryImplementation<Service, CallContext> {
  const ctxOf = (caller: CallContext, vmId: string) => vms.get(caller.tenant, vmId).ctx;
  return {
    createVm(req, caller) {
      const o = req.options;
      const vm = vms.create(caller.tenant, {
        vmId: req.vmId,
        model: MODEL_FROM_PB[req.model],
        guestMemoryBytes: req.guestMemoryBytes,
        options: {
          ...(o?.iotlbEntries !== undefined && { iotlbEntries: o.iotlbEntries }),
          ...(o?.pagingStructureCaches !== undefined && { pagingStructureCaches: o.pagingStructureCaches }),
          ...(o?.fiveLevel !== undefined && { fiveLevel: o.fiveLevel }),
        },
      });
      return { vm: vmToPb(vm) };
    },
    destroyVm(req, caller) {
      vms.destroy(caller.tenant, req.vmId);
      return {};
    },
    listVms(req, caller) {
      const page = vms.list(caller.admin ? ALL_TENANTS : caller.tenant, req.pageSize, req.pageToken);
      return { vms: page.vms.map(vmToPb), nextPageToken: page.nextPageToken };
    },
    getStats(req, caller) {
      const ctx = ctxOf(caller, req.vmId);
      const s = ctx.stats;
      return {
        stats: {
          translations: BigInt(s.translations),
          iotlbHits: BigInt(s.iotlbHits),
          iotlbMisses: BigInt(s.iotlbMisses),
          memoryReferences: BigInt(s.memoryReferences),
          faults: BigInt(s.faults),
          invalidationEntries: BigInt(s.invalidationEntries),
          iotlbEntries: BigInt(ctx.driver.iotlbOccupancy),
        },
      };
    },

    bindDevice(req, caller) {
      return { devId: deviceBind(ctxOf(caller, req.vmId), req) };
    },
    unbindDevice(req, caller) {
      deviceUnbind(ctxOf(caller, req.vmId), req.devId);
      return {};
    },
    attachDevice(req, caller) {
      const ctx = ctxOf(caller, req.vmId);
      return { hwptId: deviceAttach(ctx, { devId: req.devId, ptId: req.ptId, pasid: req.pasid ?? IOMMU_NO_PASID, replace: req.replace }) };
    },
    detachDevice(req, caller) {
      deviceDetach(ctxOf(caller, req.vmId), req.devId, req.pasid ?? IOMMU_NO_PASID);
      return {};
    },
    hwInfo(req, caller) {
      // The answer is fixed for a bound device (its capabilities and the
      // VM's registers): encoded once per device and requested type. The
      // lookups run every time, so errors are as uncached.
      const ctx = ctxOf(caller, req.vmId);
      const idev = ctx.getDevice(req.devId);
      let byType = hwInfoCache.get(idev);
      if (byType === undefined) hwInfoCache.set(idev, (byType = new Map()));
      const type = req.dataType ?? -1;
      let encoded = byType.get(type);
      if (encoded === undefined) {
        encoded = new EncodedResponse(Buffer.from(toBinary(HwInfoResponseSchema, create(HwInfoResponseSchema, hwInfoToPb(deviceHwInfo(ctx, req.devId, req.dataType))))));
        byType.set(type, encoded);
      }
      return encoded;
    },

    allocIoas(req, caller) {
      return { ioasId: ioasAlloc(ctxOf(caller, req.vmId)) };
    },
    mapIoas(req, caller) {
      return { iova: ioasMap(ctxOf(caller, req.vmId), req) };
    },
    unmapIoas(req, caller) {
      return { length: ioasUnmap(ctxOf(caller, req.vmId), req) };
    },
    copyIoas(req, caller) {
      return { dstIova: ioasCopy(ctxOf(caller, req.vmId), req) };
    },
    getIovaRanges(req, caller) {
      return ioasIovaRanges(ctxOf(caller, req.vmId), req.ioasId);
    },
    allowIovas(req, caller) {
      ioasAllowIovas(ctxOf(caller, req.vmId), req.ioasId, req.ranges);
      return {};
    },
    setOption(req, caller) {
      const ctx = ctxOf(caller, req.vmId);
      return { value: iommuOption(ctx, { option: OPTION_FROM_PB[req.option], op: "set", objectId: req.objectId, value: req.value }) };
    },
    getOption(req, caller) {
      const ctx = ctxOf(caller, req.vmId);
      return { value: iommuOption(ctx, { option: OPTION_FROM_PB[req.option], op: "get", objectId: req.objectId, value: 0n }) };
    },

    allocHwpt(req, caller) {
      const ctx = ctxOf(caller, req.vmId);
      const flags = { nestParent: req.nestParent, dirtyTracking: req.dirtyTracking, pasid: req.pasid };
      return { hwptId: hwptAlloc(ctx, { devId: req.devId, ptId: req.ptId, flags, data: hwptDataOf(req.data) }) };
    },
    invalidate() {
      // Served by invalidateHandler() with its own wire codec.
      throw new Error("Invalidate is served by invalidateHandler()");
    },
    destroy(req, caller) {
      iommufdDestroy(ctxOf(caller, req.vmId), req.id);
      return {};
    },
    dumpIotlb(req, caller) {
      const dump = hwptDumpIotlb(ctxOf(caller, req.vmId), req.hwptId);
      return { selftestIotlb: [...dump.selftestIotlb], entries: dump.entries.map((e) => ({ ...e })) };
    },

    writeGuestMemory(req, caller) {
      const ctx = ctxOf(caller, req.vmId);
      guestMemoryWrite(ctx.memory, ctx.limits, req.gpa, req.data);
      return {};
    },
    readGuestMemory(req, caller) {
      const ctx = ctxOf(caller, req.vmId);
      return { data: guestMemoryRead(ctx.memory, ctx.limits, req.gpa, req.length) };
    },
    translate() {
      // Served by translateHandler() with its own wire codec.
      throw new Error("Translate is served by translateHandler()");
    },
  };
}

/**
 * Translate's wire codec (translate-codec.ts) for serviceDefinition(): the
 * handler encodes the response itself (to check its size), so it passes through.
 */
export const TRANSLATE_CODEC: MethodCodec = {
  requestDeserialize: decodeTranslateRequest,
  responseSerialize: (value) => value as Buffer,
};

/**
 * Accesses translated per event-loop turn. A batch up to this size runs at
 * once; a larger one (up to the translateBatch quota) runs chunk by chunk in
 * the turns it shares with every other large request (turns.ts), so that
 * other tenants' calls are not stalled behind it.
 */
export const TRANSLATE_CHUNK = 8192;

/** The Translate handler: the device's DMA, decoded and encoded without BigInt, in chunks. */
export function translateHandler(
  vms: VmRegistry,
  caller: (call: grpc.ServerUnaryCall<unknown, unknown>) => CallContext,
  toStatus: (error: unknown) => Partial<grpc.StatusObject>,
  turns: Turns,
  maxResponseBytes: number,
): grpc.handleUnaryCall<TranslateWireRequest | IommuError, Buffer> {
  return async (call, callback) => {
    try {
      const req = call.request;
      if (req instanceof IommuError) throw req;
      const tenant = caller(call).tenant;
      const batch = new DmaBatch(req.iovaLo, req.iovaHi, req.write);
      checkTranslateBatch(vms.get(tenant, req.vmId).ctx, batch);
      const chunked = batch.count > TRANSLATE_CHUNK;
      for (let start = 0; start < batch.count || start === 0; start += TRANSLATE_CHUNK) {
        if (chunked) await turns.next();
        // The VM is looked up again after every turn: it may have gone meanwhile.
        translate(vms.get(tenant, req.vmId).ctx, req.devId, req.pasid, batch, start, Math.min(batch.count, start + TRANSLATE_CHUNK));
      }
      callback(null, checkResponseSize(encodeTranslateResponse(batch, req), maxResponseBytes));
    } catch (e) {
      callback(toStatus(e));
    }
  };
}

/** Invalidate's request codec (invalidate-codec.ts); the handler encodes the response. */
export const INVALIDATE_CODEC: MethodCodec = {
  requestDeserialize: decodeInvalidateRequest,
  responseSerialize: (value) => value as Buffer,
};

/**
 * Invalidation entries handled per event-loop turn: an array up to this
 * size is handled at once, a longer one (up to the invalidateEntries quota)
 * in the turns it shares with every other long request.
 */
export const INVALIDATE_CHUNK = 4096;

/**
 * The Invalidate handler (IOMMU_HWPT_INVALIDATE). Every failure carries
 * entries_handled: 0 before any entry was looked at (unknown VM, malformed
 * request), else how many were handled, also when the VM or the HWPT went
 * away between two chunks.
 */
export function invalidateHandler(
  vms: VmRegistry,
  caller: (call: grpc.ServerUnaryCall<unknown, unknown>) => CallContext,
  toStatus: (error: unknown) => Partial<grpc.StatusObject>,
  turns: Turns,
): grpc.handleUnaryCall<InvalidateWireRequest | IommuError, Buffer> {
  return async (call, callback) => {
    let handled = 0;
    try {
      const req = call.request;
      if (req instanceof IommuError) throw req;
      const tenant = caller(call).tenant;
      const invalidation = new HwptInvalidation(vms.get(tenant, req.vmId).ctx, req.hwptId, req.requests);
      const chunked = invalidation.array.entryNum > INVALIDATE_CHUNK;
      do {
        if (chunked) await turns.next();
        handled = invalidation.handled;
        invalidation.step(vms.get(tenant, req.vmId).ctx, INVALIDATE_CHUNK);
      } while (!invalidation.done);
      callback(null, Buffer.from(toBinary(InvalidateResponseSchema, create(InvalidateResponseSchema, { entriesHandled: invalidation.handled }))));
    } catch (e) {
      callback(toStatus(e instanceof IommuError && e.entriesHandled === undefined ? e.withEntriesHandled(handled) : e));
    }
  };
}
