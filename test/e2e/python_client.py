"""An independent client of iommufd.v1.IommufdService: Python's C-core gRPC.

Usage: python_client.py TARGET DESCRIPTOR_SET

Message classes come from DESCRIPTOR_SET (a FileDescriptorSet built by
`buf build`), so nothing here encodes protobuf by hand. Prints one JSON object
with each response (proto field names, uint64 as strings) and the decoded
error of a call that must fail.
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

SERVICE = "iommufd.v1.IommufdService"


def load_pool(path):
    with open(path, "rb") as f:
        fds = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    # buf emits files in dependency order, as the pool requires.
    for file in fds.file:
        pool.AddSerializedFile(file.SerializeToString())
    return pool


def message_class_getter(pool):
    # protobuf >= 4.21 has GetMessageClass; Debian's 3.21 only the factory.
    get = getattr(message_factory, "GetMessageClass", None)
    if get is None:
        get = message_factory.MessageFactory(pool).GetPrototype
    return lambda name: get(pool.FindMessageTypeByName(name))


def to_dict(message):
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def main():
    target, descriptor_set = sys.argv[1:3]
    pool = load_pool(descriptor_set)
    message_class = message_class_getter(pool)
    service = pool.FindServiceByName(SERVICE)

    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)

        def call(method, **fields):
            desc = service.methods_by_name[method]
            request_class = message_class(desc.input_type.full_name)
            response_class = message_class(desc.output_type.full_name)
            stub = channel.unary_unary(
                f"/{SERVICE}/{method}",
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            return stub(json_format.ParseDict(fields, request_class()), timeout=10)

        result = {
            "create_vm": to_dict(call("CreateVm", vm_id="py", model="IOMMU_MODEL_MOCK", guest_memory_bytes=str(16 << 20))),
            "alloc_ioas": to_dict(call("AllocIoas", vm_id="py")),
            "map_ioas": to_dict(call("MapIoas", vm_id="py", ioas_id=1, user_va="0", length=str(1 << 20), readable=True, writeable=True)),
        }

        try:
            call("MapIoas", vm_id="py", ioas_id=99, user_va="0", length="4096", readable=True)
            result["error"] = None
        except grpc.RpcError as e:
            result["error"] = decode_error(e, message_class)

    json.dump(result, sys.stdout)


def decode_error(error, message_class):
    details = [v for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin"]
    decoded = {"code": error.code().name, "details_count": len(details), "error_info": []}
    if details:
        status = message_class("google.rpc.Status").FromString(details[0])
        decoded["status_code"] = status.code
        error_info_class = message_class("google.rpc.ErrorInfo")
        for any_detail in status.details:
            if any_detail.type_url == "type.googleapis.com/google.rpc.ErrorInfo":
                decoded["error_info"].append(to_dict(error_info_class.FromString(any_detail.value)))
    return decoded


if __name__ == "__main__":
    main()
