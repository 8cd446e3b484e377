/**
 * A fast-check command model of one VM (issue "Nothing lost", item 1).
 *
 * Random sequences of every iommufd operation of one VM — AllocIoas,
 * MapIoas (fixed/automatic IOVA, every prot, bad arguments), UnmapIoas,
 * CopyIoas, AllowIovas, Get/SetOption, BindDevice/UnbindDevice, HwInfo,
 * AllocHwpt (paging with NEST_PARENT/DIRTY_TRACKING/PASID, nested with
 * driver data, on wrong targets), AttachDevice (IOAS = auto domain, HWPT,
 * PASID, replace), DetachDevice, Invalidate, DumpIotlb, Destroy (any id),
 * Translate, WriteGuestMemory, S1Map (VT-d: the guest writes a stage-1
 * mapping into its tables) and ExportVm+ImportVm (the VM goes through a
 * snapshot and carries on as the imported one) — with ids drawn from the live objects plus
 * wrong ones, run in-process against the real core (server/core, as
 * server/rpc/service.ts calls it) and against an independent reference
 * model written from iommufd-semantics.md (reference-model.ts).
 *
 * After every command (commands.ts checkAfter()): the same outcome (value or
 * errno, and entries_handled for Invalidate), the core's object graph
 * consistent (users = references, no dangling reference, auto domains
 * attached, no leaked id), the whole state equal to the model's, the next id
 * equal to the model's lowest free id, and every device's DMA equal to the
 * model's for a few IOVAs around the mapped areas.
 *
 * Three VMs: MOCK (the selftest driver, the main target), INTEL_VTD with its
 * IOTLB (stage-2 DMA must never see a stale translation after an unmap), and
 * INTEL_VTD without IOTLB, where DMA through a nested HWPT is also compared,
 * against test/reference/reference-walker.ts walking the guest's stage-1
 * tables (written by the S1Map command) over the model's stage 2.
 *
 * The default seed is random: every CI run explores new sequences. On failure
 * fast-check prints the seed and path and the shrunk sequence, each command
 * as the call it resolved to and its outcome; replay it with
 *   MODEL_SEED=<seed> MODEL_PATH=<path> npx vitest run test/model/vm.model.test.ts -t <MOCK|with IOTLB|without IOTLB>
 * MODEL_RUNS / MODEL_MAX_COMMANDS change the budget; MODEL_STATS=1 prints the
 * outcomes per command path (the coverage).
 */
import fc from "fast-check";
import { describe, it } from "vitest";
import { CoreVm } from "./core-adapter.js";
import { coverage, prologueArb, specArb, Step } from "./commands.js";
import { mockProfile, type Profile, ReferenceModel, vtdProfile } from "./reference-model.js";

const RUNS = Number(process.env.MODEL_RUNS ?? 2000);
const MAX_COMMANDS = Number(process.env.MODEL_MAX_COMMANDS ?? 40);
const SEED = process.env.MODEL_SEED === undefined ? undefined : Number(process.env.MODEL_SEED);
const PATH = process.env.MODEL_PATH;

const GUEST = 0x80_0000n; // 8 MiB of guest RAM
const MAPPED_QUOTA = 0x100_0000n; // 16 MiB per IOAS (EDQUOT beyond)
const INVALIDATE_QUOTA = 6;

function runModel(profile: Profile, numRuns: number): void {
  coverage.clear();
  let sequences = 0;
  let steps = 0;
  const commands = fc.commands([specArb(profile).map((spec) => new Step(spec))], { maxCommands: MAX_COMMANDS, size: "max" });
  fc.assert(
    fc.property(prologueArb(profile), commands, (prologue, cmds) => {
      sequences++;
      const all = [...prologue.map((spec) => new Step(spec)), ...cmds];
      steps += all.length;
      fc.modelRun(() => ({ model: new ReferenceModel(profile), real: new CoreVm(profile) }), all);
    }),
    { numRuns, seed: SEED, path: PATH, endOnFailure: PATH !== undefined },
  );
  if (process.env.MODEL_STATS === "1") {
    const rows = [...coverage].sort(([a], [b]) => a.localeCompare(b)).map(([k, n]) => `  ${k.padEnd(28)} ${n}`);
    console.log(`${profile.driver} (iotlb_entries ${profile.iotlbEntries}): ${sequences} sequences, ${steps} commands\n${rows.join("\n")}`);
  }
}

describe("VM command model (reference model vs core, in-process)", () => {
  it(`MOCK: ${RUNS} random command sequences agree with the reference model`, { timeout: 120_000 }, () => {
    runModel(mockProfile(GUEST, MAPPED_QUOTA, INVALIDATE_QUOTA), RUNS);
  });

  it(`INTEL_VTD with IOTLB (paging, stage-2 DMA and its invalidation, nested alloc/attach/invalidate): ${Math.ceil(RUNS / 4)} sequences`, { timeout: 120_000 }, () => {
    runModel(vtdProfile(GUEST, MAPPED_QUOTA, INVALIDATE_QUOTA), Math.ceil(RUNS / 4));
  });

  it(`INTEL_VTD without IOTLB (also nested DMA, against the reference walker): ${Math.ceil(RUNS / 4)} sequences`, { timeout: 120_000 }, () => {
    runModel(vtdProfile(GUEST, MAPPED_QUOTA, INVALIDATE_QUOTA, 0), Math.ceil(RUNS / 4));
  });
});
