"""Request params -> the token ids the model sees.

A prompt arrives as exactly one of ``prompt`` (text), ``tokens`` (ids) or
``messages`` (chat, rendered with the model's own template and that template's
own defaults; options only through ``chat_template_kwargs``).
Spec: protocol/README.md § `generate`, § Chat templates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import msgspec

from . import errors, prompt_bounds, protocol
from .errors import WorkerError, invalid_params
from .models.loaded import LoadedModel
from .tools.checks import check_tools, tool_dicts


@dataclass
class PreparedPrompt:
    tokens: list[int]
    # Identifies the prompt for the prompt cache; equals ``tokens`` for text.
    # A vision prompt puts image content hashes where the image tokens are.
    cache_key: list = field(default_factory=list)
    # Vision: start -> (input embeddings for tokens[start:], their positions); None for text.
    embeddings: Optional[Any] = None
    rendered: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.cache_key:
            self.cache_key = self.tokens


def one_source(params: Any, names: Sequence[str]) -> str:
    given = [n for n in names if getattr(params, n) is not None]
    if len(given) != 1:
        listed = ", ".join(f"`{n}`" for n in names)
        what = "none" if not given else ", ".join(given)
        raise WorkerError(
            errors.INVALID_PARAMS,
            f"exactly one of {listed} is required (got {what})",
            {"field": "params." + (given[1] if len(given) > 1 else names[0])},
        )
    return given[0]


def message_dict(message: protocol.ChatMessage) -> dict:
    """A message as a chat template sees it: unset fields left out."""
    return {k: v for k, v in msgspec.to_builtins(message).items() if v is not None}


def apply_template(owner: Any, messages: list[dict], params: Any, model_id: str) -> str:
    """Render with ``owner``'s own Hugging Face chat template and its own
    defaults; options only through ``chat_template_kwargs``."""
    if not getattr(owner, "chat_template", None):
        raise invalid_params(
            "params.messages",
            f"model {model_id!r} has no chat template; send `prompt` or `tokens`, "
            "or pass `chat_template` to load",
        )
    tools = tool_dicts(getattr(params, "tools", None))
    extra = {"tools": tools} if tools is not None else {}
    template = owner.chat_template
    templates = template.values() if isinstance(template, dict) else [template]
    return prompt_bounds.render(
        lambda: owner.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=params.add_generation_prompt,
            **extra,
            **params.chat_template_kwargs,
        ),
        templates,
    )


def render_chat(lm: LoadedModel, params: Any) -> str:
    for i, m in enumerate(params.messages):
        if isinstance(m.content, list) and any(isinstance(p, protocol.ImagePart) for p in m.content):
            if lm.kind != "vision":
                raise WorkerError(
                    errors.IMAGE_INVALID,
                    f"model {lm.model_id!r} is a text model and cannot take images",
                    {"field": f"params.messages[{i}].content", "reason": "text_model"},
                )
    # Text parts reach the template as the list of {"type": "text", "text"}
    # parts the host sent, as transformers passes them: a template may trim
    # or separate parts, so joining them here would render differently.
    messages = [message_dict(m) for m in params.messages]
    fmt = getattr(lm.tokenizer, "tool_format", None)
    if fmt is not None:
        for m in messages:
            if m.get("tool_calls"):
                m["tool_calls"] = [template_call(fmt, c) for c in m["tool_calls"]]
    return apply_template(lm.hf_tokenizer, messages, params, lm.model_id)


def template_call(fmt: Any, call: dict) -> dict:
    """A call the host sends back, as the family's template reads it: the
    worker's own ``{id, name, arguments}`` becomes the OpenAI shape, and
    arguments become JSON text where the template concatenates them."""
    if "function" not in call and isinstance(call.get("name"), str):
        call = fmt.render_call({"id": call.get("id"), "name": call["name"], "arguments": call.get("arguments", {})})
    elif fmt.args_as_string and isinstance(call.get("function"), dict) and not isinstance(call["function"].get("arguments"), str):
        call = fmt.render_call({"id": call.get("id"), "name": call["function"].get("name"),
                                "arguments": call["function"].get("arguments", {})})
    return call


def encode_text(lm: LoadedModel, text: str, add_special_tokens: bool) -> list[int]:
    prompt_bounds.check_encode(text)
    return list(lm.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens))


def check_token_ids(lm: LoadedModel, tokens: list[int], field_name: str) -> None:
    for i, t in enumerate(tokens):
        if not 0 <= t < lm.vocab_size:
            raise invalid_params(
                f"{field_name}[{i}]", f"token id {t} is outside the vocabulary [0, {lm.vocab_size})"
            )


def tokenize(lm: LoadedModel, params: protocol.TokenizeParams) -> protocol.TokenizeResult:
    source = one_source(params, ("text", "messages"))
    check_tools(params.tools)
    if source == "messages" and lm.vision is not None:
        prepared = lm.vision.prepare(lm, params)
        return protocol.TokenizeResult(tokens=prepared.tokens, count=len(prepared.tokens), prompt=prepared.rendered)
    if source == "messages":
        rendered = render_chat(lm, params)
        tokens = encode_text(lm, rendered, add_special_tokens=False)
        return protocol.TokenizeResult(tokens=tokens, count=len(tokens), prompt=rendered)
    tokens = encode_text(lm, params.text, params.add_special_tokens)
    return protocol.TokenizeResult(tokens=tokens, count=len(tokens))


def prepare(lm: LoadedModel, params: protocol.GenerateParams) -> PreparedPrompt:
    if lm.vision is not None:
        # Every source: the adapter also sets the prompt's positions (M-RoPE).
        return lm.vision.prepare(lm, params)
    return prepare_text(lm, params)


def prepare_text(lm: LoadedModel, params: protocol.GenerateParams) -> PreparedPrompt:
    source = one_source(params, ("prompt", "tokens", "messages"))
    if source == "messages":
        rendered = render_chat(lm, params)
        tokens = encode_text(lm, rendered, add_special_tokens=False)
    elif source == "prompt":
        rendered = params.prompt
        tokens = encode_text(lm, params.prompt, params.add_special_tokens)
    else:
        rendered = None
        tokens = list(params.tokens)
        check_token_ids(lm, tokens, "params.tokens")
    if not tokens:
        raise invalid_params(f"params.{source}", "the prompt is empty after tokenization")
    return PreparedPrompt(tokens=tokens, rendered=rendered)
