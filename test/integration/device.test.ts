/**
 * Devices: bind/unbind, attach/replace/detach with automatic domains, PASID
 * attachments (iommufd-semantics.md §1.2, §4, §8.1; api.md Devices).
 */
import { describe, expect, it } from "vitest";
import {
  bind,
  expectFail,
  expectFailUnchanged,
  ioas,
  nestedHwpt,
  nextId,
  objectCount,
  pagingHwpt,
  serverEnv,
  type Vm,
} from "./helpers.js";

const env = serverEnv("dev");

async function setup(vm: Vm, bindOptions: { pasid?: boolean; dirty?: boolean } = {}) {
  return { dev: await bind(vm, bindOptions), ioasId: await ioas(vm) };
}

describe("BindDevice / UnbindDevice (api.md Devices)", () => {
  it("a duplicate name in the same VM is ALREADY_EXISTS/EEXIST and allocates nothing; other VMs may reuse the name", async () => {
    const vm = await env.mockVm();
    const other = await env.mockVm();
    expect(await bind(vm, { name: "0000:00:04.0" })).toBe(1);
    await expectFailUnchanged(vm, {}, () => vm.v.bindDevice({ name: "0000:00:04.0" }), "EEXIST");
    expect(await bind(other, { name: "0000:00:04.0" })).toBe(1);
  });

  it("UnbindDevice of an unknown id, or of a non-device, is NOT_FOUND/ENOENT", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await setup(vm);
    await expectFail(vm.v.unbindDevice({ devId: 77 }), "ENOENT");
    await expectFail(vm.v.unbindDevice({ devId: ioasId }), "ENOENT");
    await vm.v.unbindDevice({ devId: dev });
    await expectFail(vm.v.unbindDevice({ devId: dev }), "ENOENT");
  });

  it("UnbindDevice detaches everywhere, frees unused automatic domains and the device id; the name can be bound again", async () => {
    const vm = await env.mockVm();
    const ioasId = await ioas(vm);
    // One device on an automatic domain.
    const autoDev = await bind(vm, { name: "0000:00:08.0" });
    const auto = (await vm.v.attachDevice({ devId: autoDev, ptId: ioasId })).hwptId;
    // One device with its RID and a PASID on manual PASID-compatible HWPTs.
    const dev = await bind(vm, { name: "0000:00:09.0", pasid: true });
    const ridHwpt = await pagingHwpt(vm, dev, ioasId, { pasid: true });
    const pasidHwpt = await pagingHwpt(vm, dev, ioasId, { pasid: true });
    await vm.v.attachDevice({ devId: dev, ptId: ridHwpt });
    await vm.v.attachDevice({ devId: dev, ptId: pasidHwpt, pasid: 5 });
    expect(await objectCount(vm)).toBe(6);

    await vm.v.unbindDevice({ devId: autoDev });
    // The auto domain went with its last device.
    await expectFail(vm.v.destroy({ id: auto }), "ENOENT");
    expect(await objectCount(vm)).toBe(4);

    await vm.v.unbindDevice({ devId: dev });
    // The manual HWPTs stay but are no longer attached anywhere.
    expect(await objectCount(vm)).toBe(3);
    await vm.v.destroy({ id: ridHwpt });
    await vm.v.destroy({ id: pasidHwpt });
    expect(await nextId(vm)).toBe(autoDev);
    expect(await bind(vm, { name: "0000:00:09.0" })).toBe(autoDev);
    expect(await bind(vm, { name: "0000:00:08.0" })).toBe(auto);
  });
});

describe("AttachDevice / DetachDevice (iommufd-semantics.md §4)", () => {
  it("attaching to an IOAS creates an automatic domain and answers its id; a second device reuses it", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await setup(vm);
    const dev2 = await bind(vm);
    const auto = (await vm.v.attachDevice({ devId: dev, ptId: ioasId })).hwptId;
    expect(auto).toBe(4);
    expect((await vm.v.attachDevice({ devId: dev2, ptId: ioasId })).hwptId).toBe(auto);
    expect(await objectCount(vm)).toBe(4);
  });

  it("an automatic domain outlives its first device and is destroyed with the last one", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await setup(vm);
    const dev2 = await bind(vm);
    const auto = (await vm.v.attachDevice({ devId: dev, ptId: ioasId })).hwptId;
    await vm.v.attachDevice({ devId: dev2, ptId: ioasId });
    await vm.v.detachDevice({ devId: dev });
    await expectFail(vm.v.destroy({ id: auto }), "EBUSY");
    await vm.v.detachDevice({ devId: dev2 });
    await expectFail(vm.v.destroy({ id: auto }), "ENOENT");
    expect(await objectCount(vm)).toBe(3);
  });

  it("automatic selection never picks a manually allocated HWPT", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await setup(vm);
    const manual = await pagingHwpt(vm, dev, ioasId);
    const auto = (await vm.v.attachDevice({ devId: dev, ptId: ioasId })).hwptId;
    expect(auto).not.toBe(manual);
    expect(auto).toBe(manual + 1);
  });

  it("attaching a manual HWPT answers its own id", async () => {
    const vm = await env.vtdVm();
    const { dev, ioasId } = await setup(vm);
    const hwpt = await pagingHwpt(vm, dev, ioasId);
    expect((await vm.v.attachDevice({ devId: dev, ptId: hwpt })).hwptId).toBe(hwpt);
  });

  it("attach (replace = false) of an attached device is FAILED_PRECONDITION/EBUSY and changes nothing, whatever the target", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await setup(vm);
    const auto = (await vm.v.attachDevice({ devId: dev, ptId: ioasId })).hwptId;
    const other = await ioas(vm);
    const manual = await pagingHwpt(vm, dev, ioasId);
    const watch = { ioas: [ioasId, other] };
    await expectFailUnchanged(vm, watch, () => vm.v.attachDevice({ devId: dev, ptId: ioasId }), "EBUSY");
    await expectFailUnchanged(vm, watch, () => vm.v.attachDevice({ devId: dev, ptId: other }), "EBUSY");
    await expectFailUnchanged(vm, watch, () => vm.v.attachDevice({ devId: dev, ptId: manual }), "EBUSY");
    await expectFail(vm.v.destroy({ id: auto }), "EBUSY");
  });

  it("replace of a device that is not attached is EINVAL and creates nothing", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await setup(vm);
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.attachDevice({ devId: dev, ptId: ioasId, replace: true }), "EINVAL");
    const hwpt = await pagingHwpt(vm, dev, ioasId);
    await expectFail(vm.v.attachDevice({ devId: dev, ptId: hwpt, replace: true }), "EINVAL");
  });

  it("an unknown device is ENOENT; a missing pt_id is ENOENT; a pt_id that is a device is EINVAL", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await setup(vm);
    await expectFail(vm.v.attachDevice({ devId: 99, ptId: ioasId }), "ENOENT");
    await expectFail(vm.v.attachDevice({ devId: ioasId, ptId: ioasId }), "ENOENT");
    await expectFail(vm.v.attachDevice({ devId: dev, ptId: 99 }), "ENOENT");
    await expectFail(vm.v.attachDevice({ devId: dev, ptId: 0 }), "ENOENT");
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.attachDevice({ devId: dev, ptId: dev }), "EINVAL");
  });

  it("replace with the HWPT already attached succeeds and changes nothing", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await setup(vm);
    const auto = (await vm.v.attachDevice({ devId: dev, ptId: ioasId })).hwptId;
    const count = await objectCount(vm);
    expect((await vm.v.attachDevice({ devId: dev, ptId: auto, replace: true })).hwptId).toBe(auto);
    expect((await vm.v.attachDevice({ devId: dev, ptId: ioasId, replace: true })).hwptId).toBe(auto);
    expect(await objectCount(vm)).toBe(count);
  });

  it("replace moves the device; an automatic domain left without devices is destroyed", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await setup(vm);
    const auto = (await vm.v.attachDevice({ devId: dev, ptId: ioasId })).hwptId;
    const manual = await pagingHwpt(vm, dev, ioasId);
    expect((await vm.v.attachDevice({ devId: dev, ptId: manual, replace: true })).hwptId).toBe(manual);
    await expectFail(vm.v.destroy({ id: auto }), "ENOENT");
    await expectFail(vm.v.destroy({ id: manual }), "EBUSY");
  });

  it("replace onto another IOAS allocates the new automatic domain before releasing the old one, so it never reuses the old id (§1.1, §10.6)", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await setup(vm);
    const other = await ioas(vm);
    const oldAuto = (await vm.v.attachDevice({ devId: dev, ptId: ioasId })).hwptId;
    const newAuto = (await vm.v.attachDevice({ devId: dev, ptId: other, replace: true })).hwptId;
    expect(newAuto).not.toBe(oldAuto);
    expect(newAuto).toBe(oldAuto + 1);
    await expectFail(vm.v.destroy({ id: oldAuto }), "ENOENT");
    expect(await nextId(vm)).toBe(oldAuto);
    await vm.v.destroy({ id: ioasId });
  });

  it("attaching directly to a nested HWPT is allowed; the nested HWPT is then busy", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await setup(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    const nested = await nestedHwpt(vm, dev, parent);
    expect((await vm.v.attachDevice({ devId: dev, ptId: nested })).hwptId).toBe(nested);
    await expectFail(vm.v.destroy({ id: nested }), "EBUSY");
  });

  it("DetachDevice of a device that is not attached succeeds (no-op); of an unknown device is ENOENT", async () => {
    const vm = await env.mockVm({});
    const { dev } = await setup(vm, { pasid: true });
    await vm.v.detachDevice({ devId: dev });
    await vm.v.detachDevice({ devId: dev, pasid: 3 });
    await expectFail(vm.v.detachDevice({ devId: 99 }), "ENOENT");
  });

  it("a device without dirty tracking cannot attach to a dirty-tracking HWPT: EINVAL, nothing changes (§8.3)", async () => {
    const vm = await env.mockVm();
    const dirtyDev = await bind(vm, { dirty: true });
    const { dev: cleanDev, ioasId } = await setup(vm, { dirty: false });
    const dirtyHwpt = await pagingHwpt(vm, dirtyDev, ioasId, { dirtyTracking: true });
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.attachDevice({ devId: cleanDev, ptId: dirtyHwpt }), "EINVAL");
    // It is still detached: attaching elsewhere works.
    await vm.v.attachDevice({ devId: cleanDev, ptId: ioasId });
  });
});

describe("PASID attachments (iommufd-semantics.md §4, §8.1)", () => {
  for (const model of ["mock", "vtd"] as const) {
    const newVm = () => (model === "mock" ? env.mockVm() : env.vtdVm());

    it(`${model}: a PASID attach needs a HWPT allocated with the PASID flag (EINVAL otherwise)`, async () => {
      const vm = await newVm();
      const { dev, ioasId } = await setup(vm, { pasid: true });
      const plain = await pagingHwpt(vm, dev, ioasId);
      const pasidHwpt = await pagingHwpt(vm, dev, ioasId, { pasid: true });
      await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.attachDevice({ devId: dev, ptId: plain, pasid: 1 }), "EINVAL");
      expect((await vm.v.attachDevice({ devId: dev, ptId: pasidHwpt, pasid: 1 })).hwptId).toBe(pasidHwpt);
      await expectFail(vm.v.destroy({ id: pasidHwpt }), "EBUSY");
    });

    it(`${model}: a PASID attach to an IOAS fails with EINVAL (automatic domains are allocated without the PASID flag) and leaves no domain behind`, async () => {
      const vm = await newVm();
      const { dev, ioasId } = await setup(vm, { pasid: true });
      await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.attachDevice({ devId: dev, ptId: ioasId, pasid: 2 }), "EINVAL");
    });

    it(`${model}: a device that is not PASID-capable refuses every PASID attach with EINVAL`, async () => {
      const vm = await newVm();
      const { dev, ioasId } = await setup(vm, { pasid: false });
      const pasidHwpt = await pagingHwpt(vm, dev, ioasId, { pasid: true });
      await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.attachDevice({ devId: dev, ptId: pasidHwpt, pasid: 1 }), "EINVAL");
    });

    it(`${model}: PASIDs up to 2^20 - 1 attach, 2^20 is refused (20-bit PASID width)`, async () => {
      const vm = await newVm();
      const { dev, ioasId } = await setup(vm, { pasid: true });
      const pasidHwpt = await pagingHwpt(vm, dev, ioasId, { pasid: true });
      await vm.v.attachDevice({ devId: dev, ptId: pasidHwpt, pasid: 2 ** 20 - 1 });
      await expectFail(vm.v.attachDevice({ devId: dev, ptId: pasidHwpt, pasid: 2 ** 20 }), "EINVAL");
    });

    it(`${model}: a PASID already attached is EBUSY; each PASID is separate from the RID and from other PASIDs`, async () => {
      const vm = await newVm();
      const { dev, ioasId } = await setup(vm, { pasid: true });
      const a = await pagingHwpt(vm, dev, ioasId, { pasid: true });
      const b = await pagingHwpt(vm, dev, ioasId, { pasid: true });
      await vm.v.attachDevice({ devId: dev, ptId: a, pasid: 7 });
      await expectFail(vm.v.attachDevice({ devId: dev, ptId: b, pasid: 7 }), "EBUSY");
      await vm.v.attachDevice({ devId: dev, ptId: b, pasid: 8 });
      await vm.v.attachDevice({ devId: dev, ptId: b });
      expect((await vm.v.attachDevice({ devId: dev, ptId: b, pasid: 7, replace: true })).hwptId).toBe(b);
      await vm.v.destroy({ id: a });
      await vm.v.detachDevice({ devId: dev, pasid: 7 });
      await vm.v.detachDevice({ devId: dev, pasid: 8 });
      await expectFail(vm.v.destroy({ id: b }), "EBUSY");
      await vm.v.detachDevice({ devId: dev });
      await vm.v.destroy({ id: b });
    });

    it(`${model}: with the RID on a non-PASID-compatible HWPT, a PASID attach is EINVAL`, async () => {
      const vm = await newVm();
      const { dev, ioasId } = await setup(vm, { pasid: true });
      const plain = await pagingHwpt(vm, dev, ioasId);
      const pasidHwpt = await pagingHwpt(vm, dev, ioasId, { pasid: true });
      await vm.v.attachDevice({ devId: dev, ptId: plain });
      await expectFail(vm.v.attachDevice({ devId: dev, ptId: pasidHwpt, pasid: 3 }), "EINVAL");
      // With the RID on a PASID-compatible HWPT it works.
      await vm.v.attachDevice({ devId: dev, ptId: pasidHwpt, replace: true });
      await vm.v.attachDevice({ devId: dev, ptId: pasidHwpt, pasid: 3 });
    });

    it(`${model}: with a PASID attached, the RID cannot attach (or be replaced) to a non-PASID-compatible HWPT: EINVAL`, async () => {
      const vm = await newVm();
      const { dev, ioasId } = await setup(vm, { pasid: true });
      const plain = await pagingHwpt(vm, dev, ioasId);
      const pasidHwpt = await pagingHwpt(vm, dev, ioasId, { pasid: true });
      await vm.v.attachDevice({ devId: dev, ptId: pasidHwpt, pasid: 4 });
      await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.attachDevice({ devId: dev, ptId: plain }), "EINVAL");
      await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.attachDevice({ devId: dev, ptId: ioasId }), "EINVAL");
      await vm.v.attachDevice({ devId: dev, ptId: pasidHwpt });
      await expectFail(vm.v.attachDevice({ devId: dev, ptId: plain, replace: true }), "EINVAL");
    });
  }

  it("mock: a failing PASID replace (the PASID 1024 fault injection) is RESOURCE_EXHAUSTED/ENOMEM and keeps the old attachment (§4 replace)", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await setup(vm, { pasid: true });
    const a = await pagingHwpt(vm, dev, ioasId, { pasid: true });
    const b = await pagingHwpt(vm, dev, ioasId, { pasid: true });
    await vm.v.attachDevice({ devId: dev, ptId: a, pasid: 1024 });
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.attachDevice({ devId: dev, ptId: b, pasid: 1024, replace: true }), "ENOMEM");
    // Still on a: a is busy, b is free.
    await expectFail(vm.v.destroy({ id: a }), "EBUSY");
    await vm.v.destroy({ id: b });
  });
});
