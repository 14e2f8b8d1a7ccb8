from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_AMBIENT: _ClassVar[Priority]
    PRIORITY_PLAYER: _ClassVar[Priority]

class Segmentation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEGMENTATION_NONE: _ClassVar[Segmentation]
    SEGMENTATION_SENTENCE: _ClassVar[Segmentation]
    SEGMENTATION_CLAUSE: _ClassVar[Segmentation]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_DEADLINE: _ClassVar[FinishReason]
    FINISH_REASON_PREEMPTED: _ClassVar[FinishReason]

class LoadStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOAD_STATUS_UNSPECIFIED: _ClassVar[LoadStatus]
    LOAD_STATUS_READY: _ClassVar[LoadStatus]
    LOAD_STATUS_ERROR: _ClassVar[LoadStatus]
    LOAD_STATUS_STALE: _ClassVar[LoadStatus]
    LOAD_STATUS_RETIRING: _ClassVar[LoadStatus]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_AMBIENT: Priority
PRIORITY_PLAYER: Priority
SEGMENTATION_NONE: Segmentation
SEGMENTATION_SENTENCE: Segmentation
SEGMENTATION_CLAUSE: Segmentation
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_DEADLINE: FinishReason
FINISH_REASON_PREEMPTED: FinishReason
LOAD_STATUS_UNSPECIFIED: LoadStatus
LOAD_STATUS_READY: LoadStatus
LOAD_STATUS_ERROR: LoadStatus
LOAD_STATUS_STALE: LoadStatus
LOAD_STATUS_RETIRING: LoadStatus

class Turn(_message.Message):
    __slots__ = ("speaker", "text")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    speaker: str
    text: str
    def __init__(self, speaker: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class SamplingOverrides(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class SayRequest(_message.Message):
    __slots__ = ("request_id", "persona", "npc_id", "speaker", "line", "history", "context", "sampling", "priority", "deadline_ms", "structured", "actions", "response_format", "conversation", "segmentation")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    NPC_ID_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEGMENTATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    persona: str
    npc_id: str
    speaker: str
    line: str
    history: _containers.RepeatedCompositeFieldContainer[Turn]
    context: _containers.ScalarMap[str, str]
    sampling: SamplingOverrides
    priority: Priority
    deadline_ms: int
    structured: bool
    actions: _containers.RepeatedCompositeFieldContainer[ActionSpec]
    response_format: str
    conversation: str
    segmentation: Segmentation
    def __init__(self, request_id: _Optional[str] = ..., persona: _Optional[str] = ..., npc_id: _Optional[str] = ..., speaker: _Optional[str] = ..., line: _Optional[str] = ..., history: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., context: _Optional[_Mapping[str, str]] = ..., sampling: _Optional[_Union[SamplingOverrides, _Mapping]] = ..., priority: _Optional[_Union[Priority, str]] = ..., deadline_ms: _Optional[int] = ..., structured: _Optional[bool] = ..., actions: _Optional[_Iterable[_Union[ActionSpec, _Mapping]]] = ..., response_format: _Optional[str] = ..., conversation: _Optional[str] = ..., segmentation: _Optional[_Union[Segmentation, str]] = ...) -> None: ...

class ActionSpec(_message.Message):
    __slots__ = ("name", "description", "args_schema_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ARGS_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    args_schema_json: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., args_schema_json: _Optional[str] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class Tick(_message.Message):
    __slots__ = ("tick", "requests", "cancels")
    TICK_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CANCELS_FIELD_NUMBER: _ClassVar[int]
    tick: int
    requests: _containers.RepeatedCompositeFieldContainer[SayRequest]
    cancels: _containers.RepeatedCompositeFieldContainer[Cancel]
    def __init__(self, tick: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[SayRequest, _Mapping]]] = ..., cancels: _Optional[_Iterable[_Union[Cancel, _Mapping]]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("request_id", "started", "delta", "finished", "error", "action", "emotion", "duplicate", "sentence")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    EMOTION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    started: Started
    delta: TextDelta
    finished: Finished
    error: Error
    action: Action
    emotion: Emotion
    duplicate: Duplicate
    sentence: Sentence
    def __init__(self, request_id: _Optional[str] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., delta: _Optional[_Union[TextDelta, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., action: _Optional[_Union[Action, _Mapping]] = ..., emotion: _Optional[_Union[Emotion, _Mapping]] = ..., duplicate: _Optional[_Union[Duplicate, _Mapping]] = ..., sentence: _Optional[_Union[Sentence, _Mapping]] = ...) -> None: ...

class Sentence(_message.Message):
    __slots__ = ("index", "text")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class Duplicate(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("name", "args_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    args_json: str
    def __init__(self, name: _Optional[str] = ..., args_json: _Optional[str] = ...) -> None: ...

class Emotion(_message.Message):
    __slots__ = ("label",)
    LABEL_FIELD_NUMBER: _ClassVar[int]
    label: str
    def __init__(self, label: _Optional[str] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("queue_position",)
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    queue_position: int
    def __init__(self, queue_position: _Optional[int] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queued_ms", "first_token_ms", "total_ms")
    QUEUED_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queued_ms: float
    first_token_ms: float
    total_ms: float
    def __init__(self, queued_ms: _Optional[float] = ..., first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("reason", "text", "prompt_tokens", "completion_tokens", "timings", "json", "action", "emotion", "cached_prompt_tokens", "history_turns")
    REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    EMOTION_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TURNS_FIELD_NUMBER: _ClassVar[int]
    reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    json: str
    action: Action
    emotion: Emotion
    cached_prompt_tokens: int
    history_turns: int
    def __init__(self, reason: _Optional[_Union[FinishReason, str]] = ..., text: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., json: _Optional[str] = ..., action: _Optional[_Union[Action, _Mapping]] = ..., emotion: _Optional[_Union[Emotion, _Mapping]] = ..., cached_prompt_tokens: _Optional[int] = ..., history_turns: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "status", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    status: str
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., status: _Optional[str] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class ListPersonasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPersonasResponse(_message.Message):
    __slots__ = ("personas",)
    PERSONAS_FIELD_NUMBER: _ClassVar[int]
    personas: _containers.RepeatedCompositeFieldContainer[Persona]
    def __init__(self, personas: _Optional[_Iterable[_Union[Persona, _Mapping]]] = ...) -> None: ...

class GetPersonaRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("path", "rank", "alpha", "target_modules", "resident")
    PATH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    path: str
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    resident: bool
    def __init__(self, path: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., resident: _Optional[bool] = ...) -> None: ...

class Persona(_message.Message):
    __slots__ = ("id", "display_name", "description", "adapter", "metadata", "status", "error", "source")
    ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    display_name: str
    description: str
    adapter: AdapterInfo
    metadata: _struct_pb2.Struct
    status: LoadStatus
    error: str
    source: str
    def __init__(self, id: _Optional[str] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., status: _Optional[_Union[LoadStatus, str]] = ..., error: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ReloadPersonasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadPersonasResponse(_message.Message):
    __slots__ = ("personas", "errors")
    PERSONAS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    personas: _containers.RepeatedCompositeFieldContainer[Persona]
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, personas: _Optional[_Iterable[_Union[Persona, _Mapping]]] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class ConversationRef(_message.Message):
    __slots__ = ("conversation", "persona")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    conversation: str
    persona: str
    def __init__(self, conversation: _Optional[str] = ..., persona: _Optional[str] = ...) -> None: ...

class ConversationTurn(_message.Message):
    __slots__ = ("speaker", "text", "npc")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NPC_FIELD_NUMBER: _ClassVar[int]
    speaker: str
    text: str
    npc: bool
    def __init__(self, speaker: _Optional[str] = ..., text: _Optional[str] = ..., npc: _Optional[bool] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("conversation", "persona", "turns", "summary", "summarized_turns")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SUMMARIZED_TURNS_FIELD_NUMBER: _ClassVar[int]
    conversation: str
    persona: str
    turns: _containers.RepeatedCompositeFieldContainer[ConversationTurn]
    summary: str
    summarized_turns: int
    def __init__(self, conversation: _Optional[str] = ..., persona: _Optional[str] = ..., turns: _Optional[_Iterable[_Union[ConversationTurn, _Mapping]]] = ..., summary: _Optional[str] = ..., summarized_turns: _Optional[int] = ...) -> None: ...

class ListConversationsRequest(_message.Message):
    __slots__ = ("persona",)
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    persona: str
    def __init__(self, persona: _Optional[str] = ...) -> None: ...

class ConversationInfo(_message.Message):
    __slots__ = ("conversation", "persona", "turns", "updated_unix_s")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    conversation: str
    persona: str
    turns: int
    updated_unix_s: float
    def __init__(self, conversation: _Optional[str] = ..., persona: _Optional[str] = ..., turns: _Optional[int] = ..., updated_unix_s: _Optional[float] = ...) -> None: ...

class ListConversationsResponse(_message.Message):
    __slots__ = ("conversations",)
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    conversations: _containers.RepeatedCompositeFieldContainer[ConversationInfo]
    def __init__(self, conversations: _Optional[_Iterable[_Union[ConversationInfo, _Mapping]]] = ...) -> None: ...

class AddTurnsRequest(_message.Message):
    __slots__ = ("ref", "turns")
    REF_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    ref: ConversationRef
    turns: _containers.RepeatedCompositeFieldContainer[ConversationTurn]
    def __init__(self, ref: _Optional[_Union[ConversationRef, _Mapping]] = ..., turns: _Optional[_Iterable[_Union[ConversationTurn, _Mapping]]] = ...) -> None: ...

class ExportConversationsRequest(_message.Message):
    __slots__ = ("persona",)
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    persona: str
    def __init__(self, persona: _Optional[str] = ...) -> None: ...

class ConversationsBlob(_message.Message):
    __slots__ = ("data", "conversations")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    conversations: int
    def __init__(self, data: _Optional[bytes] = ..., conversations: _Optional[int] = ...) -> None: ...

class ImportConversationsRequest(_message.Message):
    __slots__ = ("data", "replace")
    DATA_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    replace: bool
    def __init__(self, data: _Optional[bytes] = ..., replace: _Optional[bool] = ...) -> None: ...

class ImportConversationsResponse(_message.Message):
    __slots__ = ("conversations",)
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    conversations: int
    def __init__(self, conversations: _Optional[int] = ...) -> None: ...
