"""Checks on a model folder before any library code loads it.

A folder that can't load is refused with a -32002 that names the problem
(a bad config value, missing or truncated weights, no tokenizer) instead of
a riddle from deep inside a model class; a folder that asks to run its own
Python code is refused unless the host opted in with trust_remote_code
(protocol/README.md, "Reliability").
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Optional

from .. import errors
from ..errors import WorkerError
from .config import text_config


# Numbers in config.json that must be positive integers when present; a
# string or a null there fails deep inside a model class with a riddle.
_POSITIVE_INTS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim",
)
_REQUIRED_IF_PRESENT = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
    "vocab.txt", "tokenizer.tiktoken", "qwen.tiktoken",
)


class NestedTooDeeply(ValueError):
    pass


def loads(text: str | bytes, name: str) -> Any:
    """``json.loads``; JSON nested past Python's recursion limit is a
    ValueError naming the file, like any other invalid JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise NestedTooDeeply(f"{name} is nested too deeply to read") from None


# JSON files the libraries read with Python's json (which fails on deep
# nesting with a RecursionError): read here first, so such a file is named.
_JSON_FILES = ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
               "generation_config.json", "special_tokens_map.json", "chat_template.json")


def safetensors_header(file: Path) -> tuple[Optional[dict], Optional[str]]:
    """A safetensors file's header checked against its size (reads the header
    only): ``(header, None)``, or ``(None, problem)`` for a truncated download
    or a corrupt file, named before anything loads it."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None, "shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 * 1024 * 1024):
                return None, f"header length {n} does not fit a file of {size} bytes"
            header = loads(f.read(n), file.name)
    except (OSError, ValueError) as exc:
        return None, f"unreadable header ({exc})"
    if not isinstance(header, dict):
        return None, "the header is not a JSON object"
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return None, f"tensor {name!r} has no valid data_offsets"
        if not 0 <= offsets[0] <= offsets[1] <= data:
            return None, f"tensor {name!r} ends at byte {offsets[1]} but the file holds {data} bytes of data"
    return header, None


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_VISION_ROOTS = ("vision_tower", "vision_model", "visual", "vision", "multi_modal_projector", "mm_projector",
                 "audio_tower", "audio_model")


def weight_layers(names) -> int:
    """How many numbered language-model layers (``….layers.N.…``) the weights
    hold; 0 when they are named otherwise."""
    seen = set()
    for name in names:
        if name.split(".", 1)[0] in _VISION_ROOTS:
            continue
        match = _LAYER.search(name)
        if match:
            seen.add(int(match.group(1)))
    return max(seen) + 1 if seen else 0


def template_problem(template: Any) -> Optional[str]:
    """Why a chat template (a string, or named templates) can't be parsed, or
    None. Parsed the way transformers' apply_chat_template parses it, so a
    broken template is refused at load rather than at its first use."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    named = template.items() if isinstance(template, dict) else [(None, template)]
    for name, text in named:
        if text is None:
            continue
        try:
            if not isinstance(text, str):
                raise TypeError(f"a template must be a string, not {type(text).__name__}")
            _compile_jinja_template(text)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            where = f"template {name!r}: " if name else ""
            line = getattr(exc, "lineno", None)
            return f"{where}{type(exc).__name__}: {exc}" + (f" (line {line})" if line else "")
    return None


def special_entry(path: Path) -> Optional[str]:
    """A name in the folder that is not a folder or a regular file (a FIFO, a
    device, a socket): the libraries would block opening it, so it is refused."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return None  # unlistable: the checks below name what they can't read
    for entry in entries:
        try:
            st = os.stat(entry.path)  # follows links (hub caches link to blobs)
        except OSError:
            continue  # a dangling link: whatever reads it fails, it doesn't block
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return entry.name
    return None


def check_folder(path: Path, config: dict, trust_remote_code: bool) -> None:
    """Refuse, with a clear -32002, a folder that cannot load or that asks to
    run its own Python code when the host did not opt in."""
    def fail(message: str, **data: Any) -> WorkerError:
        return WorkerError(errors.LOAD_FAILED, message, {"path": str(path), **data})

    special = special_entry(path)
    if special is not None:
        raise fail(f"{path / special} is not a regular file (a FIFO, device or socket is never read)",
                   file=str(path / special))
    _check_config(config, fail)
    _check_weights(path, config, fail)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise fail(f"no tokenizer in {path}: expected tokenizer.json (or tokenizer.model, vocab.json)")
    parsed = _read_json_files(path, fail)
    code = [] if trust_remote_code else _remote_code(config, parsed)
    if code:
        raise WorkerError(
            errors.LOAD_FAILED,
            f"{path} asks to run Python code from the model folder ({'; '.join(code)}). Refused: pass "
            "`trust_remote_code: true` to load only if you trust this model's files.",
            {"path": str(path), "field": "params.trust_remote_code", "remote_code": code},
        )


def _check_config(config: dict, fail: Callable[..., WorkerError]) -> None:
    text = text_config(config)
    for cfg, prefix in ((config, ""), (text, "text_config.")) if text is not config else ((config, ""),):
        for key in _POSITIVE_INTS:
            # null may stand for "derive it" (head_dim), except for the basics
            optional = cfg is not text or key not in _REQUIRED_IF_PRESENT
            if key in cfg and not (cfg[key] is None and optional) and not (
                isinstance(cfg[key], int) and not isinstance(cfg[key], bool) and cfg[key] > 0
            ):
                raise fail(f"config.json: `{prefix}{key}` must be a positive integer (got {cfg[key]!r})",
                           field=f"config.{prefix}{key}")
    if "model_type" not in config or not isinstance(config["model_type"], str):
        raise fail("config.json has no `model_type` string: the architecture is unknown", field="config.model_type")


def _check_weights(path: Path, config: dict, fail: Callable[..., WorkerError]) -> None:
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise fail(f"no weights in {path}: expected *.safetensors files (other formats are not read)")
    names: list[str] = []
    for file in weights:
        header, problem = safetensors_header(file)
        if problem:
            raise fail(f"{file.name} is corrupt or incomplete: {problem}", file=str(file))
        names.extend(k for k in header if k != "__metadata__")
    # The model is built from config.json before any weight is read: a layer
    # count the weights don't hold would build (and hold) thousands of
    # layers, far beyond what the weights' size admitted.
    text = text_config(config)
    held = weight_layers(names)
    wanted = text.get("num_hidden_layers")
    if held and isinstance(wanted, int) and wanted > held:
        prefix = "text_config." if text is not config else ""
        raise fail(f"config.json: `{prefix}num_hidden_layers` is {wanted} but the weights hold {held} layers",
                   field=f"config.{prefix}num_hidden_layers")


def _read_json_files(path: Path, fail: Callable[..., WorkerError]) -> dict:
    parsed = {}
    for name in _JSON_FILES:
        try:
            parsed[name] = loads((path / name).read_text(encoding="utf-8"), name)
        except NestedTooDeeply as exc:
            raise fail(str(exc), file=str(path / name)) from None
        except (OSError, ValueError):
            continue  # absent, or broken: the library that reads it names it
    return parsed


def _remote_code(config: dict, parsed: dict) -> list[str]:
    """What in the folder asks to run its own Python code."""
    code = []
    if config.get("model_file") is not None:
        code.append(f"config.json model_file: {config['model_file']}")
    for name in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        entry = parsed.get(name)
        auto_map = entry.get("auto_map") if isinstance(entry, dict) else None
        if auto_map:
            code.append(f"{name} auto_map: {json.dumps(auto_map)[:200]}")
    return code
