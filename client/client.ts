import { create, fromBinary, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { ErrorInfoSchema, type QuotaFailure, QuotaFailureSchema } from "../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../gen/google/rpc/status_pb.js";
import { IommufdService } from "../gen/iommufd/v1/service_pb.js";
import { ExportVmRequestSchema, type ImportVmRequest, ImportVmRequestSchema } from "../gen/iommufd/v1/snapshot_pb.js";
import { serviceDefinition } from "../server/rpc/bridge.js";

/**
 * A typed client of iommufd.v1.IommufdService: one promise method per RPC
 * (createVm, mapIoas, ...) taking the request's init shape, and failures as
 * IommufdError carrying the gRPC code and the kernel errno.
 */

type Methods = typeof IommufdService.method;
export type RpcName = keyof Methods;
export type UnaryRpcName = { [K in RpcName]: Methods[K]["methodKind"] extends "unary" ? K : never }[RpcName];
export type RequestOf<K extends RpcName> = MessageInitShape<Methods[K]["input"]>;
export type ResponseOf<K extends RpcName> = MessageShape<Methods[K]["output"]>;

/** A snapshot byte stream (snapshot.proto): whole, or in pieces as they come. */
export type SnapshotBytes = Uint8Array | Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

/** ImportVm's request: the new vm_id (empty = the snapshot's) and the snapshot. */
export interface ImportVmArgs {
  vmId?: string;
  snapshot: SnapshotBytes;
}

export type IommufdMethods = {
  [K in UnaryRpcName]: (request: RequestOf<K>, options?: grpc.CallOptions) => Promise<ResponseOf<K>>;
} & {
  /** ExportVm: the VM's whole snapshot (see exportVmChunks() to stream it). */
  exportVm(request: RequestOf<"exportVm">, options?: grpc.CallOptions): Promise<Buffer>;
  /** ExportVm: the snapshot's chunks as the server sends them. */
  exportVmChunks(request: RequestOf<"exportVm">, options?: grpc.CallOptions): AsyncIterable<Uint8Array>;
  /** ImportVm: streams the snapshot in 1 MiB messages. */
  importVm(request: ImportVmArgs, options?: grpc.CallOptions): Promise<ResponseOf<"importVm">>;
};

/** The same methods with vm_id bound (see IommufdClient.vm()). */
export type VmMethods = {
  [K in keyof IommufdMethods]: IommufdMethods[K] extends (request: infer R, options?: grpc.CallOptions) => infer O
    ? {} extends Omit<R, "vmId">
      ? (request?: Omit<R, "vmId">, options?: grpc.CallOptions) => O
      : (request: Omit<R, "vmId">, options?: grpc.CallOptions) => O
    : never;
};

/** ImportVm message size: the server's snapshot chunk, far below any message limit. */
const IMPORT_CHUNK_BYTES = 1 << 20;

/** A failed RPC: its gRPC status and the google.rpc.ErrorInfo the server attached. */
export class IommufdError extends Error {
  override readonly name = "IommufdError";

  constructor(
    /** The gRPC status code. */
    readonly code: grpc.status,
    message: string,
    /** ErrorInfo.reason: the errno name ("EINVAL"), if the server sent one. */
    readonly errno: string | undefined,
    /** ErrorInfo.metadata.errno: the Linux errno number. */
    readonly errnoValue: number | undefined,
    /** ErrorInfo.metadata.entries_handled (Invalidate). */
    readonly entriesHandled: number | undefined,
    /** A google.rpc.QuotaFailure, when a quota was hit. */
    readonly quotaFailure: QuotaFailure | undefined,
  ) {
    super(message);
  }

  /** Decodes a grpc-js ServiceError. */
  static from(error: grpc.ServiceError): IommufdError {
    let errno: string | undefined;
    let errnoValue: number | undefined;
    let entriesHandled: number | undefined;
    let quotaFailure: QuotaFailure | undefined;
    const [bin] = error.metadata?.get("grpc-status-details-bin") ?? [];
    if (bin instanceof Buffer) {
      const status = fromBinary(StatusSchema, bin);
      for (const any of status.details) {
        const info = anyUnpack(any, ErrorInfoSchema);
        if (info) {
          errno = info.reason;
          errnoValue = info.metadata.errno === undefined ? undefined : Number(info.metadata.errno);
          entriesHandled = info.metadata.entries_handled === undefined ? undefined : Number(info.metadata.entries_handled);
        }
        quotaFailure ??= anyUnpack(any, QuotaFailureSchema);
      }
    }
    const text = `${grpc.status[error.code] ?? error.code}${errno ? `/${errno}` : ""}: ${error.details}`;
    return new IommufdError(error.code, text, errno, errnoValue, entriesHandled, quotaFailure);
  }
}

function isServiceError(e: unknown): e is grpc.ServiceError {
  return e instanceof Error && typeof (e as Partial<grpc.ServiceError>).code === "number" && "metadata" in e;
}

export interface ClientOptions {
  /** Default: plaintext. */
  credentials?: grpc.ChannelCredentials;
  /** grpc-js channel options (e.g. "grpc.max_receive_message_length"). */
  channelOptions?: grpc.ChannelOptions;
}

const GenericClient = grpc.makeGenericClientConstructor(serviceDefinition(IommufdService), IommufdService.typeName);

export interface IommufdClient extends IommufdMethods {}

export class IommufdClient {
  /** The underlying grpc-js client (for waitForReady, channel state, ...). */
  readonly grpc: grpc.Client;

  constructor(target: string, options: ClientOptions = {}) {
    this.grpc = new GenericClient(target, options.credentials ?? grpc.credentials.createInsecure(), {
      "grpc.max_receive_message_length": 64 * 1024 * 1024,
      ...options.channelOptions,
    });
    const stub = this.grpc as unknown as Record<string, Function>;
    const self = this as unknown as Record<string, unknown>;
    for (const method of IommufdService.methods) {
      if (method.methodKind !== "unary") continue;
      self[method.localName] = (request: MessageInitShape<typeof method.input>, callOptions: grpc.CallOptions = {}) =>
        new Promise((resolve, reject) => {
          stub[method.localName].call(this.grpc, create(method.input, request), new grpc.Metadata(), callOptions, (err: grpc.ServiceError | null, response: unknown) =>
            err ? reject(IommufdError.from(err)) : resolve(response),
          );
        });
    }
  }

  /** The RPCs with vm_id filled in: client.vm("vm1").allocIoas(). */
  vm(vmId: string): VmMethods {
    const bound: Record<string, unknown> = {};
    const self = this as unknown as Record<string, (req: object, opts?: grpc.CallOptions) => Promise<unknown>>;
    for (const name of [...IommufdService.methods.map((m) => m.localName), "exportVmChunks"]) {
      bound[name] = (request: object = {}, callOptions?: grpc.CallOptions) => self[name]({ ...request, vmId }, callOptions);
    }
    return bound as VmMethods;
  }

  async exportVm(request: RequestOf<"exportVm">, options: grpc.CallOptions = {}): Promise<Buffer> {
    const chunks: Uint8Array[] = [];
    for await (const chunk of this.exportVmChunks(request, options)) chunks.push(chunk);
    return Buffer.concat(chunks);
  }

  async *exportVmChunks(request: RequestOf<"exportVm">, options: grpc.CallOptions = {}): AsyncIterable<Uint8Array> {
    const stub = this.grpc as unknown as Record<string, Function>;
    const call: grpc.ClientReadableStream<ResponseOf<"exportVm">> = stub.exportVm.call(this.grpc, create(ExportVmRequestSchema, request), new grpc.Metadata(), options);
    try {
      for await (const message of call) yield (message as ResponseOf<"exportVm">).chunk;
    } catch (e) {
      throw isServiceError(e) ? IommufdError.from(e) : e;
    } finally {
      call.cancel();
    }
  }

  importVm(request: ImportVmArgs, options: grpc.CallOptions = {}): Promise<ResponseOf<"importVm">> {
    const stub = this.grpc as unknown as Record<string, Function>;
    return new Promise((resolve, reject) => {
      let answered = false;
      const call: grpc.ClientWritableStream<ImportVmRequest> = stub.importVm.call(this.grpc, new grpc.Metadata(), options, (err: grpc.ServiceError | null, response: ResponseOf<"importVm">) => {
        answered = true;
        if (err) reject(IommufdError.from(err));
        else resolve(response);
      });
      // Waits for room in the stream, or for the answer that ends it early (a refused import).
      const writable = () => new Promise<void>((done) => {
        const settle = () => {
          call.off("drain", settle).off("status", settle);
          done();
        };
        call.on("drain", settle).on("status", settle);
      });
      const send = async () => {
        let vmId = request.vmId ?? "";
        const source = request.snapshot instanceof Uint8Array ? [request.snapshot] : request.snapshot;
        for await (const piece of source) {
          for (let i = 0; i < piece.length; i += IMPORT_CHUNK_BYTES) {
            if (answered) return;
            const ok = call.write(create(ImportVmRequestSchema, { vmId, chunk: piece.subarray(i, i + IMPORT_CHUNK_BYTES) }));
            vmId = "";
            if (!ok) await writable();
          }
        }
        call.end();
      };
      send().catch((e: unknown) => {
        call.cancel();
        reject(e);
      });
    });
  }

  /** Resolves once the channel is connected (rejects after `timeoutMs`). */
  waitForReady(timeoutMs = 5000): Promise<void> {
    return new Promise((resolve, reject) => this.grpc.waitForReady(Date.now() + timeoutMs, (err) => (err ? reject(err) : resolve())));
  }

  close(): void {
    this.grpc.close();
  }
}
