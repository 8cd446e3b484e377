/**
 * Shrunk counterexamples of the VM command model (vm.model.test.ts), kept as
 * plain tests against the core in-process (core-adapter.ts drives the same
 * functions server/rpc/service.ts calls).
 *
 * "fixed since": bugs the model found that have been fixed; "model
 * corrections": the model was
 * wrong and the core right. Both pin the behaviour the spec asks for.
 */
import { describe, expect, it } from "vitest";
import { CoreVm, coreOutcome } from "./core-adapter.js";
import { mockProfile, vtdProfile } from "./reference-model.js";

const GUEST = 0x80_0000n;
const MOCK_START = 0x100_0000n;

describe("core bugs found by the model, fixed since: a snapshot keeps the stage-2 page sizes", () => {
  /**
   * ExportVm/ImportVm must lose nothing, stage-2 layout included: api.md
   * (SetOption) "HUGE_PAGES ... affects how areas mapped afterwards are placed
   * in stage-2", so an area mapped while HUGE_PAGES was 0 keeps 4 KiB pages
   * when it is set back to 1 (iopt_enable_large_pages() remaps nothing), and
   * DumpIotlb shows 4 KiB entries for it. captureVm() records only the IOAS's
   * HUGE_PAGES of the moment and restoreObjects() (server/core/vm-state.ts)
   * maps every area with it: after the round trip the same area is mapped
   * with a 2 MiB page (DumpIotlb page_size 0x200000, one stage-2 level fewer
   * per walk, so Translate's memory_references differ too).
   */
  it("ImportVm keeps the stage-2 page sizes areas were mapped with (vm-state.ts captureVm()/restoreObjects())", () => {
    const vm = new CoreVm(vtdProfile(GUEST, 0x100_0000n, 6));
    const ioas = vm.allocIoas();
    const dev = vm.bind("0000:00:01.0", false, true);
    const hwpt = vm.hwptAlloc(dev, ioas, { nestParent: false, dirtyTracking: false, pasid: false }, undefined);
    expect(vm.option("huge_pages", ioas, 0n)).toBe(0n);
    vm.map({ ioasId: ioas, userVa: 0x20_0000n, length: 0x20_0000n, iova: 0x20_0000n, readable: true, writeable: true });
    expect(vm.option("huge_pages", ioas, 1n)).toBe(1n);
    vm.attach(dev, hwpt, undefined, false);
    const pageSize = () => {
      expect(vm.translate(dev, undefined, [0x20_0000n], false).results).toEqual([{ addr: 0x20_0000n }]);
      return vm.iotlbEntries(hwpt).map((e) => e.pageSize);
    };
    expect(pageSize()).toEqual([0x1000n]); // control: mapped while HUGE_PAGES was 0
    vm.snapshotRestore();
    expect(pageSize()).toEqual([0x1000n]);
  });
});

describe("core bugs found by the model, fixed since (kept as regressions)", () => {
  /**
   * ExportVm/ImportVm must lose nothing: the imported VM behaves as the
   * exported one would have. The mock's PASID-1024 fault injection
   * (mock_domain_set_dev_pasid_nop(), iommufd-semantics.md §4 replace step 4:
   * "mock PASID 1024 fault injection → ENOMEM", failing every second driver
   * call for that PASID, a blocking-domain detach clearing it) is state of the
   * VM's driver: after a replace failed with ENOMEM the flag is clear, so
   * the next replace succeeds (and arms it again). restoreObjects()
   * (server/core/vm-state.ts) rebuilds the attachment by replaying
   * driver.attachDev(), which armed the flag, and captureVm() did not record
   * it: after the round trip the replace failed with ENOMEM instead. Found by
   * the model (ExportVm+ImportVm command); fixed in 825b05a ("MOCK PASID
   * fake-error state kept in snapshots").
   */
  it("ImportVm keeps the mock's PASID-1024 fake-error state (vm-state.ts restoreObjects())", () => {
    const vm = new CoreVm(mockProfile(GUEST, 0x100_0000n, 6));
    const ioas = vm.allocIoas();
    const dev = vm.bind("0000:00:01.0", true, true);
    const a = vm.hwptAlloc(dev, ioas, { nestParent: false, dirtyTracking: false, pasid: true }, undefined);
    const b = vm.hwptAlloc(dev, ioas, { nestParent: false, dirtyTracking: false, pasid: true }, undefined);
    expect(vm.attach(dev, a, 1024, false)).toBe(a); // arms the fake error
    expect(coreOutcome(() => vm.attach(dev, b, 1024, true))).toMatchObject({ ok: false, errno: "ENOMEM" }); // consumes it
    vm.snapshotRestore();
    // Without the round trip this replace succeeds (the control below).
    expect(coreOutcome(() => vm.attach(dev, b, 1024, true))).toEqual({ ok: true, value: b });
  });

  it("(control) the same sequence without a snapshot", () => {
    const vm = new CoreVm(mockProfile(GUEST, 0x100_0000n, 6));
    const ioas = vm.allocIoas();
    const dev = vm.bind("0000:00:01.0", true, true);
    const a = vm.hwptAlloc(dev, ioas, { nestParent: false, dirtyTracking: false, pasid: true }, undefined);
    const b = vm.hwptAlloc(dev, ioas, { nestParent: false, dirtyTracking: false, pasid: true }, undefined);
    vm.attach(dev, a, 1024, false);
    expect(coreOutcome(() => vm.attach(dev, b, 1024, true))).toMatchObject({ ok: false, errno: "ENOMEM" });
    expect(coreOutcome(() => vm.attach(dev, b, 1024, true))).toEqual({ ok: true, value: b });
  });

});

describe("model corrections (the core was right)", () => {
  /**
   * vtd.md §2 (second-stage translation): "An SS input address must be below
   * 2^min(MGAW, AGAW), else fault 0x83". The first model answered
   * S2_NOT_PRESENT (0x79) for every unmapped IOVA.
   */
  it("VT-d: a stage-2 access at or above 2^48 faults 0x83 (BEYOND_MAX_ADDRESS), below it 0x79", () => {
    const vm = new CoreVm(vtdProfile(GUEST, 0x100_0000n, 6));
    const dev = vm.bind("0000:00:01.0", false, true);
    const ioas = vm.allocIoas();
    expect(vm.attach(dev, ioas, undefined, false)).toBe(3);
    const { results } = vm.translate(dev, undefined, [(1n << 64n) - 1n, 1n << 48n, (1n << 48n) - 1n, 0n], false);
    expect(results).toEqual([{ fault: 0x83 }, { fault: 0x83 }, { fault: 0x79 }, { fault: 0x79 }]);
  });

  /**
   * The same on the MOCK model, whose domains cover only the mock aperture:
   * an unmapped IOVA anywhere is S2_NOT_PRESENT (the MOCK reports its faults
   * with VT-d codes, translate/fault.ts).
   */
  it("MOCK: unmapped IOVAs inside and outside the aperture fault 0x79; mapped ones translate", () => {
    const vm = new CoreVm(mockProfile(GUEST, 0x100_0000n, 6));
    const dev = vm.bind("0000:00:01.0", false, true);
    const ioas = vm.allocIoas();
    vm.map({ ioasId: ioas, userVa: 0x3000n, length: 0x1000n, iova: MOCK_START, readable: true, writeable: false });
    vm.attach(dev, ioas, undefined, false);
    expect(vm.translate(dev, undefined, [MOCK_START + 0x10n, (1n << 64n) - 1n, 0n], false).results).toEqual([{ addr: 0x3010n }, { fault: 0x79 }, { fault: 0x79 }]);
    expect(vm.translate(dev, undefined, [MOCK_START], true).results).toEqual([{ fault: 0x85 }]);
  });
});
