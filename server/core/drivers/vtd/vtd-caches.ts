import { TranslationCache } from "../../translate/translation-cache.js";
import { MAX_AGAW_PFN_WIDTH, type PsiBlock } from "./psi.js";

/**
 * The caches of one emulated VT-d unit (vtd.md §4.1), tagged the way the
 * hardware tags them:
 * - the IOTLB: final translations (combined stage-1 + stage-2 for nested
 *   domains) per (domain, PASID), at the effective page size;
 * - the first-stage paging-structure cache (optional): for an input prefix,
 *   the host address of the next first-stage table, per (domain, PASID);
 * - the second-stage cache (optional): GPA -> host translations the nested
 *   walks need, per parent domain.
 * Tags are small integers handed out per (domain, PASID) on first use.
 */

/** IOTLB size classes: 4 KiB, 2 MiB, 1 GiB. */
export const IOTLB_SHIFTS = [12, 21, 30] as const;
/** PSC classes: the prefixes a PDE, PDPE, PML4E and PML5E cover. */
export const PSC_SHIFTS = [21, 30, 39, 48] as const;
/** Entries of each paging-structure cache when enabled. */
export const PSC_ENTRIES = 1024;

/** A domain the caches hold entries for: its tag per PASID (0 = no PASID). */
export interface TaggedDomain {
  readonly tags: Map<number, number>;
}

/** A second-stage domain: also tags the second-stage cache, and has nested children. */
export interface TaggedParent extends TaggedDomain {
  ssTag: number;
  readonly children: Set<TaggedDomain>;
}

export class VtdCaches {
  readonly iotlb: TranslationCache;
  readonly fsPsc: TranslationCache | null;
  readonly ssCache: TranslationCache | null;
  /** IOTLB entries dropped by invalidation, ever (for the metrics). */
  iotlbDropped = 0;
  private nextTag = 0;
  private readonly freeTags: number[] = [];

  constructor(iotlbEntries: number, pagingStructureCaches: boolean) {
    this.iotlb = new TranslationCache(iotlbEntries, IOTLB_SHIFTS);
    this.fsPsc = pagingStructureCaches ? new TranslationCache(PSC_ENTRIES, PSC_SHIFTS) : null;
    this.ssCache = pagingStructureCaches ? new TranslationCache(PSC_ENTRIES, IOTLB_SHIFTS) : null;
  }

  allocTag(): number {
    return this.freeTags.pop() ?? this.nextTag++;
  }

  /** The tag of (domain, pasid), allocated on first use. */
  tagOf(domain: TaggedDomain, pasid: number): number {
    let tag = domain.tags.get(pasid);
    if (tag === undefined) {
      tag = this.allocTag();
      domain.tags.set(pasid, tag);
    }
    return tag;
  }

  /**
   * A nested domain's user invalidation (intel_nested_cache_invalidate_user()
   * -> a PASID-based IOTLB invalidation of every PASID the domain serves):
   * drop its IOTLB entries in the range, and with IH = 0 (not leaf-only) its
   * first-stage paging-structure caches as well.
   */
  flushNested(domain: TaggedDomain, block: PsiBlock, leaf: boolean): void {
    for (const tag of domain.tags.values()) {
      this.iotlbDropped += block.mask >= MAX_AGAW_PFN_WIDTH ? this.iotlb.flushTag(tag) : this.iotlb.flushTagRange(tag, block.pfn, 2 ** block.mask);
      if (!leaf) this.fsPsc?.flushTag(tag);
    }
  }

  /**
   * A second-stage change (unmap) of [firstPage, firstPage + pages): drop the
   * domain's own translations of the range, its second-stage cache entries,
   * and everything of its nested children, whose cached results cannot be
   * found by GPA (Linux flushes the children's DIDs entirely, cache.c).
   */
  flushStage2(parent: TaggedParent, firstPage: number, pages: number): void {
    for (const tag of parent.tags.values()) this.iotlbDropped += this.iotlb.flushTagRange(tag, firstPage, pages);
    if (parent.ssTag >= 0) this.ssCache?.flushTagRange(parent.ssTag, firstPage, pages);
    for (const child of parent.children) {
      for (const tag of child.tags.values()) {
        this.iotlbDropped += this.iotlb.flushTag(tag);
        this.fsPsc?.flushTag(tag);
      }
    }
  }

  /** A domain is freed: drop its entries and recycle its tags. */
  release(domain: TaggedDomain & { ssTag?: number }): void {
    for (const tag of domain.tags.values()) {
      this.iotlb.flushTag(tag);
      this.fsPsc?.flushTag(tag);
      this.freeTags.push(tag);
    }
    domain.tags.clear();
    if (domain.ssTag !== undefined && domain.ssTag >= 0) {
      this.ssCache?.flushTag(domain.ssTag);
      this.freeTags.push(domain.ssTag);
      domain.ssTag = -1;
    }
  }
}
