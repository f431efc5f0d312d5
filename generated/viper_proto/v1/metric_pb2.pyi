from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("user_id", "queries", "liked", "disliked")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    LIKED_FIELD_NUMBER: _ClassVar[int]
    DISLIKED_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    queries: _containers.RepeatedScalarFieldContainer[bytes]
    liked: _containers.RepeatedScalarFieldContainer[bytes]
    disliked: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, user_id: _Optional[str] = ..., queries: _Optional[_Iterable[bytes]] = ..., liked: _Optional[_Iterable[bytes]] = ..., disliked: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("index", "score", "pairs_used")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PAIRS_USED_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    pairs_used: int
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., pairs_used: _Optional[int] = ...) -> None: ...
