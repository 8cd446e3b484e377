import { type Dashboard, RowBuilder } from "@grafana/grafana-foundation-sdk/dashboard";
import { build, dashboard, JOB, quantile, query, timeseries } from "./common.js";

/** gRPC traffic, errors and latency by method; live VMs and objects; the process. */
export function overview(): Dashboard {
  const handled = `grpc_server_handled_total{${JOB}}`;
  return build(
    dashboard("iommufd-overview", "iommufd / Overview", "iommufd-service: RPC rate, errors and latency by method, live VMs and objects.")
      .withRow(new RowBuilder("gRPC"))
      .withPanel(
        timeseries(
          "RPC rate by method",
          "Completed RPCs per second (grpc_server_handled_total), any status.",
          "reqps",
          query(`sum by (grpc_service, grpc_method) (rate(${handled}[$__rate_interval]))`, "{{grpc_method}}"),
        ),
      )
      .withPanel(
        timeseries(
          "RPC errors by method and code",
          "Non-OK completions per second. Most are the kernel's errno answers to a caller's request (INVALID_ARGUMENT, NOT_FOUND, ...); the error-ratio alert only counts server faults.",
          "reqps",
          query(`sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total{${JOB}, grpc_code!="OK"}[$__rate_interval]))`, "{{grpc_method}} {{grpc_code}}"),
        ),
      )
      .withPanel(
        timeseries(
          "RPC latency p50 / p99 by method",
          "Server handling time from grpc_server_handling_seconds (quantiles interpolated within buckets).",
          "s",
          query(quantile(0.5, `grpc_server_handling_seconds_bucket{${JOB}}`, "grpc_method"), "p50 {{grpc_method}}", "A"),
          query(quantile(0.99, `grpc_server_handling_seconds_bucket{${JOB}}`, "grpc_method"), "p99 {{grpc_method}}", "B"),
        ),
      )
      .withPanel(
        timeseries(
          "RPCs in flight",
          "Started minus completed: calls the server is working on (or that are stuck).",
          "short",
          query(`sum by (grpc_method) (grpc_server_started_total{${JOB}}) - sum by (grpc_method) (${handled})`, "{{grpc_method}}"),
        ),
      )
      .withRow(new RowBuilder("Emulator"))
      .withPanel(timeseries("Live VMs", "iommufd contexts by IOMMU model.", "short", query(`sum by (model) (iommufd_vms{${JOB}})`, "{{model}}")))
      .withPanel(timeseries("Objects", "Live iommufd objects of all VMs by type.", "short", query(`sum by (type) (iommufd_objects{${JOB}})`, "{{type}}")))
      .withRow(new RowBuilder("Process"))
      .withPanel(timeseries("CPU", "CPU seconds per second (1 = one core busy).", "percentunit", query(`rate(process_cpu_seconds_total{${JOB}}[$__rate_interval])`, "{{instance}}")).span(8))
      .withPanel(
        timeseries("Resident memory", "RSS; guest RAM is sparse, so untouched pages cost nothing.", "bytes", query(`process_resident_memory_bytes{${JOB}}`, "{{instance}}")).span(8),
      )
      .withPanel(
        timeseries("Event-loop lag p99", "The Node.js event-loop delay every RPC waits behind.", "s", query(`nodejs_eventloop_lag_p99_seconds{${JOB}}`, "{{instance}}")).span(8),
      ),
  );
}
