import * as grpc from "@grpc/grpc-js";
import { Counter, Histogram, type Registry } from "prom-client";

/**
 * The go-grpc-prometheus server metrics (grpc_server_started_total,
 * grpc_server_handled_total, grpc_server_handling_seconds) from a grpc-js
 * server interceptor, so existing gRPC dashboards and alerts work unchanged.
 * Label children are cached per method and code: a call costs a few
 * increments, no label hashing.
 */

/** Buckets around this service's sub-millisecond unary calls and the latency SLO. */
const HANDLING_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/** grpc-go's codes.Code String() names, the grpc_code values go-grpc-prometheus emits. */
const CODE_NAMES = [
  "OK",
  "Canceled",
  "Unknown",
  "InvalidArgument",
  "DeadlineExceeded",
  "NotFound",
  "AlreadyExists",
  "PermissionDenied",
  "ResourceExhausted",
  "FailedPrecondition",
  "Aborted",
  "OutOfRange",
  "Unimplemented",
  "Internal",
  "Unavailable",
  "DataLoss",
  "Unauthenticated",
];

type Children = {
  started: { inc(value?: number): void };
  handled: Map<number, { inc(value?: number): void }>;
  seconds: { observe(v: number): void };
  labels: Record<string, string>;
};

function grpcType(method: ServedMethod): string {
  if (method.requestStream) return method.responseStream ? "bidi_stream" : "client_stream";
  return method.responseStream ? "server_stream" : "unary";
}

/** A served method, for initialising its series. */
export interface ServedMethod {
  readonly path: string;
  readonly requestStream: boolean;
  readonly responseStream: boolean;
}

/**
 * The interceptor. As go-grpc-prometheus's InitializeMetrics() does, every
 * method's series (started, and handled for every code) exist at zero from
 * the start, so the first error after a restart shows up in rate().
 */
export function grpcServerMetrics(registry: Registry, methods: readonly ServedMethod[]): grpc.ServerInterceptor {
  const labelNames = ["grpc_type", "grpc_service", "grpc_method"] as const;
  const started = new Counter({ name: "grpc_server_started_total", help: "Total number of RPCs started on the server.", labelNames, registers: [registry] });
  const handled = new Counter({
    name: "grpc_server_handled_total",
    help: "Total number of RPCs completed on the server, regardless of success or failure.",
    labelNames: [...labelNames, "grpc_code"],
    registers: [registry],
  });
  const seconds = new Histogram({
    name: "grpc_server_handling_seconds",
    help: "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
    labelNames,
    buckets: HANDLING_BUCKETS,
    registers: [registry],
  });
  const byPath = new Map<string, Children>();
  const childrenOf = (method: ServedMethod): Children => {
    let c = byPath.get(method.path);
    if (c === undefined) {
      const [service, name] = method.path.slice(1).split("/");
      const labels = { grpc_type: grpcType(method), grpc_service: service, grpc_method: name };
      const handledByCode = new Map(CODE_NAMES.map((grpc_code, code) => [code, handled.labels({ ...labels, grpc_code })]));
      c = { started: started.labels(labels), handled: handledByCode, seconds: seconds.labels(labels), labels };
      for (const h of handledByCode.values()) h.inc(0);
      c.started.inc(0);
      byPath.set(method.path, c);
    }
    return c;
  };
  for (const method of methods) childrenOf(method);

  return (method, call) => {
    const c = childrenOf(method);
    c.started.inc();
    const start = performance.now();
    return new grpc.ServerInterceptingCall(call, {
      sendStatus: (status, next) => {
        let h = c.handled.get(status.code);
        if (h === undefined) {
          h = handled.labels({ ...c.labels, grpc_code: String(status.code) });
          c.handled.set(status.code, h);
        }
        h.inc();
        c.seconds.observe((performance.now() - start) / 1000);
        next(status);
      },
    });
  };
}
