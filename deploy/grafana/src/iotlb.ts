import { PanelBuilder as BarGaugeBuilder } from "@grafana/grafana-foundation-sdk/bargauge";
import * as common from "@grafana/grafana-foundation-sdk/common";
import type { Dashboard } from "@grafana/grafana-foundation-sdk/dashboard";
import { PanelBuilder as HeatmapBuilder, RowsHeatmapOptionsBuilder } from "@grafana/grafana-foundation-sdk/heatmap";
import { PromQueryFormat } from "@grafana/grafana-foundation-sdk/prometheus";
import { build, DATASOURCE, dashboard, instantQuery, JOB, quantile, query, queryVariable, timeseries } from "./common.js";

/**
 * Translation caching: IOTLB hit ratio and occupancy per VM, the VMs that miss
 * most, how deep the walks behind the misses go, and faults by reason.
 *
 * Histograms carry no `vm` label (metrics.md: cardinality), so the walk
 * panels filter by model, the per-VM panels by vm.
 */
export function iotlb(): Dashboard {
  const vm = `${JOB}, model=~"$model", vm=~"$vm"`;
  const model = `${JOB}, model=~"$model"`;
  const hits = `sum by (vm) (rate(iommufd_iotlb_hits_total{${vm}}[$__rate_interval]))`;
  const misses = `sum by (vm) (rate(iommufd_iotlb_misses_total{${vm}}[$__rate_interval]))`;
  return build(
    dashboard("iommufd-iotlb", "iommufd / IOTLB", "IOTLB hit ratio and occupancy per VM, top VMs by misses, page-walk depth, references per translation, faults by reason.")
      .withVariable(queryVariable("model", "Model", `label_values(iommufd_vms{${JOB}}, model)`))
      .withVariable(queryVariable("vm", "VM", `label_values(iommufd_iotlb_hits_total{${model}}, vm)`))
      .withPanel(
        timeseries(
          "IOTLB hit ratio per VM",
          "Hits / (hits + misses). The MOCK model has no IOTLB: all its lookups are misses.",
          "percentunit",
          query(`${hits} / (${hits} + ${misses})`, "{{vm}}"),
        ).max(1),
      )
      .withPanel(
        new BarGaugeBuilder()
          .title("Top 10 VMs by IOTLB misses")
          .description("Misses per second averaged over the dashboard's time range.")
          .datasource(DATASOURCE)
          .unit("ops")
          .span(12)
          .height(8)
          .orientation(common.VizOrientation.Horizontal)
          .displayMode(common.BarGaugeDisplayMode.Gradient)
          .reduceOptions(new common.ReduceDataOptionsBuilder().values(false).calcs(["lastNotNull"]))
          .withTarget(instantQuery(`topk(10, sum by (vm) (rate(iommufd_iotlb_misses_total{${model}}[$__range])))`, "{{vm}}")),
      )
      .withPanel(timeseries("IOTLB occupancy per VM", "Cached translations now.", "short", query(`sum by (vm) (iommufd_iotlb_entries{${vm}})`, "{{vm}}")))
      .withPanel(
        timeseries(
          "Translations per VM",
          "Translate accesses per second by result (ok or fault).",
          "ops",
          query(`sum by (vm, result) (rate(iommufd_translations_total{${vm}}[$__rate_interval]))`, "{{vm}} {{result}}"),
        ),
      )
      .withPanel(
        new HeatmapBuilder()
          .title("Page-walk depth")
          .description("Page-table entries read per walk: 24 for a cold 4-level-over-4-level nested walk, fewer with large pages or paging-structure caches.")
          .datasource(DATASOURCE)
          .span(12)
          .height(8)
          .withTarget(query(`sum by (le) (rate(iommufd_page_walk_depth_bucket{${model}}[$__rate_interval]))`, "{{le}}").format(PromQueryFormat.Heatmap))
          // Buckets come from Prometheus, one row per `le`: no re-bucketing.
          .calculate(false)
          .rowsFrame(new RowsHeatmapOptionsBuilder().layout(common.HeatmapCellLayout.Le)),
      )
      .withPanel(
        timeseries(
          "Page-walk depth p50 / p99",
          "Entries read per walk by walk mode.",
          "short",
          query(quantile(0.5, `iommufd_page_walk_depth_bucket{${model}}`, "model, mode"), "p50 {{model}} {{mode}}", "A"),
          query(quantile(0.99, `iommufd_page_walk_depth_bucket{${model}}`, "model, mode"), "p99 {{model}} {{mode}}", "B"),
        ),
      )
      .withPanel(
        timeseries(
          "Page-table references per translation",
          "Entries read per Translate access (hits read none) and per IOTLB miss (performance.md: <= 5 with paging-structure caches on a sequential stream).",
          "short",
          query(
            `sum by (model) (rate(iommufd_page_walk_depth_sum{${model}}[$__rate_interval])) / sum by (model) (rate(iommufd_translations_total{${model}}[$__rate_interval]))`,
            "per translation {{model}}",
            "A",
          ),
          query(
            `sum by (model) (rate(iommufd_page_walk_depth_sum{${model}}[$__rate_interval])) / sum by (model) (rate(iommufd_iotlb_misses_total{${model}}[$__rate_interval]))`,
            "per miss {{model}}",
            "B",
          ),
        ),
      )
      .withPanel(
        timeseries(
          "Translation faults by reason",
          "Faults per second by VT-d fault reason (the MOCK model reports the same codes).",
          "ops",
          query(`sum by (model, reason) (rate(iommufd_translation_faults_total{${model}}[$__rate_interval]))`, "{{model}} {{reason}}"),
        ),
      ),
  );
}
