import { createServer as createHttpServer, type Server as HttpServer } from "node:http";
import type { AddressInfo } from "node:net";
import * as grpc from "@grpc/grpc-js";
import { ReflectionService } from "@grpc/reflection";
import { HealthImplementation } from "grpc-health-check";
import type { Logger } from "pino";
import { file_google_rpc_error_details } from "../gen/google/rpc/error_details_pb.js";
import { file_google_rpc_status } from "../gen/google/rpc/status_pb.js";
import { file_grpc_health_v1_health } from "../gen/grpc/health/v1/health_pb.js";
import { file_iommufd_v1_service, IommufdService } from "../gen/iommufd/v1/service_pb.js";
import type { Config } from "./config.js";
import { VmRegistry } from "./core/vm.js";
import { createMetrics } from "./metrics/registry.js";
import { reflectionPackage, serviceDefinition, unaryHandlers } from "./rpc/bridge.js";
import { WatchCalls } from "./rpc/inflight.js";
import { INVALIDATE_CODEC, invalidateHandler, iommufdServiceImplementation, TRANSLATE_CODEC, translateHandler } from "./rpc/service.js";
import { guarded } from "./rpc/guard.js";
import { guardHttp2Streams } from "./rpc/http2-guard.js";
import { callIdentity } from "./rpc/identity.js";
import { exportVmHandler, importVmHandler } from "./rpc/snapshot.js";
import { toStatus } from "./rpc/status.js";
import { Turns } from "./rpc/turns.js";
import { StateDir } from "./state-dir.js";

export const SERVICE_NAME = IommufdService.typeName;

/** grpc.health.v1.Health's methods, whose metrics start at zero too. */
const HEALTH_METHODS = [
  { path: "/grpc.health.v1.Health/Check", requestStream: false, responseStream: false },
  { path: "/grpc.health.v1.Health/Watch", requestStream: false, responseStream: true },
];

/** A running iommufd-service: gRPC server, health, reflection, metrics listener. */
export interface RunningServer {
  /** The bound gRPC address, HOST:PORT. */
  readonly address: string;
  /** The bound metrics address, HOST:PORT ("" when metrics are off). */
  readonly metricsAddress: string;
  /** The bound plaintext health address ("" unless --health-listen). */
  readonly healthAddress: string;
  readonly vms: VmRegistry;
  /**
   * Graceful drain: health goes NOT_SERVING, no new calls are accepted,
   * in-flight calls complete (forced after the drain timeout).
   */
  shutdown(): Promise<void>;
}

function listenHttp(server: HttpServer, hostPort: string): Promise<string> {
  const i = hostPort.lastIndexOf(":");
  const host = hostPort.slice(0, i).replace(/^\[(.*)\]$/, "$1");
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(Number(hostPort.slice(i + 1)), host, () => {
      const a = server.address() as AddressInfo;
      resolve(a.family === "IPv6" ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`);
    });
  });
}

/** Binds a gRPC server; the bound HOST:PORT (port 0 resolved). */
async function bindGrpc(server: grpc.Server, hostPort: string, credentials: grpc.ServerCredentials): Promise<string> {
  const port = await new Promise<number>((resolve, reject) => server.bindAsync(hostPort, credentials, (err, p) => (err ? reject(err) : resolve(p))));
  return `${hostPort.slice(0, hostPort.lastIndexOf(":"))}:${port}`;
}

export async function startServer(config: Config, log: Logger): Promise<RunningServer> {
  const vms = new VmRegistry(config.limits);
  const metricsOn = config.metricsListen !== "off";
  const iommufdDefinition = serviceDefinition(IommufdService, { translate: TRANSLATE_CODEC, invalidate: INVALIDATE_CODEC }, config.maxMessageBytes);
  const { registry: metrics, instrument } = createMetrics(vms, {
    vmLabelCap: config.metricsVmLabelCap,
    methods: [...Object.values(iommufdDefinition), ...HEALTH_METHODS],
  });
  const watches = new WatchCalls(new Set(["/grpc.health.v1.Health/Watch"]));
  const server = new grpc.Server({
    // grpc-js refuses larger messages with a bare RESOURCE_EXHAUSTED; up to
    // this margin the deserializer does, with EDQUOT and a QuotaFailure.
    "grpc.max_receive_message_length": config.maxMessageBytes + (1 << 20),
    "grpc.max_send_message_length": config.maxMessageBytes,
    interceptors: [watches.interceptor],
  });

  guardHttp2Streams(server);
  const onBug = (error: unknown) => log.error({ err: error }, "unexpected error in an RPC handler");
  const statusOf = (error: unknown) => toStatus(error, onBug);
  const identity = { mutualTls: config.tls?.clientCa !== undefined, adminIdentity: config.adminIdentity };
  const caller = (call: Parameters<typeof callIdentity>[0]) => callIdentity(call, identity);
  const handlers = unaryHandlers(IommufdService, iommufdServiceImplementation(vms), caller, statusOf, config.maxMessageBytes);
  // Long Translate batches and Invalidate arrays take turns (rpc/turns.ts).
  const turns = new Turns();
  handlers.translate = translateHandler(vms, caller, statusOf, turns, config.maxMessageBytes) as grpc.UntypedHandleCall;
  handlers.invalidate = invalidateHandler(vms, caller, statusOf, turns) as grpc.UntypedHandleCall;
  handlers.exportVm = exportVmHandler(vms, caller, statusOf, config.maxMessageBytes) as grpc.UntypedHandleCall;
  handlers.importVm = importVmHandler(vms, caller, statusOf) as grpc.UntypedHandleCall;
  // With metrics on, every handler is counted (metrics/grpc-metrics.ts).
  const counted = metricsOn ? instrument : (_method: unknown, handler: grpc.UntypedHandleCall) => handler;
  for (const [name, method] of Object.entries(iommufdDefinition)) handlers[name] = counted(method, handlers[name]);
  server.addService(iommufdDefinition, handlers);
  const health = new HealthImplementation({ "": "SERVING", [SERVICE_NAME]: "SERVING" });
  health.addToServer(guarded(server, statusOf, counted) as grpc.Server);
  new ReflectionService(
    reflectionPackage([file_iommufd_v1_service, file_grpc_health_v1_health, file_google_rpc_status, file_google_rpc_error_details]),
  ).addToServer(guarded(server, statusOf, counted) as grpc.Server);

  // Restored before the port opens: no client sees a VM half-restored.
  let stateDir: StateDir | undefined;
  let snapshotTimer: NodeJS.Timeout | undefined;
  if (config.stateDir !== undefined) {
    stateDir = new StateDir(config.stateDir, vms, log);
    const { restored, failed } = await stateDir.restore();
    log.info({ stateDir: config.stateDir, restored, failed }, `restored ${restored} VM(s) from ${config.stateDir}${failed ? `, ${failed} file(s) skipped` : ""}`);
    if (config.snapshotIntervalMs !== undefined) {
      const periodic = stateDir;
      snapshotTimer = setInterval(() => {
        periodic.saveAll().catch((err: unknown) => log.error({ err }, "periodic snapshot failed"));
      }, config.snapshotIntervalMs);
      snapshotTimer.unref();
    }
  }

  const credentials = config.tls
    ? grpc.ServerCredentials.createSsl(config.tls.clientCa ?? null, [{ private_key: config.tls.key, cert_chain: config.tls.cert }], config.tls.clientCa !== undefined)
    : grpc.ServerCredentials.createInsecure();
  if (!config.tls && config.insecure) log.warn({ listen: config.listen }, "serving plaintext gRPC (--insecure): any client that reaches this address can do anything");
  const address = await bindGrpc(server, config.listen, credentials);

  // kubelet's gRPC probe cannot present a client certificate: under mutual
  // TLS, health is also served on its own plaintext port.
  let healthServer: grpc.Server | undefined;
  let healthAddress = "";
  if (config.healthListen !== "off") {
    healthServer = new grpc.Server();
    health.addToServer(healthServer);
    healthAddress = await bindGrpc(healthServer, config.healthListen, grpc.ServerCredentials.createInsecure());
  }

  let draining = false;
  const http = createHttpServer((req, res) => {
    if (req.method === "GET" && req.url === "/metrics") {
      metrics.metrics().then(
        (body) => res.writeHead(200, { "content-type": metrics.contentType }).end(body),
        (err: unknown) => {
          log.error({ err }, "metrics collection failed");
          res.writeHead(500).end();
        },
      );
    } else if (req.method === "GET" && req.url === "/healthz") {
      res.writeHead(draining ? 503 : 200, { "content-type": "text/plain" }).end(draining ? "draining\n" : "ok\n");
    } else {
      res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
    }
  });
  let metricsAddress = "";
  try {
    if (metricsOn) metricsAddress = await listenHttp(http, config.metricsListen);
  } catch (e) {
    server.forceShutdown();
    throw e;
  }

  log.info({ grpc: address, metrics: metricsAddress, health: healthAddress, tls: config.tls ? (config.tls.clientCa ? "mutual" : "server") : "off" }, `iommufd-service listening on ${address} (gRPC)${metricsOn ? ` and ${metricsAddress} (metrics)` : ", metrics off"}`);

  let stopping: Promise<void> | undefined;
  const shutdown = () => {
    stopping ??= (async () => {
      draining = true;
      health.setStatus("", "NOT_SERVING");
      health.setStatus(SERVICE_NAME, "NOT_SERVING");
      log.info("draining: no new calls, waiting for in-flight RPCs");
      // Watchers have been told NOT_SERVING; their streams would hold the
      // drain open forever, so they end now. Everything else completes.
      watches.endAll("server is shutting down");
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        timer = setTimeout(() => {
          log.warn({ timeoutMs: config.drainTimeoutMs }, "drain timeout: forcing shutdown");
          server.forceShutdown();
        }, config.drainTimeoutMs);
        server.tryShutdown(() => resolve());
      });
      clearTimeout(timer);
      clearInterval(snapshotTimer);
      if (stateDir !== undefined) {
        const { saved, failed } = await stateDir.saveAll();
        log.info({ stateDir: config.stateDir, saved, failed }, `saved ${saved} VM(s) to ${config.stateDir}${failed ? `; ${failed} could not be saved` : ""}`);
      }
      healthServer?.forceShutdown();
      if (metricsOn) {
        await new Promise<void>((resolve) => {
          http.close(() => resolve());
          http.closeAllConnections();
        });
      }
    })();
    return stopping;
  };

  return { address, metricsAddress, healthAddress, vms, shutdown };
}
