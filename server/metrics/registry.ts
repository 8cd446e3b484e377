import { collectDefaultMetrics, Gauge, Registry } from "prom-client";
import type { ObjectType } from "../core/objects.js";
import type { VmRegistry } from "../core/vm.js";

/**
 * The Prometheus registry: gauges read from the core at scrape time (nothing
 * is updated on a request path) plus prom-client's process/Node metrics.
 */
export function createMetricsRegistry(vms: VmRegistry): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  // promtool rejects gauges whose names end in _total.
  for (const name of ["nodejs_active_handles_total", "nodejs_active_requests_total", "nodejs_active_resources_total"]) {
    registry.removeSingleMetric(name);
  }

  new Gauge({
    name: "iommufd_vms",
    help: "Live VMs (iommufd contexts).",
    labelNames: ["model"],
    registers: [registry],
    collect() {
      this.reset();
      for (const vm of vms.all()) this.inc({ model: vm.model });
    },
  });

  new Gauge({
    name: "iommufd_objects",
    help: "Live iommufd objects of all VMs.",
    labelNames: ["type"],
    registers: [registry],
    collect() {
      const counts: Record<ObjectType, number> = { ioas: 0, hwpt_paging: 0, hwpt_nested: 0, device: 0 };
      for (const vm of vms.all()) for (const obj of vm.ctx.allObjects()) counts[obj.type]++;
      for (const [type, n] of Object.entries(counts)) this.set({ type }, n);
    },
  });

  return registry;
}
