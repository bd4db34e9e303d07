"""Tool calls for 20 families (issue 20), each on a tiny model with the
family's real chat template (vendored from llama.cpp's models/templates/,
fixtures/templates/PROVENANCE.json) and its real marker tokens.

Per family, through a real worker: the prompt renders as transformers'
``apply_chat_template(tools=...)`` does; ``required`` and ``{name}`` give
calls whose arguments validate against the tool's schema (3 seeds x 2
temperatures) with ids in the family's format; ``auto`` runs; ``none``
never calls with the start pushed by ``logit_bias``; the round trip (an
assistant ``tool_calls`` message rendered by the family's template is
accepted by the call grammar, and a call forced to those arguments comes
back as that text and those calls); the resend (call -> tool result -> the
next turn renders with the worker's ids).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import llguidance
import llguidance.hf
import msgspec
import pytest
from transformers import AutoTokenizer

from conftest import spawn
from fixtures.build import ensure_model
from mlx_worker import protocol

HEX = r"call_[0-9a-f]{24}"
# family -> (fixture, format name, id format, the output's call start for logit_bias)
FAMILIES = {
    "llama31": ("tiny-llama31-tools", "llama3_json", HEX, "{"),
    "llama32": ("tiny-llama32-tools", "llama3_json", HEX, "{"),
    "llama33": ("tiny-llama33-tools", "llama3_json", HEX, "{"),
    "gpt-oss": ("tiny-gpt-oss-tools", "harmony", HEX, " to"),
    "deepseek-v31": ("tiny-deepseek-v31-tools", "deepseek_v31", HEX, "<｜tool▁calls▁begin｜>"),
    "functionary-v32": ("tiny-functionary-v32-tools", "functionary_v32", HEX, "get"),
    "granite33": ("tiny-granite33-tools", "granite", HEX, "<|tool_call|>"),
    "command-r7b": ("tiny-command-r7b-tools", "command_r7b", HEX, "<|START_ACTION|>"),
    "qwen3-coder": ("tiny-qwen3-coder-tools", "qwen3_coder", HEX, "<tool_call>"),
    "glm46": ("tiny-glm46-tools", "glm47", HEX, "<tool_call>"),
    "kimi-k2": ("tiny-kimi-k2-tools", "kimi_k2", r"functions\.\w+:\d+", "<|tool_calls_section_begin|>"),
    "hermes3": ("tiny-hermes3-tools", "json_tools", HEX, "<tool_call>"),
    "hermes2pro": ("tiny-hermes2pro-tools", "json_tools", HEX, "<tool_call>"),
    "qwen25": ("tiny-qwen25-tools", "json_tools", HEX, "<tool_call>"),
    "qwen3-real": ("tiny-qwen3-real-tools", "json_tools", HEX, "<tool_call>"),
    "mistral-nemo": ("tiny-mistral-nemo-tools", "mistral", r"[A-Za-z0-9]{9}", "[TOOL_CALLS]"),
    "mistral-small32": ("tiny-mistral-small32-tools", "mistral", r"[A-Za-z0-9]{9}", "[TOOL_CALLS]"),
    "minimax-m2": ("tiny-minimax-m2-tools", "minimax_m2", HEX, "<minimax:tool_call>"),
    "gemma4": ("tiny-gemma4-tools", "gemma4", HEX, "<|tool_call>"),
    "lfm2": ("tiny-lfm2-tools", "lfm2_json", HEX, "<|tool_call_start|>"),
}
EOS_TEXT = ["<|eot_id|>", "<|eom_id|>", "<|im_end|>", "</s>", "<｜end▁of▁sentence｜>", "<|END_OF_TURN_TOKEN|>",
            "<|end_of_text|>", "<|return|>", "<|endoftext|>", "<|user|>", "<|observation|>", "[e~[", "<turn|>"]

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
SEARCH = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "maxLength": 8},
        "limit": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["query", "limit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": SEARCH}},
]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "unit": "celsius"}}
# The same call, forced: every argument a const (the grammar allows one text).
CONST = {"type": "object", "properties": {"city": {"type": "string", "const": "Paris"},
                                          "days": {"type": "integer", "const": 3},
                                          "unit": {"type": "string", "const": "celsius"}},
         "required": ["city", "days", "unit"], "additionalProperties": False}
STRING_ARGS = {"deepseek-v31", "functionary-v32"}  # templates that concatenate `arguments`


@pytest.fixture(scope="module")
def paths():
    return {f: str(ensure_model(spec[0])) for f, spec in FAMILIES.items()}


@pytest.fixture(scope="module")
def fw(paths):
    w = spawn()
    loads = {f: w.load(p, model_id=f) for f, p in paths.items()}
    w.loads = loads
    yield w
    w.close()


def run(w, family, **params):
    params.setdefault("messages", ASK)
    params.setdefault("max_tokens", 200)
    stream = w.generate(model_id=family, **params)
    events = [e for e in stream if isinstance(e, protocol.TokenEvent)]
    return stream.result, events


def check_stream(result, events):
    assert "".join(e.text for e in events) == result.text
    by = lambda ch: "".join(e.text for e in events if e.channel == ch)  # noqa: E731
    assert by("content") == result.content
    assert by("reasoning") == result.reasoning
    for e in events:
        assert (e.tool_call_index is not protocol.UNSET) == (e.channel == "tool_call")


def check_calls(family, result, names=None):
    assert result.tool_calls, (result.text, result.invalid_tool_calls)
    for call in result.tool_calls:
        assert call.name in (names or SCHEMAS), call
        jsonschema.Draft202012Validator(SCHEMAS[call.name]).validate(call.arguments)
        assert re.fullmatch(FAMILIES[family][2], call.id), call.id


def openai_call(family, call_id, name, arguments):
    args = json.dumps(arguments, ensure_ascii=False) if family in STRING_ARGS else arguments
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


# ------------------------------------------------------------------ load


@pytest.mark.parametrize("family", FAMILIES)
def test_load_reports_the_format(fw, family):
    r = fw.loads[family]
    assert (r.tool_call_format, r.tool_grammar) == (FAMILIES[family][1], True)
    names = ["default", "tool_use"] if family in ("hermes3", "hermes2pro") else None
    assert r.chat_template_names == names


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_renders_like_transformers(fw, paths, family):
    hf = AutoTokenizer.from_pretrained(paths[family])
    for tools in (TOOLS, None):
        extra = {"tools": tools} if tools else {}
        expected = hf.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True, **extra)
        got = fw.tokenize(model_id=family, messages=ASK, **extra)
        assert got.prompt == expected
        assert got.tokens == hf.encode(expected, add_special_tokens=False)
    if family.startswith("hermes"):  # the named list: tool_use with tools, default without
        assert "<tools>" in fw.tokenize(model_id=family, messages=ASK, tools=TOOLS).prompt
        assert "<tools>" not in fw.tokenize(model_id=family, messages=ASK).prompt


def test_reasoning_effort_reaches_the_harmony_template(fw):
    low = fw.tokenize(model_id="gpt-oss", messages=ASK, chat_template_kwargs={"reasoning_effort": "low"}).prompt
    assert "Reasoning: low" in low and "Reasoning: medium" in fw.tokenize(model_id="gpt-oss", messages=ASK).prompt


def test_a_harmony_header_that_repeats_the_role_is_a_marker(fw):
    """The header grammar lets a message open with `<|start|>assistant`
    again (its start rule serves every message; a random model takes that
    branch under `tool_choice: "none"`): that text is a marker event, never
    the answer's (`content` used to begin with it)."""
    lark = 'start: <|start|> "assistant" <|channel|> "final" <|message|> "Answer"'
    stream = fw.generate(model_id="gpt-oss", messages=ASK, max_tokens=20, temperature=0,
                         constraint={"type": "grammar", "lark": lark})
    events = [e for e in stream if isinstance(e, protocol.TokenEvent)]
    result = stream.wait()
    assert result.content == "Answer" and result.reasoning == ""
    assert [e.text for e in events if e.channel == "marker"][:1] == ["<|start|>assistant"]


# ------------------------------------------------------------ generation


@pytest.mark.heavy  # 240 generations; the round-trip and resend tests force a call per family too
@pytest.mark.parametrize("choice", ["required", "named"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forced_calls_are_valid(fw, family, choice):
    names = ["search"] if choice == "named" else None
    tool_choice = {"type": "function", "function": {"name": "search"}} if choice == "named" else "required"
    for seed in range(3):
        for temperature in (0.0, 1.5):
            result, events = run(fw, family, tools=TOOLS, tool_choice=tool_choice, seed=seed, temperature=temperature,
                                 parallel_tool_calls=False)
            check_stream(result, events)
            check_calls(family, result, names)
            assert len(result.tool_calls) == 1 and not result.invalid_tool_calls
            assert {e.tool_call_index for e in events if e.channel == "tool_call"} == {0}


# MiniMax's section is one channel call holding every <invoke>: the random
# model doesn't close it within a test's budget, so nothing is complete.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "minimax-m2"])
def test_several_calls_in_one_turn(fw, family):
    """Where the format allows several calls, the random model writes calls
    until max_tokens: every complete one valid, only the last cut short."""
    result, events = run(fw, family, tools=TOOLS, tool_choice="required", seed=3, temperature=1.0, max_tokens=200)
    check_stream(result, events)
    check_calls(family, result)
    for bad in result.invalid_tool_calls:
        assert bad.reason == "incomplete" and result.stop_reason == "max_tokens", bad
    assert len(result.invalid_tool_calls) <= 1
    indices = sorted({e.tool_call_index for e in events if e.channel == "tool_call"})
    assert indices == list(range(len(indices)))


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_runs(fw, family):
    for seed in range(2):
        result, events = run(fw, family, tools=TOOLS, tool_choice="auto", seed=seed, temperature=1.0, max_tokens=40)
        check_stream(result, events)
        for call in result.tool_calls:
            jsonschema.Draft202012Validator(SCHEMAS[call.name]).validate(call.arguments)


@pytest.mark.parametrize("family", FAMILIES)
def test_none_never_calls_even_when_pushed(fw, family):
    start = FAMILIES[family][3]
    ids = fw.tokenize(model_id=family, text=start, add_special_tokens=False).tokens
    for seed in range(2):
        result, events = run(fw, family, tools=TOOLS, tool_choice="none", seed=seed, temperature=1.0, max_tokens=30,
                             logit_bias={str(ids[0]): 30.0})
        check_stream(result, events)
        assert not result.tool_calls and not result.invalid_tool_calls, result.text
        assert all(e.channel != "tool_call" for e in events)


# ------------------------------------------------------ round trip, resend


def rendered_call(family, path):
    """The family's template's text for an assistant message with CALL: the
    part after the generation prompt, up to the end of the turn."""
    hf = AutoTokenizer.from_pretrained(path)
    if family == "granite33":  # its template renders no calls: the form its system prompt asks for
        assistant = {"role": "assistant", "content": '<|tool_call|>[' + json.dumps(CALL) + "]"}
    else:
        assistant = {"role": "assistant", "content": "", "tool_calls": [openai_call(family, "Abc123xyZ", **CALL)]}
    if family == "gpt-oss":
        assistant.pop("content")
    prefix = hf.apply_chat_template(ASK, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    full = hf.apply_chat_template(ASK + [assistant], tools=TOOLS, tokenize=False, add_generation_prompt=False)
    # The turn as the template renders it after the common part (a generation
    # prompt may open a thinking block the rendered turn leaves out).
    common = len(prefix)
    while not full.startswith(prefix[:common]):
        common -= 1
    if common < len(prefix):  # back to a line start: never inside a marker
        common = prefix.rfind("\n", 0, common) + 1
    assert common > len(prefix) - 40, (prefix[-80:], full[common - 80:])
    text = full[common:]
    cut = min([i for i in (text.find(e) for e in EOS_TEXT) if i >= 0] + [len(text)])
    return hf, text[:cut]


def call_segment(fmt, text):
    """From the call's start (its marker; the output's start for formats without one)."""
    start = fmt.start if fmt.start and not fmt.open_text else None
    text = text[text.index(start):] if start else text
    return text[:text.rindex(fmt.end) + len(fmt.end)] if fmt.end else text


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_grammar_accepts_the_template_rendering(paths, family):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_worker.tools import formats
    from mlx_worker.tools.base import Vocab
    from mlx_worker.tools.grammar import call_grammar

    hf, text = rendered_call(family, paths[family])
    wrapper = load_tokenizer(Path(paths[family]))
    fmt = formats.install(wrapper)
    segment = call_segment(fmt, text)
    for tools, mode in ((TOOLS, "auto"), (TOOLS, "call")):
        lark = call_grammar(fmt, Vocab(wrapper), copy.deepcopy(tools), mode)
        info = llguidance.hf.from_tokenizer(hf)
        matcher = llguidance.LLMatcher(info, llguidance.LLMatcher.grammar_from_lark(lark))
        assert not matcher.is_error(), matcher.get_error()
        tokens = hf.encode(segment, add_special_tokens=False)
        assert matcher.consume_tokens(tokens), (segment, matcher.get_error())
        assert matcher.is_accepting(), segment


# After these end markers the output is free again (what the template renders next is not the call's).
FAMILIES_END = {f: e for f, e in {"lfm2": "<|tool_call_end|>", "hermes3": "</tool_call>", "hermes2pro": "</tool_call>",
                                  "qwen25": "</tool_call>", "qwen3-real": "</tool_call>", "qwen3-coder": "</tool_call>",
                                  "glm46": "</tool_call>", "gemma4": "<tool_call|>",
                                  "minimax-m2": "</minimax:tool_call>"}.items()}


def normalise_ids(text):
    return re.sub(r"(\[CALL_ID\]|\"id\": \"|functions\.get_weather:)[A-Za-z0-9]+", r"\1ID", text)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_forced_call_is_the_template_rendering(fw, paths, family):
    """A call forced to CALL's arguments is the template's text for CALL, and the worker parses it back."""
    _, text = rendered_call(family, paths[family])
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": CONST}}]
    result, events = run(fw, family, tools=tools, tool_choice={"name": "get_weather"}, temperature=0.0, max_tokens=160,
                         parallel_tool_calls=False)
    assert [(c.name, c.arguments) for c in result.tool_calls] == [(CALL["name"], CALL["arguments"])], result.text
    fmt_start = FAMILIES[family][3] if family not in ("llama31", "llama32", "llama33", "gpt-oss", "functionary-v32") else None
    expected = text[text.index(fmt_start):] if fmt_start else text
    expected = expected.removesuffix("<|call|>")  # an EOS token: not in `text`
    end = FAMILIES_END.get(family)
    expected = expected[:expected.rindex(end) + len(end)] if end and end in expected else expected
    assert normalise_ids(result.text).startswith(normalise_ids(expected)), (result.text, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_resend_renders_with_the_workers_ids(fw, paths, family):
    result, _ = run(fw, family, tools=TOOLS, tool_choice="required", seed=1, temperature=0.0, parallel_tool_calls=False)
    call = result.tool_calls[0]
    sent = msgspec.to_builtins(call)  # sent back unchanged, in the worker's own shape
    messages = ASK + [{"role": "assistant", "content": "", "tool_calls": [sent]},
                      {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    if family == "gpt-oss":
        messages[1].pop("content")
    got = fw.tokenize(model_id=family, messages=messages, tools=TOOLS)
    hf = AutoTokenizer.from_pretrained(paths[family])
    reference = copy.deepcopy(messages)
    reference[1]["tool_calls"] = [openai_call(family, call.id, call.name, call.arguments)]
    expected = hf.apply_chat_template(reference, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert got.prompt == expected
    assert "sunny" in got.prompt


# Formats with no vendored template: the grammar accepts the syntax as the
# mlx-lm parser's docs write it, and the parser reads the call back
# (in-process, with a fixture tokenizer; the markers are literals there
# where the vocabulary lacks them).
WRITTEN = {
    "pythonic": ("tiny-lfm2-tools",
                 '<|tool_call_start|>[get_weather(city="Paris", days=3, unit="celsius")]<|tool_call_end|>'),
    "function_gemma": ("tiny-gemma4-tools", "<start_function_call>call:get_weather{city:<escape>Paris<escape>,days:3,"
                                            "unit:<escape>celsius<escape>}<end_function_call>"),
}


@pytest.mark.parametrize("name", WRITTEN)
def test_formats_without_a_vendored_template(name):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_worker.tools import formats
    from mlx_worker.tools.base import Vocab
    from mlx_worker.tools.grammar import call_grammar

    fixture, text = WRITTEN[name]
    path = ensure_model(fixture)
    hf = AutoTokenizer.from_pretrained(str(path))
    fmt = next(f for f in formats.FORMATS if f.name == name)
    lark = call_grammar(fmt, Vocab(load_tokenizer(Path(path))), copy.deepcopy(TOOLS), "call")
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(hf), llguidance.LLMatcher.grammar_from_lark(lark))
    assert matcher.consume_tokens(hf.encode(text, add_special_tokens=False)), matcher.get_error()
    assert matcher.is_accepting()
    body = text.removeprefix(fmt.start).removesuffix(fmt.end)
    assert [(c["name"], c["arguments"]) for c in fmt.parse(body, TOOLS)] == [(CALL["name"], CALL["arguments"])]


def test_harmony_recipient_after_the_channel(paths):
    """gpt-oss also writes the recipient after the channel (OpenAI's harmony
    guide): the grammar allows it and the parser reads it."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_worker.tools import formats
    from mlx_worker.tools.base import Vocab
    from mlx_worker.tools.grammar import call_grammar

    hf = AutoTokenizer.from_pretrained(paths["gpt-oss"])
    fmt = formats.install(load_tokenizer(Path(paths["gpt-oss"])))
    body = 'functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 3, "unit": "celsius"}<|call|>'
    text = "<|channel|>commentary to=" + body
    lark = call_grammar(fmt, Vocab(load_tokenizer(Path(paths["gpt-oss"]))), copy.deepcopy(TOOLS), "call")
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(hf), llguidance.LLMatcher.grammar_from_lark(lark))
    assert matcher.consume_tokens(hf.encode(text, add_special_tokens=False)), matcher.get_error()
    assert matcher.is_accepting()
    assert [(c["name"], c["arguments"]) for c in fmt.parse(body, TOOLS)] == [(CALL["name"], CALL["arguments"])]


def test_llama_builtin_calls_open_at_the_python_tag(fw):
    """Llama 3.1's built-in tools: `<|python_tag|>` opens a call (not forced
    by the grammar: the JSON form is); its text is parsed as `name.call(...)`."""
    from mlx_worker.tools.llama3 import Llama3

    assert len(fw.tokenize(model_id="llama31", text="<|python_tag|>", add_special_tokens=False).tokens) == 1
    prompt = fw.tokenize(model_id="llama31", messages=ASK).prompt + "<|python_tag|>"  # a host that prefills the tag
    stream = fw.generate(model_id="llama31", prompt=prompt, seed=0, temperature=1.0, max_tokens=8, ignore_eos=True)
    events = [e for e in stream if isinstance(e, protocol.TokenEvent)]
    result = stream.result
    assert {(e.channel, e.tool_call_index) for e in events} == {("tool_call", 0)}
    assert [c.reason for c in result.invalid_tool_calls] == ["incomplete"]  # cut by max_tokens
    assert Llama3().parse('brave_search.call(query="weather in Paris")', None) == [
        {"name": "brave_search", "arguments": {"query": "weather in Paris"}}]


def test_boolean_property_schemas(paths):
    """A property whose schema is ``true`` (any value) or ``false`` (never
    written) is valid JSON Schema: formats that write each argument on its
    own (XML-style, Gemma 4) take them too, instead of failing inside the
    worker (-32603)."""
    loose = {"type": "object", "properties": {"city": {"type": "string", "const": "Paris"}, "note": True,
                                              "never": False}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": loose}}]
    with spawn() as w:
        for family in ("qwen3-coder", "glm46", "minimax-m2", "gemma4"):
            w.load(paths[family], model_id=family)
            result, _ = run(w, family, tools=tools, tool_choice="required", max_tokens=60, temperature=0)
            assert result.tool_calls or result.invalid_tool_calls, (family, result.text)
            for call in result.tool_calls:
                assert call.arguments["city"] == "Paris" and "never" not in call.arguments, (family, call)
            w.unload(family)
