import { constants, type IncomingHttpHeaders, type ServerHttp2Stream } from "node:http2";
import type * as grpc from "@grpc/grpc-js";
import { IommuError } from "../core/errno.js";
import { iommuErrorStatus } from "./status.js";

/**
 * Checks grpc-js does not make of a call's HTTP/2 headers, done before
 * grpc-js sees the stream (PROTOCOL-HTTP2 of grpc/grpc):
 * - `:method` must be POST (grpc-js serves any method): else HTTP 405;
 * - `grpc-timeout` must be 1–8 digits and a unit (grpc-js answers a
 *   malformed one with INTERNAL): else INVALID_ARGUMENT/EINVAL;
 * - requests are not compressed here (`grpc-encoding` absent or identity;
 *   grpc-js answers undecodable gzip with INTERNAL): else
 *   UNIMPLEMENTED/EOPNOTSUPP, the code the protocol prescribes for an
 *   unsupported encoding.
 *
 * grpc-js has no hook before its stream handler, so this wraps its
 * (private) per-stream handlers on one server instance; the grpc-js version
 * is pinned, and test/e2e/h2-garbage.test.ts fails if the hook stops working.
 */

const GRPC_TIMEOUT = /^\d{1,8}[HMSmun]$/;

function refusal(headers: IncomingHttpHeaders): IommuError | "method" | undefined {
  if (headers[constants.HTTP2_HEADER_METHOD] !== "POST") return "method";
  const timeout = headers["grpc-timeout"];
  if (timeout !== undefined && !GRPC_TIMEOUT.test(String(timeout))) return new IommuError("EINVAL", `malformed grpc-timeout ${JSON.stringify(timeout)}`);
  const encoding = headers["grpc-encoding"];
  if (encoding !== undefined && encoding !== "identity") return new IommuError("EOPNOTSUPP", `grpc-encoding ${JSON.stringify(encoding)} is not supported: send requests uncompressed`);
  return undefined;
}

function refuse(stream: ServerHttp2Stream, why: IommuError | "method"): void {
  stream.on("error", () => {});
  if (why === "method") {
    stream.respond({ [constants.HTTP2_HEADER_STATUS]: constants.HTTP_STATUS_METHOD_NOT_ALLOWED, allow: "POST" }, { endStream: true });
    return;
  }
  const status = iommuErrorStatus(why);
  // A trailers-only response, as grpc-js sends its own errors.
  stream.respond(
    {
      [constants.HTTP2_HEADER_STATUS]: constants.HTTP_STATUS_OK,
      [constants.HTTP2_HEADER_CONTENT_TYPE]: "application/grpc+proto",
      "grpc-status": String(status.code),
      "grpc-message": encodeURIComponent(status.details ?? ""),
      ...status.metadata?.toHttp2Headers(),
    },
    { endStream: true },
  );
}

type StreamHandler = (extraInterceptors: unknown, stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => void;

/** Install the checks on `server`; call before bindAsync(). */
export function guardHttp2Streams(server: grpc.Server): void {
  const internals = server as unknown as Record<"_streamHandler" | "_channelzHandler", StreamHandler>;
  for (const name of ["_streamHandler", "_channelzHandler"] as const) {
    const original = internals[name];
    if (typeof original !== "function") throw new Error(`grpc-js changed: Server.${name} is gone (see http2-guard.ts)`);
    internals[name] = function (this: unknown, extraInterceptors, stream, headers) {
      const why = refusal(headers);
      if (why !== undefined) refuse(stream, why);
      else original.call(this, extraInterceptors, stream, headers);
    };
  }
}
