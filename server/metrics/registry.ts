import { collectDefaultMetrics, Registry } from "prom-client";
import type { VmRegistry } from "../core/vm.js";
import { grpcServerMetrics, type Instrument, type ServedMethod } from "./grpc-metrics.js";
import { IommufdMetrics } from "./iommufd-metrics.js";

/** The process's metrics (metrics.md): iommufd_*, grpc_server_*, and prom-client's process/Node defaults. */
export interface Metrics {
  readonly registry: Registry;
  /** Wraps a handler so that its calls count, with the go-grpc-prometheus names. */
  readonly instrument: Instrument;
}

export function createMetrics(vms: VmRegistry, options: { vmLabelCap: number; methods: readonly ServedMethod[] }): Metrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  // promtool rejects gauges whose names end in _total.
  for (const name of ["nodejs_active_handles_total", "nodejs_active_requests_total", "nodejs_active_resources_total"]) {
    registry.removeSingleMetric(name);
  }
  new IommufdMetrics(vms, options.vmLabelCap).register(registry);
  return { registry, instrument: grpcServerMetrics(registry, options.methods) };
}
