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
import { translate } from "../core/translate/translate.js";
import * as grpc from "@grpc/grpc-js";
import { MalformedRequest, type MethodCodec } from "./bridge.js";
import { decodeTranslateRequest, encodeTranslateResponse, type TranslateWireRequest } from "./translate-codec.js";
import type { IommuModel, Vm, VmRegistry } from "../core/vm.js";
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

function vmToPb(vm: Vm): MessageInitShape<typeof VmSchema> {
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

export function iommufdServiceImplementation(vms: VmRegistry): UnaryImplementation<Service> {
  const ctxOf = (vmId: string) => vms.get(vmId).ctx;
  return {
    createVm(req) {
      const o = req.options;
      const vm = vms.create({
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
    destroyVm(req) {
      vms.destroy(req.vmId);
      return {};
    },
    listVms(req) {
      const page = vms.list(req.pageSize, req.pageToken);
      return { vms: page.vms.map(vmToPb), nextPageToken: page.nextPageToken };
    },
    getStats(req) {
      const ctx = ctxOf(req.vmId);
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

    bindDevice(req) {
      return { devId: deviceBind(ctxOf(req.vmId), req) };
    },
    unbindDevice(req) {
      deviceUnbind(ctxOf(req.vmId), req.devId);
      return {};
    },
    attachDevice(req) {
      const ctx = ctxOf(req.vmId);
      return { hwptId: deviceAttach(ctx, { devId: req.devId, ptId: req.ptId, pasid: req.pasid ?? IOMMU_NO_PASID, replace: req.replace }) };
    },
    detachDevice(req) {
      deviceDetach(ctxOf(req.vmId), req.devId, req.pasid ?? IOMMU_NO_PASID);
      return {};
    },
    hwInfo(req) {
      return hwInfoToPb(deviceHwInfo(ctxOf(req.vmId), req.devId, req.dataType));
    },

    allocIoas(req) {
      return { ioasId: ioasAlloc(ctxOf(req.vmId)) };
    },
    mapIoas(req) {
      return { iova: ioasMap(ctxOf(req.vmId), req) };
    },
    unmapIoas(req) {
      return { length: ioasUnmap(ctxOf(req.vmId), req) };
    },
    copyIoas(req) {
      return { dstIova: ioasCopy(ctxOf(req.vmId), req) };
    },
    getIovaRanges(req) {
      return ioasIovaRanges(ctxOf(req.vmId), req.ioasId);
    },
    allowIovas(req) {
      ioasAllowIovas(ctxOf(req.vmId), req.ioasId, req.ranges);
      return {};
    },
    setOption(req) {
      const ctx = ctxOf(req.vmId);
      return { value: iommuOption(ctx, { option: OPTION_FROM_PB[req.option], op: "set", objectId: req.objectId, value: req.value }) };
    },
    getOption(req) {
      const ctx = ctxOf(req.vmId);
      return { value: iommuOption(ctx, { option: OPTION_FROM_PB[req.option], op: "get", objectId: req.objectId, value: 0n }) };
    },

    allocHwpt(req) {
      const ctx = ctxOf(req.vmId);
      const flags = { nestParent: req.nestParent, dirtyTracking: req.dirtyTracking, pasid: req.pasid };
      return { hwptId: hwptAlloc(ctx, { devId: req.devId, ptId: req.ptId, flags, data: hwptDataOf(req.data) }) };
    },
    invalidate(req) {
      return { entriesHandled: hwptInvalidate(ctxOf(req.vmId), req.hwptId, invalidationsOf(req.requests)) };
    },
    destroy(req) {
      iommufdDestroy(ctxOf(req.vmId), req.id);
      return {};
    },
    dumpIotlb(req) {
      const dump = hwptDumpIotlb(ctxOf(req.vmId), req.hwptId);
      return { selftestIotlb: [...dump.selftestIotlb], entries: dump.entries.map((e) => ({ ...e })) };
    },

    writeGuestMemory(req) {
      guestMemoryWrite(ctxOf(req.vmId).memory, req.gpa, req.data);
      return {};
    },
    readGuestMemory(req) {
      return { data: guestMemoryRead(ctxOf(req.vmId).memory, req.gpa, req.length) };
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

/** The Translate handler: the device's DMA, decoded and encoded without BigInt. */
export function translateHandler(
  vms: VmRegistry,
  toStatus: (error: unknown) => Partial<grpc.StatusObject>,
): grpc.handleUnaryCall<TranslateWireRequest | MalformedRequest, TranslateResult> {
  return (call, callback) => {
    try {
      const req = call.request;
      if (req instanceof MalformedRequest) throw req;
      const batch = new DmaBatch(req.iovaLo, req.iovaHi, req.write);
      translate(vms.get(req.vmId).ctx, req.devId, req.pasid, batch);
      callback(null, { batch, req });
    } catch (e) {
      callback(toStatus(e));
    }
  };
}
