/**
 * VM lifecycle and the service-level cases of api.md: CreateVm argument
 * checks (before existence), malformed and unknown vm_ids on every RPC,
 * DestroyVm, ListVms paging and object_count, GetStats, guest memory.
 */
import { describe, expect, it } from "vitest";
import type { RpcName, VmMethods } from "../../client/client.js";
import { IommufdService } from "../../gen/iommufd/v1/service_pb.js";
import { IommuOption } from "../../gen/iommufd/v1/ioas_pb.js";
import {
  bind,
  expectFail,
  expectInvalidateFail,
  IommuModel,
  ioas,
  map,
  MIB,
  nestingSetup,
  nextId,
  objectCount,
  pagingHwpt,
  PAGE,
  serverEnv,
  U64_MAX,
} from "./helpers.js";

const env = serverEnv("life");

/** A request for each RPC that is well formed apart from its vm_id, so that only the VM lookup can fail. */
const WELL_FORMED: { [K in RpcName]?: Parameters<VmMethods[K]>[0] } = {
  setOption: { option: IommuOption.HUGE_PAGES, objectId: 1, value: 1n },
  getOption: { option: IommuOption.HUGE_PAGES, objectId: 1 },
  invalidate: { hwptId: 1, requests: { case: "selftest", value: { entries: [] } } },
  mapIoas: { ioasId: 1, userVa: 0n, length: PAGE, readable: true, writeable: true },
  copyIoas: { dstIoasId: 1, srcIoasId: 1, srcIova: 0n, length: PAGE, readable: true },
  unmapIoas: { ioasId: 1, iova: 0n, length: PAGE },
  bindDevice: { name: "0000:00:01.0" },
  readGuestMemory: { gpa: 0n, length: 1 },
  writeGuestMemory: { gpa: 0n, data: new Uint8Array([1]) },
  translate: { devId: 1, iovas: [0n] },
};

/** Every RPC that takes a VM (all but CreateVm, which creates it, and ListVms, whose vm_id is unused). */
/** RPCs that look a VM up (CreateVm and ImportVm make one; ListVms takes none). */
const VM_RPCS = IommufdService.methods.map((m) => m.localName as RpcName).filter((name) => !["createVm", "importVm", "listVms"].includes(name));

/** A failure of `rpc`: Invalidate's always carry entries_handled, 0 before any entry was looked at (api.md). */
const expectRpcFail = (rpc: RpcName, call: Promise<unknown>, errno: Parameters<typeof expectFail>[1]) => (rpc === "invalidate" ? expectInvalidateFail(call, errno, 0) : expectFail(call, errno));

const call = (vmId: string, rpc: RpcName) => {
  const methods = env.client.vm(vmId) as unknown as Record<string, (req: object) => Promise<unknown>>;
  return methods[rpc]({ ...(WELL_FORMED[rpc] ?? {}) });
};

const MALFORMED_IDS = ["", "A", "vm_1", "-vm", "vm-", "vm.1", "v m", "a".repeat(64), "ü"];

describe("CreateVm (api.md VM lifecycle)", () => {
  it("echoes the VM with every option default filled in and object_count 0", async () => {
    const { vm } = await env.client.createVm({ vmId: "defaults", model: IommuModel.MOCK, guestMemoryBytes: 1n << 20n });
    expect(vm).toMatchObject({
      vmId: "defaults",
      model: IommuModel.MOCK,
      guestMemoryBytes: 1n << 20n,
      options: { iotlbEntries: 4096, pagingStructureCaches: false, fiveLevel: false },
      objectCount: 0,
    });
  });

  it("echoes explicit options, including iotlb_entries 0 (IOTLB disabled)", async () => {
    const { vm } = await env.client.createVm({
      vmId: "explicit",
      model: IommuModel.INTEL_VTD,
      guestMemoryBytes: PAGE,
      options: { iotlbEntries: 0, pagingStructureCaches: true, fiveLevel: true },
    });
    expect(vm?.options).toMatchObject({ iotlbEntries: 0, pagingStructureCaches: true, fiveLevel: true });
    expect(vm?.model).toBe(IommuModel.INTEL_VTD);
  });

  it.each([["a"], ["0"], ["a-b"], ["0-9z"], ["a".repeat(63)]])("accepts the DNS label %j as vm_id", async (vmId) => {
    const { vm } = await env.client.createVm({ vmId, model: IommuModel.MOCK, guestMemoryBytes: PAGE });
    expect(vm?.vmId).toBe(vmId);
    await env.client.destroyVm({ vmId });
  });

  it.each(MALFORMED_IDS.map((id) => [id]))("refuses the malformed vm_id %j with EINVAL and creates nothing", async (vmId) => {
    await expectFail(env.client.createVm({ vmId, model: IommuModel.MOCK, guestMemoryBytes: PAGE }), "EINVAL");
    const { vms } = await env.client.listVms({ pageSize: 1000 });
    expect(vms.map((v) => v.vmId)).not.toContain(vmId);
  });

  it.each([[0n], [1n], [4095n], [4097n], [6000n], [PAGE + 1n]])("refuses guest_memory_bytes %s (must be > 0 and a multiple of 4096) with EINVAL", async (bytes) => {
    await expectFail(env.client.createVm({ vmId: "badmem", model: IommuModel.MOCK, guestMemoryBytes: bytes }), "EINVAL");
    await expectFail(env.client.vm("badmem").getStats(), "ENOENT");
  });

  it("refuses an unset model (IOMMU_MODEL_UNSPECIFIED) with EINVAL", async () => {
    await expectFail(env.client.createVm({ vmId: "nomodel", model: IommuModel.UNSPECIFIED, guestMemoryBytes: PAGE }), "EINVAL");
    await expectFail(env.client.vm("nomodel").getStats(), "ENOENT");
  });

  it("refuses an unknown model value with EINVAL", async () => {
    await expectFail(env.client.createVm({ vmId: "badmodel", model: 42 as IommuModel, guestMemoryBytes: PAGE }), "EINVAL");
  });

  it("refuses an existing vm_id with ALREADY_EXISTS/EEXIST and leaves the existing VM as it was", async () => {
    await env.client.createVm({ vmId: "dup", model: IommuModel.MOCK, guestMemoryBytes: 2n * PAGE, options: { iotlbEntries: 7 } });
    const vm = { id: "dup", v: env.client.vm("dup"), client: env.client, model: IommuModel.MOCK };
    await ioas(vm);
    await expectFail(env.client.createVm({ vmId: "dup", model: IommuModel.INTEL_VTD, guestMemoryBytes: PAGE }), "EEXIST");
    const { vms } = await env.client.listVms({ pageSize: 1000 });
    expect(vms.find((x) => x.vmId === "dup")).toMatchObject({ model: IommuModel.MOCK, guestMemoryBytes: 2n * PAGE, options: { iotlbEntries: 7 }, objectCount: 1 });
  });

  it("checks its arguments before existence: an unset model or bad guest_memory_bytes on an existing id is EINVAL (api.md Fine points)", async () => {
    await env.client.createVm({ vmId: "exists", model: IommuModel.MOCK, guestMemoryBytes: PAGE });
    await expectFail(env.client.createVm({ vmId: "exists", model: IommuModel.UNSPECIFIED, guestMemoryBytes: PAGE }), "EINVAL");
    await expectFail(env.client.createVm({ vmId: "exists", model: IommuModel.MOCK, guestMemoryBytes: 0n }), "EINVAL");
    await expectFail(env.client.createVm({ vmId: "exists", model: IommuModel.MOCK, guestMemoryBytes: 100n }), "EINVAL");
  });
});

describe("vm_id on every RPC (api.md Errors, service-level cases)", () => {
  it.each(VM_RPCS.map((rpc) => [rpc]))("%s: a malformed vm_id is INVALID_ARGUMENT/EINVAL, checked before the VM lookup", async (rpc) => {
    for (const vmId of ["", "Bad_Id", "x".repeat(64)]) await expectRpcFail(rpc, call(vmId, rpc), "EINVAL");
  });

  it.each(VM_RPCS.map((rpc) => [rpc]))("%s: an unknown vm_id is NOT_FOUND/ENOENT", async (rpc) => {
    await expectRpcFail(rpc, call("no-such-vm", rpc), "ENOENT");
  });
});

describe("DestroyVm (api.md VM lifecycle)", () => {
  it("destroys every object of the VM like closing the fd; the id can be created again from scratch", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await nestingSetup(vm);
    await vm.v.attachDevice({ devId: dev, ptId: ioasId });
    await map(vm, ioasId);
    await vm.client.destroyVm({ vmId: vm.id });
    await expectFail(vm.v.getStats(), "ENOENT");
    await expectFail(vm.v.allocIoas(), "ENOENT");
    const { vms } = await env.client.listVms({ pageSize: 1000 });
    expect(vms.map((x) => x.vmId)).not.toContain(vm.id);

    const { vm: again } = await env.client.createVm({ vmId: vm.id, model: IommuModel.INTEL_VTD, guestMemoryBytes: PAGE });
    expect(again).toMatchObject({ model: IommuModel.INTEL_VTD, objectCount: 0 });
    expect(await ioas({ ...vm, model: IommuModel.INTEL_VTD })).toBe(1);
  });

  it("an unknown vm_id is ENOENT, a malformed one EINVAL", async () => {
    await expectFail(env.client.destroyVm({ vmId: "never-was" }), "ENOENT");
    await expectFail(env.client.destroyVm({ vmId: "Never_Was" }), "EINVAL");
  });

  it("VMs are independent iommufd contexts: ids are per VM, destroying one leaves the other", async () => {
    const a = await env.mockVm();
    const b = await env.mockVm();
    expect(await ioas(a)).toBe(1);
    expect(await ioas(b)).toBe(1);
    expect(await bind(a, { name: "0000:00:05.0" })).toBe(2);
    // Device names are unique per VM only.
    expect(await bind(b, { name: "0000:00:05.0" })).toBe(2);
    await env.client.destroyVm({ vmId: a.id });
    expect(await objectCount(b)).toBe(2);
    expect(await ioas(b)).toBe(3);
  });
});

describe("object_count (api.md VM lifecycle)", () => {
  it("counts every live object of the VM, automatic domains included", async () => {
    const vm = await env.mockVm();
    expect(await objectCount(vm)).toBe(0);
    const ioasId = await ioas(vm);
    const dev = await bind(vm);
    expect(await objectCount(vm)).toBe(2);
    const auto = (await vm.v.attachDevice({ devId: dev, ptId: ioasId })).hwptId;
    expect(auto).toBe(3);
    expect(await objectCount(vm)).toBe(3);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    expect(await objectCount(vm)).toBe(4);
    await vm.v.detachDevice({ devId: dev });
    expect(await objectCount(vm)).toBe(3);
    await vm.v.destroy({ id: parent });
    await vm.v.unbindDevice({ devId: dev });
    expect(await objectCount(vm)).toBe(1);
  });
});

describe("GetStats (api.md VM lifecycle)", () => {
  it("starts at zero for a new VM", async () => {
    const vm = await env.vtdVm();
    const { stats } = await vm.v.getStats();
    expect(stats).toMatchObject({ translations: 0n, iotlbHits: 0n, iotlbMisses: 0n, memoryReferences: 0n, faults: 0n, invalidationEntries: 0n, iotlbEntries: 0n });
  });
});

describe("guest memory (api.md Guest memory and DMA)", () => {
  it("reads back what was written; untouched RAM reads as zero", async () => {
    const vm = await env.mockVm({}, 1n * MIB);
    await vm.v.writeGuestMemory({ gpa: 0x1ffen, data: new Uint8Array([1, 2, 3, 4]) });
    const { data } = await vm.v.readGuestMemory({ gpa: 0x1ffcn, length: 8 });
    expect([...data]).toEqual([0, 0, 1, 2, 3, 4, 0, 0]);
    expect([...(await vm.v.readGuestMemory({ gpa: 0x80000n, length: 16 })).data]).toEqual(new Array(16).fill(0));
  });

  it("the last byte of guest RAM is addressable", async () => {
    const vm = await env.mockVm({}, 1n * MIB);
    await vm.v.writeGuestMemory({ gpa: MIB - 1n, data: new Uint8Array([0xab]) });
    expect([...(await vm.v.readGuestMemory({ gpa: MIB - 1n, length: 1 })).data]).toEqual([0xab]);
  });

  it("a write outside guest RAM is OUT_OF_RANGE/EFAULT and writes nothing, not even the part inside", async () => {
    const vm = await env.mockVm({}, 1n * MIB);
    await expectFail(vm.v.writeGuestMemory({ gpa: MIB - 2n, data: new Uint8Array([1, 2, 3]) }), "EFAULT");
    await expectFail(vm.v.writeGuestMemory({ gpa: MIB, data: new Uint8Array([1]) }), "EFAULT");
    await expectFail(vm.v.writeGuestMemory({ gpa: U64_MAX, data: new Uint8Array([1]) }), "EFAULT");
    expect([...(await vm.v.readGuestMemory({ gpa: MIB - 2n, length: 2 })).data]).toEqual([0, 0]);
  });

  it("a read outside guest RAM is OUT_OF_RANGE/EFAULT", async () => {
    const vm = await env.mockVm({}, 1n * MIB);
    await expectFail(vm.v.readGuestMemory({ gpa: MIB - 1n, length: 2 }), "EFAULT");
    await expectFail(vm.v.readGuestMemory({ gpa: MIB, length: 1 }), "EFAULT");
    await expectFail(vm.v.readGuestMemory({ gpa: U64_MAX, length: 1 }), "EFAULT");
  });
});

describe("ListVms (api.md VM lifecycle)", () => {
  const list = serverEnv("list");

  /** Every vm_id, following next_page_token with pages of `pageSize`. */
  async function listAll(pageSize: number): Promise<{ ids: string[]; pages: number[] }> {
    const ids: string[] = [];
    const pages: number[] = [];
    let pageToken = "";
    do {
      const page = await list.client.listVms({ pageSize, pageToken });
      ids.push(...page.vms.map((v) => v.vmId));
      pages.push(page.vms.length);
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
    return { ids, pages };
  }

  it("lists nothing, with an empty next_page_token, when there is no VM; vm_id is unused", async () => {
    const page = await list.client.listVms({});
    expect(page.vms).toEqual([]);
    expect(page.nextPageToken).toBe("");
  });

  it("pages by 100 by default and caps page_size at 1000; following next_page_token lists every VM exactly once", async () => {
    const created: string[] = [];
    for (let batch = 0; batch < 11; batch++) {
      const ids = Array.from({ length: 100 }, (_, i) => `p${String(batch * 100 + i).padStart(4, "0")}`);
      await Promise.all(ids.map((vmId) => list.client.createVm({ vmId, model: IommuModel.MOCK, guestMemoryBytes: PAGE })));
      created.push(...ids);
    }
    created.push((await list.client.createVm({ vmId: "zlast", model: IommuModel.MOCK, guestMemoryBytes: PAGE })).vm!.vmId);
    expect(created).toHaveLength(1101);

    const first = await list.client.listVms({});
    expect(first.vms).toHaveLength(100);
    expect(first.nextPageToken).not.toBe("");

    const capped = await list.client.listVms({ pageSize: 5000 });
    expect(capped.vms).toHaveLength(1000);
    expect(capped.nextPageToken).not.toBe("");
    const rest = await list.client.listVms({ pageSize: 5000, pageToken: capped.nextPageToken });
    expect(rest.vms).toHaveLength(101);
    expect(rest.nextPageToken).toBe("");

    for (const pageSize of [0, 7, 1000, 4096]) {
      const { ids, pages } = await listAll(pageSize);
      expect(new Set(ids).size).toBe(ids.length);
      expect([...ids].sort()).toEqual([...created].sort());
      const expectedPage = pageSize === 0 ? 100 : Math.min(pageSize, 1000);
      expect(pages.slice(0, -1).every((n) => n === expectedPage)).toBe(true);
    }
  });

  it("refuses a page_token it did not issue with EINVAL", async () => {
    await expectFail(list.client.listVms({ pageToken: "not a token!" }), "EINVAL");
  });
});

describe("ids (iommufd-semantics.md §1.1)", () => {
  it("the next id probe itself leaves the id space as it was", async () => {
    const vm = await env.mockVm();
    expect(await nextId(vm)).toBe(1);
    expect(await nextId(vm)).toBe(1);
    expect(await objectCount(vm)).toBe(0);
  });
});
