import * as grpc from "@grpc/grpc-js";

/**
 * Long-lived watch calls (grpc.health.v1.Health/Watch) stay open for as long
 * as the client likes, so a graceful drain would wait for them forever. This
 * interceptor remembers them so that the drain can end them (after they have
 * seen NOT_SERVING) and wait only for real work.
 */
export class WatchCalls {
  private readonly open = new Set<grpc.ServerInterceptingCall>();

  constructor(private readonly paths: ReadonlySet<string>) {}

  readonly interceptor: grpc.ServerInterceptor = (method, call) => {
    // Any other call passes untouched: no intercepting layer on its path.
    if (!this.paths.has(method.path)) return call as grpc.ServerInterceptingCall;
    const watch: grpc.ServerInterceptingCall = new grpc.ServerInterceptingCall(call, {
      start: (next) => next({ onCancel: () => this.open.delete(watch) }),
      sendStatus: (status, next) => {
        this.open.delete(watch);
        next(status);
      },
    });
    this.open.add(watch);
    return watch;
  };

  /** End every open watch with UNAVAILABLE. */
  endAll(details: string): void {
    for (const watch of [...this.open]) watch.sendStatus({ code: grpc.status.UNAVAILABLE, details, metadata: new grpc.Metadata() });
  }
}
