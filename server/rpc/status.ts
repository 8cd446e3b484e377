import { create, toBinary } from "@bufbuild/protobuf";
import { anyPack } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { ErrorInfoSchema, QuotaFailureSchema } from "../../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../gen/google/rpc/status_pb.js";
import { ERRNO, type Errno, IommuError } from "../core/errno.js";
import { QuotaError } from "../core/limits.js";

/** google.rpc.ErrorInfo.domain of every error this service returns. */
export const ERROR_DOMAIN = "iommufd.v1";

/** The gRPC code for each errno (api.md "Errors"). */
const GRPC_CODE: Record<Errno, grpc.status> = {
  EINVAL: grpc.status.INVALID_ARGUMENT,
  E2BIG: grpc.status.INVALID_ARGUMENT,
  EIO: grpc.status.INVALID_ARGUMENT,
  EMSGSIZE: grpc.status.INVALID_ARGUMENT,
  ENOENT: grpc.status.NOT_FOUND,
  EEXIST: grpc.status.ALREADY_EXISTS,
  EBUSY: grpc.status.FAILED_PRECONDITION,
  EADDRINUSE: grpc.status.FAILED_PRECONDITION,
  ENODEV: grpc.status.FAILED_PRECONDITION,
  EOPNOTSUPP: grpc.status.UNIMPLEMENTED,
  EFAULT: grpc.status.OUT_OF_RANGE,
  EOVERFLOW: grpc.status.OUT_OF_RANGE,
  ENOSPC: grpc.status.RESOURCE_EXHAUSTED,
  ENOMEM: grpc.status.RESOURCE_EXHAUSTED,
  EDQUOT: grpc.status.RESOURCE_EXHAUSTED,
  EPERM: grpc.status.PERMISSION_DENIED,
};

export function grpcCodeOf(errno: Errno): grpc.status {
  return GRPC_CODE[errno];
}

/**
 * An IommuError as a gRPC status: the code of its errno, its message, and a
 * google.rpc.Status carrying one ErrorInfo (reason = errno name, metadata
 * errno = its number, plus entries_handled for IOMMU_HWPT_INVALIDATE).
 */
export function iommuErrorStatus(error: IommuError): Partial<grpc.StatusObject> {
  const metadata: Record<string, string> = { errno: String(ERRNO[error.errno]) };
  if (error.entriesHandled !== undefined) metadata.entries_handled = String(error.entriesHandled);
  const code = GRPC_CODE[error.errno];
  const details = [anyPack(ErrorInfoSchema, create(ErrorInfoSchema, { reason: error.errno, domain: ERROR_DOMAIN, metadata }))];
  if (error instanceof QuotaError) details.push(anyPack(QuotaFailureSchema, create(QuotaFailureSchema, { violations: [error.violation] })));
  const status = create(StatusSchema, { code, message: error.message, details });
  const trailers = new grpc.Metadata();
  trailers.set("grpc-status-details-bin", Buffer.from(toBinary(StatusSchema, status)));
  return { code, details: error.message, metadata: trailers };
}

/**
 * Any failure of a handler as a status. IommuErrors carry their errno
 * (malformed and oversize requests arrive as such); anything else is a bug,
 * reported as INTERNAL and logged by `onBug`.
 */
export function toStatus(error: unknown, onBug: (error: unknown) => void): Partial<grpc.StatusObject> {
  if (error instanceof IommuError) return iommuErrorStatus(error);
  onBug(error);
  return { code: grpc.status.INTERNAL, details: "internal error" };
}
