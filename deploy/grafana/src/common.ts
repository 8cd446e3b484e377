import type * as cog from "@grafana/grafana-foundation-sdk/cog";
import * as common from "@grafana/grafana-foundation-sdk/common";
import { type Dashboard, DashboardBuilder, DashboardCursorSync, DatasourceVariableBuilder, QueryVariableBuilder, VariableRefresh, VariableSort } from "@grafana/grafana-foundation-sdk/dashboard";
import { DataqueryBuilder } from "@grafana/grafana-foundation-sdk/prometheus";
import { PanelBuilder as TimeseriesBuilder } from "@grafana/grafana-foundation-sdk/timeseries";

/**
 * What the three dashboards share: the Prometheus datasource variable every
 * panel queries through, the `job` variable every selector filters on (the
 * grpc_server_* names are shared with every other gRPC service in the same
 * Prometheus), and a time-series panel helper.
 *
 * Classic dashboard JSON (DashboardBuilder, schema v1), not dashboardv2: it
 * imports into any Grafana >= 10 and through the file provisioner; v2 needs
 * Grafana 12's dashboard API.
 */

/** Every panel and query variable resolves the datasource through the variable. */
export const DATASOURCE: common.DataSourceRef = { type: "prometheus", uid: "${datasource}" };

/** Selector fragment every query carries. */
export const JOB = 'job=~"$job"';

export function dashboard(uid: string, title: string, description: string): DashboardBuilder {
  return new DashboardBuilder(title)
    .uid(uid)
    .description(description)
    .tags(["iommufd"])
    .time({ from: "now-1h", to: "now" })
    .refresh("30s")
    .tooltip(DashboardCursorSync.Crosshair)
    .withVariable(new DatasourceVariableBuilder("datasource").label("Data source").type("prometheus"))
    .withVariable(queryVariable("job", "Job", "label_values(iommufd_vms, job)"));
}

/** A variable filled from label values; multi-select with "All" as a regex. */
export function queryVariable(name: string, label: string, query: string): QueryVariableBuilder {
  return new QueryVariableBuilder(name)
    .label(label)
    .datasource(DATASOURCE)
    .query(query)
    .definition(query)
    .refresh(VariableRefresh.OnTimeRangeChanged)
    .sort(VariableSort.AlphabeticalAsc)
    .multi(true)
    .includeAll(true)
    // The label's values are matched with =~, so "All" is a regex, not a list.
    .allValue(".*");
}

export function query(expr: string, legendFormat: string, refId = "A"): DataqueryBuilder {
  return new DataqueryBuilder().datasource(DATASOURCE).expr(expr).legendFormat(legendFormat).refId(refId);
}

/** One value per series at the end of the time range (bar gauges). */
export function instantQuery(expr: string, legendFormat: string): DataqueryBuilder {
  return query(expr, legendFormat).instant();
}

export function timeseries(title: string, description: string, unit: string, ...targets: cog.Builder<cog.Dataquery>[]): TimeseriesBuilder {
  return new TimeseriesBuilder()
    .title(title)
    .description(description)
    .datasource(DATASOURCE)
    .unit(unit)
    .targets(targets)
    .span(12)
    .height(8)
    .legend(new common.VizLegendOptionsBuilder().displayMode(common.LegendDisplayMode.Table).placement(common.LegendPlacement.Right).showLegend(true).calcs(["mean", "max"]));
}

/** `q`-quantile of a histogram's rate, per `by` labels. */
export function quantile(q: number, bucket: string, by: string): string {
  return `histogram_quantile(${q}, sum by (${by}, le) (rate(${bucket}[$__rate_interval])))`;
}

/**
 * The dashboard as Grafana stores it. Panel ids are numbered in order so
 * links to a panel (viewPanel=N) stay stable across regenerations.
 */
export function build(builder: DashboardBuilder): Dashboard {
  const built = builder.build();
  built.panels?.forEach((panel, i) => {
    panel.id = i + 1;
  });
  return built;
}
