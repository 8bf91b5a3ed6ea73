# Generated from registry.proto by common/registry_proto/generate.sh (grpcio-tools 1.80.1).
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelRef(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("run", "round", "size", "sha256", "best", "latest")
    RUN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    run: str
    round: int
    size: int
    sha256: str
    best: bool
    latest: bool
    def __init__(self, run: _Optional[str] = ..., round: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., best: bool = ..., latest: bool = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class Card(_message.Message):
    __slots__ = ("run", "round", "card_json")
    RUN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    run: str
    round: int
    card_json: str
    def __init__(self, run: _Optional[str] = ..., round: _Optional[int] = ..., card_json: _Optional[str] = ...) -> None: ...

class DownloadMetadata(_message.Message):
    __slots__ = ("run", "round", "size", "sha256", "card_json")
    RUN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    run: str
    round: int
    size: int
    sha256: str
    card_json: str
    def __init__(self, run: _Optional[str] = ..., round: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., card_json: _Optional[str] = ...) -> None: ...

class DownloadChunk(_message.Message):
    __slots__ = ("metadata", "data")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    metadata: DownloadMetadata
    data: bytes
    def __init__(self, metadata: _Optional[_Union[DownloadMetadata, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
