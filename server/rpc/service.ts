import type { MessageInitShape } from "@bufbuild/protobuf";
import type { AllocHwptRequest, InvalidateRequest } from "../../gen/iommufd/v1/hwpt_pb.js";
import type { HwInfoResponseSchema } from "../../gen/iommufd/v1/device_pb.js";
import { IommuOption as IommuOptionPb } from "../../gen/iommufd/v1/ioas_pb.js";
import { IommufdService } from "../../gen/iommufd/v1/service_pb.js";
import { IommuModel as IommuModelPb, type VmSchema } from "../../gen/iommufd/v1/vm_pb.js";
import { deviceAttach, deviceBind, deviceDetach, deviceHwInfo, deviceUnbind, type HwInfo, IOMMU_NO_PASID } from "../core/device.js";
import { guestMemoryRead, guestMemoryWrite } from "../core/guest-memory.js";
import { hwptAlloc, hwptDumpIotlb, hwptInvalidate, iommufdDestroy } from "../core/hwpt.js";
import { ioasAlloc, ioasAllowIovas, ioasCopy, ioasIovaRanges, ioasMap, ioasUnmap, iommuOption, type IommuOption } from "../core/ioas.js";
import { decodeHwInfo, type HwptData, type Invalidations } from "../core/uapi.js";
import { DmaBatch } from "../core/translate/dma-batch.js";
import { checkTranslateBatch, translate } from "../core/translate/translate.js";
import * as grpc from "@grpc/grpc-js";
import type { MethodCodec } from "./bridge.js";
import { IommuError } from "../core/errno.js";
import { decodeTranslateRequest, encodeTranslateResponse, type TranslateWireRequest } from "./translate-codec.js";
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

function invalidationsOf(requests: InvalidateRequest["requests"]): Invalidations | undefined {
  switch (requests.case) {
    case undefined:
      return undefined;
    case "vtdS1":
      return { kind: "vtd_s1", entries: requests.value.entries };
    case "armSmmuv3":
      return { kind: "arm_smmuv3", commands: requests.value.commands };
    case "selftest":
      return { kind: "selftest", entries: requests.value.entries };
    case "raw":
      return { kind: "raw", ...requests.value };
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
      return hwInfoToPb(deviceHwInfo(ctxOf(caller, req.vmId), req.devId, req.dataType));
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
    invalidate(req, caller) {
      return { entriesHandled: hwptInvalidate(ctxOf(caller, req.vmId), req.hwptId, invalidationsOf(req.requests)) };
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

/** A translated batch and the request it answers: what the Translate codec encodes. */
interface TranslateResult {
  batch: DmaBatch;
  req: TranslateWireRequest;
}

/** Translate's wire codec (translate-codec.ts) for serviceDefinition(). */
export const TRANSLATE_CODEC: MethodCodec = {
  requestDeserialize: decodeTranslateRequest,
  responseSerialize: (value) => encodeTranslateResponse((value as TranslateResult).batch, (value as TranslateResult).req),
};

/**
 * Accesses translated per event-loop turn: a huge batch (up to the
 * translateBatch quota) yields between chunks so that other tenants' calls
 * are not stalled behind it.
 */
export const TRANSLATE_CHUNK = 8192;

/** The Translate handler: the device's DMA, decoded and encoded without BigInt, in chunks. */
export function translateHandler(
  vms: VmRegistry,
  caller: (call: grpc.ServerUnaryCall<unknown, unknown>) => CallContext,
  toStatus: (error: unknown) => Partial<grpc.StatusObject>,
): grpc.handleUnaryCall<TranslateWireRequest | IommuError, TranslateResult> {
  return async (call, callback) => {
    try {
      const req = call.request;
      if (req instanceof IommuError) throw req;
      const tenant = caller(call).tenant;
      const batch = new DmaBatch(req.iovaLo, req.iovaHi, req.write);
      checkTranslateBatch(vms.get(tenant, req.vmId).ctx, batch);
      for (let start = 0; start < batch.count || start === 0; start += TRANSLATE_CHUNK) {
        if (start > 0) await new Promise((resolve) => setImmediate(resolve));
        // The VM is looked up again after every turn: it may have gone meanwhile.
        translate(vms.get(tenant, req.vmId).ctx, req.devId, req.pasid, batch, start, Math.min(batch.count, start + TRANSLATE_CHUNK));
      }
      callback(null, { batch, req });
    } catch (e) {
      callback(toStatus(e));
    }
  };
}
