import type * as grpc from "@grpc/grpc-js";
import { rejectedRequest } from "./bridge.js";
import { IommuError } from "../core/errno.js";

/**
 * The services libraries add (grpc-health-check, @grpc/reflection) decode
 * with deserializers that throw on malformed bytes, which grpc-js answers
 * with INTERNAL. Added through guarded(), a malformed request is
 * INVALID_ARGUMENT/EINVAL like everywhere else, and the library's handler
 * never sees it.
 */

type Handler = (call: { request?: unknown; emit(event: string, ...args: unknown[]): boolean }, callback?: grpc.sendUnaryData<unknown>) => void;

function guardDeserializer(deserialize: (bytes: Buffer) => unknown): (bytes: Buffer) => unknown {
  return (bytes) => {
    try {
      return deserialize(bytes);
    } catch (e) {
      return rejectedRequest(e);
    }
  };
}

function guardHandler(method: grpc.MethodDefinition<unknown, unknown>, handler: Handler, toStatus: (error: unknown) => Partial<grpc.StatusObject>): Handler {
  if (!method.requestStream) {
    return (call, callback) => {
      if (!(call.request instanceof IommuError)) return handler(call, callback);
      const status = toStatus(call.request);
      if (callback) callback(status);
      else call.emit("error", status);
    };
  }
  // Streamed requests: a malformed one ends the call before the handler sees it.
  return (call, callback) => {
    const emit = call.emit.bind(call);
    call.emit = (event: string, ...args: unknown[]) => {
      if (event !== "data" || !(args[0] instanceof IommuError)) return emit(event, ...args);
      const status = toStatus(args[0]);
      call.emit = emit;
      return callback ? (callback(status), true) : emit("error", status);
    };
    handler(call, callback);
  };
}

/**
 * A view of `server` whose addService() guards every method it is given,
 * and passes each guarded handler through `wrap` (metrics).
 */
export function guarded(
  server: grpc.Server,
  toStatus: (error: unknown) => Partial<grpc.StatusObject>,
  wrap: (method: grpc.MethodDefinition<unknown, unknown>, handler: grpc.UntypedHandleCall) => grpc.UntypedHandleCall,
): Pick<grpc.Server, "addService"> {
  return {
    addService(definition, implementation) {
      const guardedDefinition: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
      const guardedImplementation: Record<string, grpc.UntypedHandleCall> = {};
      for (const [name, method] of Object.entries(definition as Record<string, grpc.MethodDefinition<unknown, unknown>>)) {
        guardedDefinition[name] = { ...method, requestDeserialize: guardDeserializer(method.requestDeserialize) };
        const handler = (implementation as Record<string, Handler>)[name] ?? (implementation as Record<string, Handler>)[method.originalName ?? ""];
        if (handler) guardedImplementation[name] = wrap(method, guardHandler(method, handler, toStatus) as unknown as grpc.UntypedHandleCall);
      }
      server.addService(guardedDefinition, guardedImplementation as grpc.UntypedServiceImplementation);
    },
  };
}
