import * as grpc from "@grpc/grpc-js";
import type { Registry } from "prom-client";
import { ComputedMetric, histogramSamples, type Sample } from "./computed.js";

/**
 * The go-grpc-prometheus server metrics (grpc_server_started_total,
 * grpc_server_handled_total, grpc_server_handling_seconds) from a grpc-js
 * server interceptor, so existing gRPC dashboards and alerts work unchanged.
 * A call costs a few increments of plain per-method counters (no label
 * hashing, no prom-client on the call path); the series are built at scrape
 * time, like the emulator's own (computed.ts).
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

/** A method's counters: started, handled by code, handling-time buckets. */
interface MethodCounters {
  readonly labels: Record<string, string>;
  started: number;
  readonly handled: Float64Array;
  readonly buckets: Float64Array;
  sum: number;
}

const UNKNOWN = 2;

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

/** Wraps a method's grpc-js handler so that its calls are counted. */
export type Instrument = (method: ServedMethod, handler: grpc.UntypedHandleCall) => grpc.UntypedHandleCall;

type Callback = (error: Partial<grpc.StatusObject> | null, ...rest: unknown[]) => void;
type StreamingCall = { once(event: string, listener: (arg?: { code?: number }) => void): unknown };

/**
 * The metrics, counted where the handlers run (a handler wrapper costs far
 * less per call than a grpc-js interceptor). As go-grpc-prometheus's
 * InitializeMetrics() does, every method's series (started, and handled for
 * every code) exist at zero from the start, so the first error after a
 * restart shows up in rate(). Like go-grpc-prometheus, a call no handler
 * ran for (an unknown method, a transport error) is not counted.
 */
export function grpcServerMetrics(registry: Registry, methods: readonly ServedMethod[]): Instrument {
  const byPath = new Map<string, MethodCounters>();
  const countersOf = (method: ServedMethod): MethodCounters => {
    let c = byPath.get(method.path);
    if (c === undefined) {
      const [service, name] = method.path.slice(1).split("/");
      const labels = { grpc_type: grpcType(method), grpc_service: service, grpc_method: name };
      c = { labels, started: 0, handled: new Float64Array(CODE_NAMES.length), buckets: new Float64Array(HANDLING_BUCKETS.length + 1), sum: 0 };
      byPath.set(method.path, c);
    }
    return c;
  };
  for (const method of methods) countersOf(method);

  new ComputedMetric("grpc_server_started_total", "Total number of RPCs started on the server.", "counter", () =>
    [...byPath.values()].map((c) => ({ labels: c.labels, value: c.started })),
  ).register(registry);
  new ComputedMetric("grpc_server_handled_total", "Total number of RPCs completed on the server, regardless of success or failure.", "counter", () => {
    const out: Sample[] = [];
    for (const c of byPath.values()) c.handled.forEach((value, code) => out.push({ labels: { ...c.labels, grpc_code: CODE_NAMES[code] }, value }));
    return out;
  }).register(registry);
  new ComputedMetric("grpc_server_handling_seconds", "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.", "histogram", () =>
    [...byPath.values()].flatMap((c) => histogramSamples("grpc_server_handling_seconds", c.labels, HANDLING_BUCKETS, c.buckets, c.sum)),
  ).register(registry);

  const handled = (c: MethodCounters, code: number | undefined, start: number) => {
    c.handled[code !== undefined && code >= 0 && code < CODE_NAMES.length ? code : UNKNOWN]++;
    const seconds = (performance.now() - start) / 1000;
    let b = 0;
    while (b < HANDLING_BUCKETS.length && seconds > HANDLING_BUCKETS[b]) b++;
    c.buckets[b]++;
    c.sum += seconds;
  };

  return (method, handler) => {
    const c = countersOf(method);
    const run = handler as (call: unknown, callback?: Callback) => void;
    if (!method.responseStream) {
      // Unary and client-streaming: the status is what the callback gets.
      return ((call: unknown, callback: Callback) => {
        c.started++;
        const start = performance.now();
        run(call, (error, ...rest) => {
          handled(c, error ? (error.code ?? UNKNOWN) : grpc.status.OK, start);
          callback(error, ...rest);
        });
      }) as grpc.UntypedHandleCall;
    }
    // Streaming responses: an emitted error (its status), else the end (OK),
    // else the client's cancellation, whichever comes first.
    return ((call: StreamingCall) => {
      c.started++;
      const start = performance.now();
      let done = false;
      const end = (code: number | undefined) => {
        if (done) return;
        done = true;
        handled(c, code, start);
      };
      call.once("error", (status) => end(status?.code ?? UNKNOWN));
      call.once("finish", () => end(grpc.status.OK));
      call.once("cancelled", () => end(grpc.status.CANCELLED));
      run(call);
    }) as grpc.UntypedHandleCall;
  };
}
