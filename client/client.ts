import { create, fromBinary, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { ErrorInfoSchema, type QuotaFailure, QuotaFailureSchema } from "../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../gen/google/rpc/status_pb.js";
import { IommufdService } from "../gen/iommufd/v1/service_pb.js";
import { serviceDefinition } from "../server/rpc/bridge.js";

/**
 * A typed client of iommufd.v1.IommufdService: one promise method per RPC
 * (createVm, mapIoas, ...) taking the request's init shape, and failures as
 * IommufdError carrying the gRPC code and the kernel errno.
 */

type Methods = typeof IommufdService.method;
export type RpcName = keyof Methods;
export type RequestOf<K extends RpcName> = MessageInitShape<Methods[K]["input"]>;
export type ResponseOf<K extends RpcName> = MessageShape<Methods[K]["output"]>;

export type IommufdMethods = {
  [K in RpcName]: (request: RequestOf<K>, options?: grpc.CallOptions) => Promise<ResponseOf<K>>;
};

/** The same methods with vm_id bound (see IommufdClient.vm()). */
export type VmMethods = {
  [K in RpcName]: (request?: Omit<RequestOf<K>, "vmId">, options?: grpc.CallOptions) => Promise<ResponseOf<K>>;
};

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
    for (const method of IommufdService.methods) {
      bound[method.localName] = (request: object = {}, callOptions?: grpc.CallOptions) => self[method.localName]({ ...request, vmId }, callOptions);
    }
    return bound as VmMethods;
  }

  /** Resolves once the channel is connected (rejects after `timeoutMs`). */
  waitForReady(timeoutMs = 5000): Promise<void> {
    return new Promise((resolve, reject) => this.grpc.waitForReady(Date.now() + timeoutMs, (err) => (err ? reject(err) : resolve())));
  }

  close(): void {
    this.grpc.close();
  }
}
