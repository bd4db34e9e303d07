"""Every message on the wire, defined once.

These Structs are the single source of truth for the protocol: the server
decodes requests with them, the client decodes results with them, and
``protocol/schema.json`` is generated from them (``python -m mlx_worker.schema``).
Contract names are fixed; new optional fields may be added. Spec: protocol/README.md is the prose.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

PROTOCOL_VERSION = "1.0"

RequestId = Union[int, str]

# Value bounds live in the types: decoding refuses a value outside them with
# -32602 naming the field, and schema.json carries them. Counts that reach
# MLX as indices or slice bounds are 32-bit there; byte sizes and other counts
# stay within int64 (what a C++ host and MLX's own integers hold).
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
Count = Annotated[int, Meta(ge=0, le=INT64_MAX)]
PositiveCount = Annotated[int, Meta(ge=1, le=INT64_MAX)]
StepSize = Annotated[int, Meta(ge=1, le=INT32_MAX)]  # tokens per prefill chunk
NumDraftTokens = Annotated[int, Meta(ge=0, le=32)]  # draft tokens per speculative step; 0: no draft
TokenId = Annotated[int, Meta(ge=0, le=INT32_MAX)]  # < vocab_size is checked per model
# logit_bias keys: a token id written in ASCII decimal digits, nothing else.
TokenIdKey = Annotated[str, Meta(pattern="^[0-9]{1,10}$")]
StopString = Annotated[str, Meta(min_length=1)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
DRY_BREAKERS = ("\n", ":", "\"", "*")  # llama.cpp's default dry_sequence_breakers
DryBreaker = Annotated[str, Meta(min_length=1, max_length=40)]  # llama.cpp cuts breakers at 40 characters


class Params(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base for request params: a misspelt field is an error, not ignored."""


class Out(Struct, omit_defaults=True):
    """Base for results and events."""


# ----------------------------------------------------------------- envelope


class Envelope(Struct):
    """A request line before its params are validated against its method."""

    jsonrpc: Any = UNSET
    method: Any = UNSET
    id: Union[int, str, None, UnsetType] = UNSET
    params: Union[Raw, UnsetType] = UNSET


class ErrorObject(Out):
    code: int
    message: str
    data: Any = UNSET


class Response(Struct):
    id: Union[int, str, None]
    result: Any
    jsonrpc: str = "2.0"


class ErrorResponse(Struct):
    id: Union[int, str, None]
    error: ErrorObject
    jsonrpc: str = "2.0"


def error_response(id: Union[int, str, None], code: int, message: str, data: Any = None) -> ErrorResponse:
    """The one way an error reply is built (``data`` left out when None)."""
    error = ErrorObject(code=code, message=message)
    if data is not None:
        error.data = data
    return ErrorResponse(id=id, error=error)


class Notification(Struct):
    method: str
    params: Any
    jsonrpc: str = "2.0"


# ------------------------------------------------------------ chat messages


class TextPart(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    text: str


class ImagePart(Struct, tag="image", tag_field="type", forbid_unknown_fields=True):
    """An image: a data URL, raw base64, or an absolute file path."""

    image: str


ContentPart = Union[TextPart, ImagePart]


class ChatMessage(Params):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Union[str, None] = None
    tool_calls: Union[list[dict[str, Any]], None] = None
    tool_call_id: Union[str, None] = None
    reasoning_content: Union[str, None] = None


# -------------------------------------------------------------------- tools


class ToolFunction(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """An OpenAI-style function definition; `parameters` is a JSON Schema."""

    name: Annotated[str, Meta(pattern="^[A-Za-z0-9_-]{1,64}$")]
    description: Union[str, None] = None
    parameters: Union[dict[str, Any], None] = None
    strict: Union[bool, None] = None


class Tool(Struct, forbid_unknown_fields=True, omit_defaults=True):
    function: ToolFunction
    type: Literal["function"] = "function"


class ToolChoiceName(Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Force a call of one tool: `{"name": ...}`, or OpenAI's
    `{"type": "function", "function": {"name": ...}}`."""

    name: Union[str, None] = None
    type: Union[Literal["function"], None] = None
    function: Union[ToolChoiceName, None] = None


ToolChoice = Union[Literal["auto", "required", "none"], NamedToolChoice]

# Which part of the answer a token event's text belongs to.
Channel = Literal["content", "reasoning", "tool_call", "marker"]


class ToolCall(Out):
    """A complete tool call, parsed with the model family's own parser."""

    id: str
    name: str
    arguments: Any  # parsed JSON (an object for every schema-constrained call)


class InvalidToolCall(Out):
    """A tool call that must not be run: cut short (`incomplete`: max_tokens,
    a stop string or cancel ended it) or not parseable (`unparsable`: only
    possible for calls made without a tool grammar)."""

    id: str
    text: str
    reason: Literal["incomplete", "unparsable"]
    error: str = ""


# -------------------------------------------------------------------- ready


class Capabilities(Out):
    methods: list[str]
    max_line_bytes: int
    batch: bool
    constraints: list[str]
    constraint_engines: list[str]
    vision: bool
    blas: Union[str, None] = None
    distributed: Union[DistributedCapabilities, None] = None


class DistributedCapabilities(Out):
    """``load {parallel}``: the backends this build can start, and this
    worker's group once one exists (its size; why it failed)."""

    backends: list[str]
    ranks: Union[int, None] = None
    failure: Union[str, None] = None


class ReadyEvent(Out):
    protocol_version: str
    worker_version: str
    mlx_version: str
    device: str
    capabilities: Capabilities
    pid: int


# --------------------------------------------------------------------- load


class ParallelParams(Params):
    """Run the model over several processes (ranks) with mlx.distributed;
    this worker is rank 0 and starts the others."""

    mode: Literal["tensor", "pipeline"]
    ranks: Union[Annotated[int, Meta(ge=2, le=64)], None] = None  # processes on this machine
    # "host:port" per rank, rank 0 (this machine) first: the ring's hostfile.
    hosts: Union[Annotated[list[Annotated[str, Meta(pattern="^[^\\s:]+:[0-9]{1,5}$")]], Meta(min_length=2, max_length=64)], None] = None
    backend: Literal["ring"] = "ring"
    # A rank that sends no heartbeat this long is taken for hung.
    timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 10.0


class ParallelStatus(Out):
    mode: str
    backend: str
    ranks: int
    pids: list[int]  # rank 0 (this worker) first
    layers: list[int]  # layers each rank holds (all of them in tensor mode)


class LoadParams(Params):
    model: str
    model_id: Union[str, None] = None
    trust_remote_code: bool = False
    chat_template: Union[str, None] = None
    max_kv_size: Union[Annotated[int, Meta(ge=1, le=INT32_MAX)], None] = None
    prefill_step_size: Union[StepSize, None] = None
    prompt_cache_bytes: Union[Count, None] = None  # 0 disables the prompt cache
    prompt_cache_entries: Union[Count, None] = None  # 0 disables the prompt cache
    memory_limit: Union[PositiveCount, None] = None  # bytes: this model's weights + any one request
    # Vision models only (ignored for text models); None = the worker's default.
    max_images: Union[PositiveCount, None] = None
    max_image_pixels: Union[PositiveCount, None] = None
    max_image_bytes: Union[PositiveCount, None] = None
    image_cache_bytes: Union[Count, None] = None
    # A quantized KV cache from the first token (protocol/README.md, "Quantized KV cache").
    # mlx quantizes in groups of 32, 64 or 128; the group must divide the head dim (checked per model).
    kv_bits: Union[Literal[4, 8], None] = None
    kv_group_size: Union[Literal[32, 64, 128], None] = None  # default 64; needs kv_bits
    # Speculative decoding defaults for this model's generates (see GenerateParams).
    draft_model_id: Union[str, None] = None
    num_draft_tokens: Union[NumDraftTokens, None] = None
    parallel: Union[ParallelParams, None] = None
    # An embedding model (for `embed`, never `generate`): None detects it from
    # the folder (sentence-transformers files, an encoder architecture).
    embedding: Union[bool, None] = None

    # The prompt cache's disk tier ("Prompt cache on disk"): a folder and its byte budget;
    # None = the worker's --cache-dir / --cache-dir-bytes (default: no disk tier).
    cache_dir: Union[str, None] = None
    cache_dir_bytes: Union[Count, None] = None


ModelKind = Literal["text", "vision", "embedding"]
Priority = Literal["interactive", "background"]


class LoadResult(Out):
    model_id: str
    kind: ModelKind
    context_length: Union[int, None]
    vocab_size: int
    path: str
    eos_token_ids: list[int]
    has_chat_template: bool
    memory_bytes: int
    load_ms: float
    already_loaded: bool = False
    kv_bits: Union[int, None] = None
    kv_group_size: Union[int, None] = None
    # The family's tool-call format (e.g. "json_tools", "mistral", "harmony";
    # the spec's family table) and reasoning markers, as detected from the tokenizer.
    tool_call_format: Union[str, None] = None
    tool_grammar: bool = False  # calls can be constrained for this format
    reasoning_markers: Union[list[str], None] = None
    chat_template_names: Union[list[str], None] = None  # a named template list (`default`, `tool_use`, ...)
    parallel: Union[ParallelStatus, None] = None  # a distributed load's ranks
    # Embedding models: the vector size and how hidden states are pooled.
    embedding_dimensions: Union[int, None] = None
    pooling: Union[Literal["last_token", "mean", "cls", "max"], None] = None


LoadPhase = Literal["checks", "tokenizer", "weights", "vision_tower"]


class LoadProgressEvent(Out):
    """A load's progress: ``done`` of ``total`` within ``phase`` (bytes for
    weights and vision_tower, steps otherwise), never decreasing."""

    id: RequestId
    phase: LoadPhase
    done: Count
    total: Count


class UnloadParams(Params):
    model_id: Union[str, None] = None


class UnloadResult(Out):
    model_id: str
    unloaded: bool


# ----------------------------------------------------------------- tokenize


class TokenizeParams(Params):
    model_id: Union[str, None] = None
    text: Union[str, None] = None
    messages: Union[list[ChatMessage], None] = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    chat_template_kwargs: dict[str, Any] = {}
    tools: Union[list[Tool], None] = None


class TokenizeResult(Out):
    tokens: list[int]
    count: int
    prompt: Union[str, None] = None


class DetokenizeParams(Params):
    tokens: list[TokenId]
    model_id: Union[str, None] = None


class DetokenizeResult(Out):
    text: str


# ----------------------------------------------------------------- generate


class JsonSchemaConstraint(Struct, tag="json_schema", tag_field="type", forbid_unknown_fields=True):
    schema: Any
    engine: Union[Literal["llguidance", "outlines"], None] = None


class RegexConstraint(Struct, tag="regex", tag_field="type", forbid_unknown_fields=True):
    pattern: str
    engine: Union[Literal["llguidance", "outlines"], None] = None


class ChoiceConstraint(Struct, tag="choice", tag_field="type", forbid_unknown_fields=True):
    options: list[str]
    engine: Union[Literal["llguidance", "outlines"], None] = None


class GrammarConstraint(Struct, tag="grammar", tag_field="type", forbid_unknown_fields=True):
    lark: str
    engine: Union[Literal["llguidance", "outlines"], None] = None


Constraint = Union[JsonSchemaConstraint, RegexConstraint, ChoiceConstraint, GrammarConstraint]


class PromptParams(Params):
    """A prompt, as `generate` and `cache_save` take it: exactly one of
    `prompt`, `tokens`, `messages`."""

    model_id: Union[str, None] = None
    prompt: Union[str, None] = None
    tokens: Union[list[TokenId], None] = None
    messages: Union[list[ChatMessage], None] = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    chat_template_kwargs: dict[str, Any] = {}
    tools: Union[list[Tool], None] = None  # passed to the chat template


class GenerateParams(PromptParams):
    max_tokens: Count = 256
    # 1/temperature must stay nonzero in float16 logits: rounded to 0, it turns
    # masked (-inf) tokens into NaN and the sampler picks any of them.
    temperature: Annotated[float, Meta(ge=0.0, le=1e4)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0, le=INT32_MAX)] = 0  # 0: off; < vocab_size checked per model
    min_p: Probability = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0)] = 1.0
    repetition_context_size: Annotated[int, Meta(ge=1, le=INT32_MAX)] = 20
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[TokenIdKey, float] = {}
    seed: Union[Annotated[int, Meta(ge=0)], None] = None  # JSON integers stop at 2^64 - 1
    stop: Union[StopString, list[StopString]] = []
    stop_token_ids: list[TokenId] = []
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] = 0
    prompt_cache: bool = True
    prefill_step_size: Union[StepSize, None] = None
    constraint: Union[Constraint, None] = None
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True  # false: at most one call in the output (OpenAI's field)
    # Speculative decoding: a loaded model over the same tokenizer proposes
    # num_draft_tokens tokens per step and this model verifies them. None: the
    # load's defaults; num_draft_tokens 0 turns a load's default draft off.
    draft_model_id: Union[str, None] = None
    num_draft_tokens: Union[NumDraftTokens, None] = None
    # false: draft num_draft_tokens every round; true: num_draft_tokens is the
    # most, the draft length follows the acceptance (protocol/README.md).
    draft_adaptive: bool = True
    # XTC and DRY, with llama.cpp's semantics and defaults (protocol/README.md,
    # "XTC and DRY"). XTC: with probability xtc_probability per token, every
    # token at or above xtc_threshold except the least likely of them is
    # removed (above 0.5 at most one token can reach it: off). DRY: off while
    # dry_multiplier is 0; dry_penalty_last_n -1 is the model's context.
    xtc_probability: Probability = 0.0
    xtc_threshold: Annotated[float, Meta(ge=0.0, le=0.5)] = 0.1
    dry_multiplier: Annotated[float, Meta(ge=0.0, le=1e4)] = 0.0
    dry_base: Annotated[float, Meta(ge=1.0, le=1e4)] = 1.75
    dry_allowed_length: Annotated[int, Meta(ge=1, le=INT32_MAX)] = 2
    dry_penalty_last_n: Annotated[int, Meta(ge=-1, le=INT32_MAX)] = -1
    dry_sequence_breakers: Annotated[list[DryBreaker], Meta(max_length=64)] = msgspec.field(
        default_factory=lambda: list(DRY_BREAKERS))
    # Scheduling (protocol/README.md, "Batching"): interactive requests are
    # admitted and prefilled ahead of background ones; output never changes.
    priority: Priority = "interactive"


class TopLogprob(Out):
    token: int
    logprob: float


class TokenLogprob(Out):
    token: int
    logprob: float
    top: Union[list[TopLogprob], UnsetType] = UNSET


class ProgressEvent(Out):
    id: RequestId
    processed: int
    total: int
    cached: int


class TokenEvent(Out, omit_defaults=False):
    id: RequestId
    text: str
    tokens: list[int]
    # "marker": the text of a channel marker (`<think>`, `<tool_call>`,
    # ...); concatenating every event's text gives `text`.
    channel: Channel
    logprobs: Union[list[TokenLogprob], UnsetType] = UNSET
    # On tool_call events: which call of this generation (0, 1, ...).
    tool_call_index: Union[int, UnsetType] = UNSET


class Usage(Out):
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    # With a draft model: tokens it proposed, and how many of them the target accepted.
    draft_tokens: Union[int, UnsetType] = UNSET
    accepted_draft_tokens: Union[int, UnsetType] = UNSET
    # With a draft: rounds per draft length (index = tokens drafted; 0: plain decode steps).
    draft_rounds: Union[list[int], UnsetType] = UNSET


class Timings(Out):
    ttft_ms: float
    prompt_tps: float
    generation_tps: float
    total_ms: float
    queue_ms: float = 0.0


StopReason = Literal["eos", "stop_string", "max_tokens", "cancelled"]


class GenerateResult(Out):
    text: str
    tokens: list[int]
    stop_reason: StopReason
    usage: Usage
    timings: Timings
    peak_memory: int
    model_id: str
    seed: int
    # `text` split by channel, markers left out.
    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    stop_string: Union[str, None] = None
    stop_token: Union[int, None] = None
    # Only with a constraint: whether `tokens` form a complete match
    # (false when max_tokens, a stop string or cancel cut the output short).
    constraint_complete: Union[bool, UnsetType] = UNSET
    invalid_tool_calls: list[InvalidToolCall] = []
    # The peak memory (bytes) the worker expected while this request ran:
    # the largest admission estimate (memory in use + the needs) since the
    # worker was last idle, the span `peak_memory` covers ("Memory limits").
    memory_estimate: Union[int, None] = None


# ------------------------------------------------------ prompt cache files


class CacheSaveParams(PromptParams, kw_only=True):
    """Write the prompt cache of a prompt's tokens to a file (prefilling
    whatever part of it isn't cached yet)."""

    path: str
    prefill_step_size: Union[StepSize, None] = None


class CacheSaveResult(Out):
    model_id: str
    path: str
    tokens: int  # prompt tokens whose cache the file holds
    prompt_tokens: int
    cached_tokens: int  # of those, taken from the in-memory store
    file_bytes: int


class CacheLoadParams(Params):
    path: str
    model_id: Union[str, None] = None


class CacheLoadResult(Out):
    model_id: str
    path: str
    tokens: int
    bytes: int  # in memory, counted against the store's budget


# -------------------------------------------------------------------- embed


class EmbedParams(Params):
    """Vectors for one input or many: strings, or token ids (one list of
    ids, or a list of them)."""

    input: Union[str, list[Union[str, TokenId, list[TokenId]]]]
    model_id: Union[str, None] = None
    normalize: bool = True  # unit length (L2)
    dimensions: Union[Annotated[int, Meta(ge=1, le=INT32_MAX)], None] = None  # the leading ones (Matryoshka)
    truncate: bool = False  # cut an input longer than the model's context instead of refusing it


class EmbedUsage(Out):
    prompt_tokens: int


class EmbedResult(Out):
    model_id: str
    embeddings: list[list[float]]  # one per input, in input order
    tokens: list[int]  # each input's token count
    dimensions: int
    usage: EmbedUsage


# ----------------------------------------------------------- cancel, status


class CancelParams(Params):
    id: RequestId


class CancelResult(Out):
    cancelled: bool


class StatusParams(Params):
    pass


class PromptCacheStatus(Out):
    entries: int
    bytes: int
    max_bytes: int
    max_entries: int
    # The stores of this model as target with a draft (one per draft, each
    # bounded by max_bytes/max_entries): their entries and bytes, summed.
    pair_entries: int = 0
    pair_bytes: int = 0
    # Checkpoints of untrimmable state (recurrent layers, sliding windows)
    # the entries hold, and their bytes (part of `bytes`).
    checkpoints: int = 0
    checkpoint_bytes: int = 0


class ModelStatus(Out):
    model_id: str
    kind: ModelKind
    path: str
    context_length: Union[int, None]
    vocab_size: int
    memory_bytes: int
    prompt_cache: Union[PromptCacheStatus, None] = None
    memory_limit: Union[int, None] = None
    kv_bits: Union[int, None] = None
    kv_group_size: Union[int, None] = None
    parallel: Union[ParallelStatus, None] = None


# engine/request.py's RequestState values
RequestStateName = Literal["queued", "preparing", "waiting_memory", "prefilling", "decoding", "finished"]


class QueueStatus(Out):
    active: Union[RequestId, None]  # the oldest running request
    pending: int
    max_pending: int
    # Every request the compute thread is working on (generations stepping
    # together in a batch), oldest first.
    running: list[RequestId]
    # Generates admitted to the scheduler but waiting for memory (not in
    # `running`), oldest first.
    waiting: list[RequestId]


class RequestMemory(Out):
    """A running request's memory: what admission expected next to what MLX measured."""

    id: RequestId
    model_id: str
    estimate: int  # expected peak (the largest admission estimate since idle, as memory_estimate)
    need: int  # the estimate's own part (KV to max_tokens, prefill temporaries, …)
    peak: int  # MLX's peak since the worker was last idle (shared by concurrent requests)


class DiskCacheStatus(Out):
    folder: str
    entries: int  # files in the folder (every worker's that shares it)
    bytes: int
    max_bytes: int
    hits: int  # entries restored from disk by this worker
    writes: int  # entries this worker wrote
    removed: int  # corrupt, foreign or truncated files ignored and removed


class MemoryPools(Out):
    """Where the memory goes, and each pool's limit (set_limits)."""

    weights: int  # every loaded model's
    requests: int  # running requests' estimated needs (KV to max_tokens, temporaries)
    prompt_cache: int  # every store's entries, pair stores included
    prompt_cache_entries: int
    prompt_cache_limit: int  # the one budget of all stores (--prompt-cache-bytes, set_limits)
    prompt_cache_hits: int  # requests that continued from a RAM entry
    buffer_cache: int  # MLX's cache of freed buffers
    buffer_cache_limit: Union[int, None] = None  # None: MLX's default (the memory limit)
    wired_limit: Union[int, None] = None  # Metal only; None: not set / not available


class SetLimitsParams(Params):
    memory_limit: Union[PositiveCount, None] = None  # the worker's limit (as --memory-limit)
    prompt_cache_bytes: Union[Count, None] = None  # the one prompt-cache budget; 0 empties every store
    buffer_cache_bytes: Union[Count, None] = None  # mx.set_cache_limit
    wired_limit: Union[Count, None] = None  # macOS/Metal: mx.set_wired_limit; 0 unwires


class SetLimitsResult(Out):
    limit: int
    pools: MemoryPools
    evicted_bytes: int = 0  # prompt-cache entries the new budget pushed out
    wired_limit_applied: bool = False  # false where there is no Metal device


class MemoryStatus(Out):
    active: int
    peak: int
    cache: int
    rss: int
    limit: Union[int, None] = None
    requests: list[RequestMemory] = []  # every admitted, running request
    pools: Union[MemoryPools, None] = None


class RequestStatus(Out):
    """A generate the worker holds: where it is in its lifecycle."""

    id: RequestId
    state: RequestStateName
    priority: Priority
    paused: bool = False  # preempted: its KV out of memory until it resumes (state stays "decoding")


class StatusResult(Out):
    models: list[ModelStatus]
    queue: QueueStatus
    memory: MemoryStatus
    uptime_s: float
    distributed: Union[DistributedCapabilities, None] = None
    disk_cache: list[DiskCacheStatus] = []  # the prompt cache's disk tiers (one per folder)
    requests: list[RequestStatus] = []  # every generate held, oldest first


class ShutdownParams(Params):
    pass


class ShutdownResult(Out):
    shutting_down: bool


# A method's params and result types; the server routes them to the methods layer.
METHODS: dict[str, tuple[type, type]] = {
    "load": (LoadParams, LoadResult),
    "unload": (UnloadParams, UnloadResult),
    "tokenize": (TokenizeParams, TokenizeResult),
    "detokenize": (DetokenizeParams, DetokenizeResult),
    "generate": (GenerateParams, GenerateResult),
    "cache_save": (CacheSaveParams, CacheSaveResult),
    "cache_load": (CacheLoadParams, CacheLoadResult),
    "embed": (EmbedParams, EmbedResult),
    "set_limits": (SetLimitsParams, SetLimitsResult),
    "cancel": (CancelParams, CancelResult),
    "status": (StatusParams, StatusResult),
    "shutdown": (ShutdownParams, ShutdownResult),
}

# Notifications the worker sends, by method name.
EVENTS: dict[str, type] = {
    "ready": ReadyEvent,
    "progress": ProgressEvent,
    "token": TokenEvent,
    "load_progress": LoadProgressEvent,
}

