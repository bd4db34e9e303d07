"""Chat messages with image parts -> image inputs and the rendered prompt.

Images are read (and limited) in message order. The text is rendered with the
model's own chat template and that template's own defaults: mlx-vlm's prompt
utilities only shape the messages the way the model's template expects
(``{"type": "image"}`` parts, ``<image>`` markers...), and the template is
then applied directly, so no options are injected.
"""

from __future__ import annotations

from typing import Any

from .. import protocol
from ..prompt import apply_template, message_dict
from .images import ImageInput, ImageLimits, image_error, read_image


def image_fields(messages: list[protocol.ChatMessage], first: int = 0) -> list[tuple[str, protocol.ImagePart]]:
    """(field, part) for every image part, numbering messages from ``first``."""
    found = []
    for i, message in enumerate(messages, first):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, protocol.ImagePart):
                    found.append((f"params.messages[{i}].content[{j}]", part))
    return found


def read_images(messages: list[protocol.ChatMessage], limits: ImageLimits, max_images: int, why: str) -> list[ImageInput]:
    found = image_fields(messages)
    if len(found) > max_images:
        field = found[max_images][0]
        raise image_error(
            field, "too_many_images", f"the prompt has {len(found)} images; {why} allows at most {max_images}"
        )
    return [read_image(part.image, field + ".image", limits) for field, part in found]


def template_messages(messages: list[protocol.ChatMessage], model_type: str) -> list[dict]:
    """Messages as the model's chat template expects them, image payloads removed."""
    from mlx_vlm.prompt_utils import MODEL_CONFIG, apply_chat_template

    raw = []
    for m in messages:
        d = message_dict(m)
        if isinstance(m.content, list):
            d["content"] = [
                {"type": "image"} if isinstance(p, protocol.ImagePart) else {"type": "text", "text": p.text}
                for p in m.content
            ]
        raw.append(d)
    if model_type.lower() not in MODEL_CONFIG:
        return raw  # Hugging Face's standard {"type": "image"} parts
    for i, m in enumerate(messages):
        # mlx-vlm's formatter keeps images only where the model takes them.
        if m.role in ("system", "assistant") and not (m.tool_calls or m.tool_call_id):
            for field, _ in image_fields([m], first=i):
                raise image_error(
                    field, "wrong_role",
                    f"this model takes images in user messages only, not in a {m.role!r} message",
                )
    shaped = apply_chat_template(None, {"model_type": model_type}, raw, return_messages=True)
    # The formatter rebuilds each message from role and content: put back the
    # rest. A message without images keeps its content as sent: a string stays
    # a string (the formatter makes it a list of parts, which a template that
    # prints the content, as Mistral 3's does with the system prompt, shows
    # as a Python list), and text parts stay separate parts (the formatter
    # joins them with spaces; a template may trim or separate them).
    return [
        {**{k: v for k, v in r.items() if k != "content"}, **({"content": r["content"]} if _no_images(m) else s)}
        for m, r, s in zip(messages, raw, shaped)
    ]


def _no_images(message: protocol.ChatMessage) -> bool:
    return not (isinstance(message.content, list) and any(isinstance(p, protocol.ImagePart) for p in message.content))


def render(processor: Any, messages: list[dict], params: Any, model_id: str) -> str:
    # The processor's template wins; some models keep it only on the tokenizer.
    tokenizer = getattr(processor, "tokenizer", processor)
    owner = processor if getattr(processor, "chat_template", None) else tokenizer
    return apply_template(owner, messages, params, model_id)
