"""The RPCs the gateway serves, read from the generated viper.v1 descriptors (nothing listed by hand)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from viper_proto.v1 import generation_pb2, metric_pb2, profile_pb2

_MODULES = (profile_pb2, generation_pb2, metric_pb2)

# Calls that change nothing on the server: when their back end is unavailable before answering anything,
# the gateway may try the next one (see backends.Backends.order).
_READ_ONLY = frozenset({
    "/viper.v1.ProfileService/GetProfile",
    "/viper.v1.ProfileService/ListProfiles",
    "/viper.v1.ProfileService/ListProfileVersions",
    "/viper.v1.ProfileService/ExportProfile",
    "/viper.v1.GenerationService/Generate",
    "/viper.v1.MetricService/Score",
})


@dataclass(frozen=True)
class Method:
    path: str  # "/viper.v1.ProfileService/GetProfile", the HTTP path and the gRPC method alike
    input: type[Message]
    output: type[Message]
    server_streaming: bool

    @property
    def read_only(self) -> bool:
        return self.path in _READ_ONLY

    @functools.cached_property
    def carries_images(self) -> bool:
        """Whether requests hold bytes fields (image or archive bytes: ExtractProfile, Score, AddRatings,
        ImportProfile): only those get the large body limit. Walked once per method, not per call."""
        return _has_bytes(self.input.DESCRIPTOR, set())


def _has_bytes(descriptor: Descriptor, seen: set[str]) -> bool:
    seen.add(descriptor.full_name)
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_BYTES:
            return True
        if field.message_type is not None and field.message_type.full_name not in seen:
            if _has_bytes(field.message_type, seen):
                return True
    return False


def _methods() -> dict[str, Method]:
    methods = {}
    for module in _MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for rpc in service.methods:
                if rpc.client_streaming:  # none today; Connect over HTTP/1.1 could not carry them anyway
                    continue
                path = f"/{service.full_name}/{rpc.name}"
                methods[path] = Method(
                    path=path,
                    input=message_factory.GetMessageClass(rpc.input_type),
                    output=message_factory.GetMessageClass(rpc.output_type),
                    server_streaming=rpc.server_streaming,
                )
    return methods


METHODS: dict[str, Method] = _methods()
