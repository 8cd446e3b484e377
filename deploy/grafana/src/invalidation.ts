import type { Dashboard } from "@grafana/grafana-foundation-sdk/dashboard";
import { build, dashboard, JOB, quantile, query, queryVariable, timeseries } from "./common.js";

/**
 * IOTLB invalidation: how long an Invalidate request takes inside the
 * emulator by data type, how many entries guests send, and how many cached
 * translations those entries drop (performance.md: a page invalidation costs
 * what it drops, not what is cached).
 */
export function invalidation(): Dashboard {
  const vm = `${JOB}, vm=~"$vm"`;
  const seconds = `iommufd_invalidation_duration_seconds_bucket{${JOB}}`;
  return build(
    dashboard("iommufd-invalidation", "iommufd / Invalidation", "Invalidate latency by data type, invalidation entries per second, cached translations dropped per second.")
      .withVariable(queryVariable("vm", "VM", `label_values(iommufd_invalidation_entries_total{${JOB}}, vm)`))
      .withPanel(
        timeseries(
          "Invalidate latency p50 / p99 by data type",
          "Wall time of one Invalidate request inside the emulator (not the RPC), from iommufd_invalidation_duration_seconds.",
          "s",
          query(quantile(0.5, seconds, "data_type"), "p50 {{data_type}}", "A"),
          query(quantile(0.99, seconds, "data_type"), "p99 {{data_type}}", "B"),
        ).span(24),
      )
      .withPanel(
        timeseries(
          "Invalidation entries per VM",
          "Entries handled per second (IOMMU_HWPT_INVALIDATE entry_num out).",
          "ops",
          query(`sum by (vm) (rate(iommufd_invalidation_entries_total{${vm}}[$__rate_interval]))`, "{{vm}}"),
        ),
      )
      .withPanel(
        timeseries(
          "IOTLB entries dropped per VM",
          "Cached translations removed by invalidation per second.",
          "ops",
          query(`sum by (vm) (rate(iommufd_iotlb_entries_invalidated_total{${vm}}[$__rate_interval]))`, "{{vm}}"),
        ),
      )
      .withPanel(
        timeseries(
          "Invalidate RPCs by code",
          "Invalidate calls per second by gRPC status; a failed request reports how many entries it handled before the bad one.",
          "reqps",
          query(`sum by (grpc_code) (rate(grpc_server_handled_total{${JOB}, grpc_method="Invalidate"}[$__rate_interval]))`, "{{grpc_code}}"),
        ).span(24),
      ),
  );
}
