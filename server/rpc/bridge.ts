import {
  create,
  type DescFile,
  type DescMessage,
  type DescMethod,
  type DescService,
  fromBinary,
  type MessageInitShape,
  type MessageShape,
  toBinary,
} from "@bufbuild/protobuf";
import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import type * as grpc from "@grpc/grpc-js";
import { IommuError } from "../core/errno.js";
import { QuotaError } from "../core/limits.js";

/**
 * The bridge between protobuf-es descriptors and grpc-js: service definitions
 * whose (de)serializers are protobuf-es toBinary/fromBinary, typed unary
 * handlers, and the descriptor set server reflection serves.
 */

/**
 * A request that cannot be served as decoded: malformed bytes (EINVAL) or a
 * message over the size quota (EDQUOT). A deserializer that throws makes
 * grpc-js answer INTERNAL, so deserializers return this and handlers throw it.
 */
export function rejectedRequest(error: unknown): IommuError {
  return error instanceof IommuError ? error : new IommuError("EINVAL", `malformed request: ${error instanceof Error ? error.message : String(error)}`);
}

function decoder(schema: DescMessage) {
  return (bytes: Buffer) => {
    try {
      return fromBinary(schema, bytes);
    } catch (e) {
      return rejectedRequest(e);
    }
  };
}

/** Wraps a deserializer with the message-size quota. */
function sizeChecked(deserialize: (bytes: Buffer) => unknown, maxBytes: number) {
  return (bytes: Buffer) =>
    bytes.length > maxBytes
      ? new QuotaError({ subject: "request", description: `maxMessageBytes = ${maxBytes}` }, `request of ${bytes.length} bytes exceeds the message size limit of ${maxBytes}`)
      : deserialize(bytes);
}

function encoder(schema: DescMessage) {
  return (message: MessageShape<DescMessage>) => Buffer.from(toBinary(schema, message));
}

/**
 * A response within the message size limit, else EDQUOT with a QuotaFailure:
 * grpc-js would refuse it with a bare RESOURCE_EXHAUSTED.
 */
export function checkResponseSize(bytes: Buffer, maxBytes: number): Buffer {
  if (bytes.length > maxBytes) {
    throw new QuotaError({ subject: "response", description: `maxMessageBytes = ${maxBytes}` }, `response of ${bytes.length} bytes exceeds the message size limit of ${maxBytes}`);
  }
  return bytes;
}

/** Responses the handlers encoded already (to check their size) pass through. */
function responseEncoder(schema: DescMessage) {
  const encode = encoder(schema);
  return (value: MessageShape<DescMessage> | Buffer) => (Buffer.isBuffer(value) ? value : encode(value));
}

/** A method's own wire codec, replacing protobuf-es (for a hot path). */
export interface MethodCodec {
  requestDeserialize(bytes: Buffer): unknown;
  responseSerialize(value: unknown): Buffer;
}

/**
 * grpc-js method definitions for every method of a protobuf-es service;
 * requests larger than maxRequestBytes are refused with EDQUOT.
 */
export function serviceDefinition(service: DescService, codecs: Record<string, MethodCodec> = {}, maxRequestBytes = Infinity): grpc.ServiceDefinition {
  const definition: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const method of service.methods) {
    const codec = codecs[method.localName];
    definition[method.localName] = {
      path: `/${service.typeName}/${method.name}`,
      originalName: method.name,
      requestStream: method.methodKind === "client_streaming" || method.methodKind === "bidi_streaming",
      responseStream: method.methodKind === "server_streaming" || method.methodKind === "bidi_streaming",
      requestSerialize: encoder(method.input) as (value: unknown) => Buffer,
      requestDeserialize: sizeChecked(codec?.requestDeserialize ?? decoder(method.input), maxRequestBytes),
      responseSerialize: codec?.responseSerialize ?? (responseEncoder(method.output) as (value: unknown) => Buffer),
      responseDeserialize: (bytes: Buffer) => fromBinary(method.output, bytes),
    };
  }
  return definition;
}

type Method<S extends GenServiceMethods, K extends keyof S> = S[K] & DescMethod;

/**
 * A typed implementation of every unary method of a generated service; C is
 * what it learns of the caller. Streaming methods have handlers of their own.
 */
export type UnaryImplementation<S extends GenServiceMethods, C> = {
  [K in keyof S as S[K]["methodKind"] extends "unary" ? K : never]: (
    request: MessageShape<Method<S, K>["input"]>,
    caller: C,
  ) => MessageInitShape<Method<S, K>["output"]> | EncodedResponse;
};

/** A response the implementation encoded itself (e.g. one it caches). */
export class EncodedResponse {
  constructor(readonly bytes: Buffer) {}
}

/**
 * grpc-js handlers for a unary implementation: each decodes, calls, encodes
 * (refusing a response over maxResponseBytes), and turns anything thrown (or
 * a malformed request) into a status through `toStatus`.
 */
export function unaryHandlers<S extends GenServiceMethods, C>(
  service: GenService<S>,
  implementation: UnaryImplementation<S, C>,
  caller: (call: grpc.ServerUnaryCall<unknown, unknown>) => C,
  toStatus: (error: unknown, method: DescMethod) => Partial<grpc.StatusObject>,
  maxResponseBytes = Infinity,
): grpc.UntypedServiceImplementation {
  const handlers: grpc.UntypedServiceImplementation = {};
  for (const method of service.methods) {
    if (method.methodKind !== "unary") continue;
    const fn = implementation[method.localName as keyof typeof implementation] as (request: unknown, caller: C) => MessageInitShape<DescMessage> | EncodedResponse;
    const handler: grpc.handleUnaryCall<unknown, unknown> = (call, callback) => {
      try {
        if (call.request instanceof IommuError) throw call.request;
        const response = fn(call.request, caller(call));
        const bytes = response instanceof EncodedResponse ? response.bytes : Buffer.from(toBinary(method.output, create(method.output, response)));
        callback(null, checkResponseSize(bytes, maxResponseBytes));
      } catch (e) {
        callback(toStatus(e, method));
      }
    };
    handlers[method.localName] = handler;
  }
  return handlers;
}

/**
 * The serialized FileDescriptorProtos of `files` and everything they import,
 * in the shape @grpc/reflection reads from a package definition.
 */
export function reflectionPackage(files: readonly DescFile[]): Record<string, { format: "Protocol Buffer 3 EnumDescriptorProto"; type: object; fileDescriptorProtos: Buffer[] }> {
  const seen = new Map<string, DescFile>();
  const visit = (file: DescFile): void => {
    if (seen.has(file.name)) return;
    seen.set(file.name, file);
    file.dependencies.forEach(visit);
  };
  files.forEach(visit);
  const fileDescriptorProtos = [...seen.values()].map((f) => Buffer.from(toBinary(FileDescriptorProtoSchema, f.proto)));
  // @grpc/reflection reads only fileDescriptorProtos; the format just types
  // the entry as a proto-loader package member.
  return { files: { format: "Protocol Buffer 3 EnumDescriptorProto", type: {}, fileDescriptorProtos } };
}
