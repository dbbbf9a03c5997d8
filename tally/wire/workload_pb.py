"""The SPIFFE Workload API messages, built at import time from a descriptor written here.

Rules / theory of operation:

1. The wire encoding is all that has to match the standard's ``workloadapi.proto``:
   message shapes, field numbers and types (``reference/spiffe-spec.md`` §5.1).
   Names of messages and of the proto package never reach the wire; gRPC method
   paths are written out by hand in the server and client
   (``/SpiffeWorkloadAPI/<Method>``).
2. The messages live in the proto package ``tally.workload``.  The standard's
   proto has no package, and py-spiffe registers its copy of it in the same
   default descriptor pool; without a package the two copies clash
   ("duplicate symbol 'X509SVIDRequest'") as soon as both load in one process.
3. There is no ``protoc`` step and no generated file: the descriptor below is
   the single source, so there is nothing to regenerate or to drift.
4. Only the X509 and JWT profiles are described.  The WIT-SVID profile is
   incubating, py-spiffe does not know it and Tally does not serve it (its
   RPCs get UNIMPLEMENTED like any unknown method), so its messages would be
   dead weight.

Under ``TYPE_CHECKING`` the classes are declared with the attributes they
really have, because protobuf ships no type information; at run time the names
are bound to the classes protobuf builds from the descriptor.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message,
    message_factory,
    struct_pb2,
)

PACKAGE = "tally.workload"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES}

# (message name, fields); a field is (name, number, type, repeated).  A type
# "map<string,V>" becomes the nested map-entry message proto3 maps are made of.
_MESSAGES: tuple[tuple[str, tuple[tuple[str, int, str, bool], ...]], ...] = (
    ("X509SVIDRequest", ()),
    (
        "X509SVIDResponse",
        (
            ("svids", 1, "X509SVID", True),
            ("crl", 2, "bytes", True),
            ("federated_bundles", 3, "map<string,bytes>", False),
        ),
    ),
    (
        "X509SVID",
        (
            ("spiffe_id", 1, "string", False),
            ("x509_svid", 2, "bytes", False),
            ("x509_svid_key", 3, "bytes", False),
            ("bundle", 4, "bytes", False),
            ("hint", 5, "string", False),
        ),
    ),
    ("X509BundlesRequest", ()),
    (
        "X509BundlesResponse",
        (
            ("crl", 1, "bytes", True),
            ("bundles", 2, "map<string,bytes>", False),
        ),
    ),
    (
        "JWTSVIDRequest",
        (
            ("audience", 1, "string", True),
            ("spiffe_id", 2, "string", False),
        ),
    ),
    ("JWTSVIDResponse", (("svids", 1, "JWTSVID", True),)),
    (
        "JWTSVID",
        (
            ("spiffe_id", 1, "string", False),
            ("svid", 2, "string", False),
            ("hint", 3, "string", False),
        ),
    ),
    ("JWTBundlesRequest", ()),
    ("JWTBundlesResponse", (("bundles", 1, "map<string,bytes>", False),)),
    (
        "ValidateJWTSVIDRequest",
        (
            ("audience", 1, "string", False),
            ("svid", 2, "string", False),
        ),
    ),
    (
        "ValidateJWTSVIDResponse",
        (
            ("spiffe_id", 1, "string", False),
            ("claims", 2, ".google.protobuf.Struct", False),
        ),
    ),
)


def _set_type(field: Any, type_name: str) -> None:
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    elif type_name.startswith("."):
        field.type = _F.TYPE_MESSAGE
        field.type_name = type_name
    else:
        field.type = _F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{type_name}"


def _file_descriptor() -> Any:
    proto = descriptor_pb2.FileDescriptorProto(
        name="tally/workload.proto",
        package=PACKAGE,
        syntax="proto3",
        # Importing struct_pb2 put this file in the default pool first.
        dependency=[struct_pb2.DESCRIPTOR.name],
    )
    for name, fields in _MESSAGES:
        message = proto.message_type.add(name=name)
        for field_name, number, type_name, repeated in fields:
            field = message.field.add(name=field_name, number=number)
            field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
            if type_name.startswith("map<"):
                # A proto3 map is a repeated field of a nested "<Name>Entry" message.
                key_type, value_type = type_name[4:-1].split(",")
                entry_name = "".join(p.capitalize() for p in field_name.split("_")) + "Entry"
                entry = message.nested_type.add(name=entry_name)
                entry.options.map_entry = True
                for entry_field, entry_number, entry_type in (
                    ("key", 1, key_type),
                    ("value", 2, value_type),
                ):
                    sub = entry.field.add(
                        name=entry_field, number=entry_number, label=_F.LABEL_OPTIONAL
                    )
                    _set_type(sub, entry_type)
                field.label = _F.LABEL_REPEATED
                _set_type(field, f"{name}.{entry_name}")
            else:
                _set_type(field, type_name)
    return proto


def _build() -> dict[str, Any]:
    pool = descriptor_pool.Default()
    pool.Add(_file_descriptor())
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name, _ in _MESSAGES
    }


if TYPE_CHECKING:

    class DecodeError(Exception):
        """Raised by ``FromString`` on bytes that are not a valid encoding."""

    class _Message:
        DESCRIPTOR: ClassVar[Any]

        def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...
        @classmethod
        def FromString(cls, data: bytes) -> Self: ...

    class X509SVIDRequest(_Message):
        def __init__(self) -> None: ...

    class X509SVID(_Message):
        spiffe_id: str
        x509_svid: bytes
        x509_svid_key: bytes
        bundle: bytes
        hint: str

        def __init__(
            self,
            *,
            spiffe_id: str = ...,
            x509_svid: bytes = ...,
            x509_svid_key: bytes = ...,
            bundle: bytes = ...,
            hint: str = ...,
        ) -> None: ...

    class X509SVIDResponse(_Message):
        @property
        def svids(self) -> MutableSequence[X509SVID]: ...
        @property
        def crl(self) -> MutableSequence[bytes]: ...
        @property
        def federated_bundles(self) -> MutableMapping[str, bytes]: ...
        def __init__(
            self,
            *,
            svids: Sequence[X509SVID] = ...,
            crl: Sequence[bytes] = ...,
            federated_bundles: Mapping[str, bytes] = ...,
        ) -> None: ...

    class X509BundlesRequest(_Message):
        def __init__(self) -> None: ...

    class X509BundlesResponse(_Message):
        @property
        def crl(self) -> MutableSequence[bytes]: ...
        @property
        def bundles(self) -> MutableMapping[str, bytes]: ...
        def __init__(
            self, *, crl: Sequence[bytes] = ..., bundles: Mapping[str, bytes] = ...
        ) -> None: ...

    class JWTSVIDRequest(_Message):
        spiffe_id: str

        @property
        def audience(self) -> MutableSequence[str]: ...
        def __init__(self, *, audience: Sequence[str] = ..., spiffe_id: str = ...) -> None: ...

    class JWTSVID(_Message):
        spiffe_id: str
        svid: str
        hint: str

        def __init__(self, *, spiffe_id: str = ..., svid: str = ..., hint: str = ...) -> None: ...

    class JWTSVIDResponse(_Message):
        @property
        def svids(self) -> MutableSequence[JWTSVID]: ...
        def __init__(self, *, svids: Sequence[JWTSVID] = ...) -> None: ...

    class JWTBundlesRequest(_Message):
        def __init__(self) -> None: ...

    class JWTBundlesResponse(_Message):
        @property
        def bundles(self) -> MutableMapping[str, bytes]: ...
        def __init__(self, *, bundles: Mapping[str, bytes] = ...) -> None: ...

    class ValidateJWTSVIDRequest(_Message):
        audience: str
        svid: str

        def __init__(self, *, audience: str = ..., svid: str = ...) -> None: ...

    class ValidateJWTSVIDResponse(_Message):
        spiffe_id: str

        @property
        def claims(self) -> Any: ...  # google.protobuf.Struct, untyped upstream
        def __init__(self, *, spiffe_id: str = ..., claims: Any = ...) -> None: ...

else:
    DecodeError = message.DecodeError
    _CLASSES = _build()
    X509SVIDRequest = _CLASSES["X509SVIDRequest"]
    X509SVIDResponse = _CLASSES["X509SVIDResponse"]
    X509SVID = _CLASSES["X509SVID"]
    X509BundlesRequest = _CLASSES["X509BundlesRequest"]
    X509BundlesResponse = _CLASSES["X509BundlesResponse"]
    JWTSVIDRequest = _CLASSES["JWTSVIDRequest"]
    JWTSVIDResponse = _CLASSES["JWTSVIDResponse"]
    JWTSVID = _CLASSES["JWTSVID"]
    JWTBundlesRequest = _CLASSES["JWTBundlesRequest"]
    JWTBundlesResponse = _CLASSES["JWTBundlesResponse"]
    ValidateJWTSVIDRequest = _CLASSES["ValidateJWTSVIDRequest"]
    ValidateJWTSVIDResponse = _CLASSES["ValidateJWTSVIDResponse"]
