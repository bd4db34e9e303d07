"""Tools and reasoning through a real worker, on fixtures with the chat
templates and special tokens of two real families (Qwen3: `<think>`,
`<tool_call>` JSON calls; Mistral: `[TOOL_CALLS]name[ARGS]{...}`).

The models are random: tool calls are forced with tool_choice, logit bias
and constraints, and what is asserted is structure and validity (channels
split exactly at the markers, arguments valid against the tool's schema),
never prose.
"""

from __future__ import annotations

import json
import re
import time

import jsonschema
import msgspec
import pytest
from transformers import AutoTokenizer

from conftest import cancel_after, spawn
from fixtures.build import ensure_model
from mlx_worker import protocol
from mlx_worker.client import RpcError

FAMILIES = {
    "qwen3": {"model": "tiny-qwen3-tools", "start": "<tool_call>", "end": "</tool_call>"},
    "mistral": {"model": "tiny-mistral-tools", "start": "[TOOL_CALLS]", "end": ""},
}
MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[THINK]", "[/THINK]"]

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
SEARCH = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "maxLength": 8},
        "filters": {
            "type": "object",
            "properties": {"lang": {"type": "string", "pattern": "^[a-z]{2}$"}, "safe": {"type": "boolean"}},
            "required": ["lang", "safe"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
    },
    "required": ["query", "filters", "tags"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": SEARCH}},
]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def paths():
    return {f: str(ensure_model(spec["model"])) for f, spec in FAMILIES.items()}


@pytest.fixture(scope="module")
def tw(paths):
    """One worker with both families loaded (model ids = family names)."""
    w = spawn()
    for family, path in paths.items():
        w.load(path, model_id=family)
    yield w
    w.close()


def token_id(w, family: str, text: str) -> int:
    ids = w.tokenize(model_id=family, text=text, add_special_tokens=False).tokens
    assert len(ids) == 1, (text, ids)
    return ids[0]


def run(w, family, **params):
    params.setdefault("messages", ASK)
    params.setdefault("max_tokens", 120)
    stream = w.generate(model_id=family, **params)
    events = [e for e in stream if isinstance(e, protocol.TokenEvent)]
    return stream.result, events


def check_channels(result, events, markers=MARKERS):
    """Streamed text per channel concatenates to the result's fields; all
    events together give `text`; markers appear only as marker events."""
    assert "".join(e.text for e in events) == result.text
    by = lambda ch: "".join(e.text for e in events if e.channel == ch)  # noqa: E731
    assert by("content") == result.content
    assert by("reasoning") == result.reasoning
    for e in events:
        if e.channel == "marker":
            assert e.text in markers, e.text
        else:
            assert not any(m in e.text for m in markers), (e.channel, e.text)
        assert (e.tool_call_index is not protocol.UNSET) == (e.channel == "tool_call")
    assert sum(len(e.tokens) for e in events) == len(result.tokens)
    calls: dict[int, str] = {}
    for e in events:
        if e.channel == "tool_call":
            calls[e.tool_call_index] = calls.get(e.tool_call_index, "") + e.text
    return calls


# Ids in the family's format: a Mistral template accepts only 9 alphanumerics.
ID_FORMAT = {"qwen3": r"call_[0-9a-f]{24}", "mistral": r"[A-Za-z0-9]{9}"}


def check_calls(result, names=None):
    assert result.tool_calls, result
    for call in result.tool_calls:
        assert call.name in (names or SCHEMAS), call
        jsonschema.Draft202012Validator(SCHEMAS[call.name]).validate(call.arguments)
        assert any(re.fullmatch(p, call.id) for p in ID_FORMAT.values()), call.id
    assert len({c.id for c in result.tool_calls}) == len(result.tool_calls)


# ------------------------------------------------------------- templates


def agent_conversation(openai_args_as_string: bool):
    def args(value):
        return json.dumps(value) if openai_args_as_string else value

    return [
        {"role": "system", "content": "You are a helpful agent."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "reasoning_content": "Two cities: two calls.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args({"city": "Paris", "days": 2, "unit": "celsius"})}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": args({"city": "Rome", "days": 2, "unit": "celsius"})}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 18}"},
        {"role": "tool", "tool_call_id": "call_2", "content": "{\"temp\": 24}"},
        {"role": "assistant", "content": "Paris 18, Rome 24."},
        {"role": "user", "content": "And search for umbrellas."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "search", "arguments": args({"query": "umbrella", "filters": {"lang": "en", "safe": True}, "tags": [1]})}},
        ]},
        {"role": "tool", "tool_call_id": "call_3", "content": "3 results"},
    ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("as_string", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_agent_conversation_renders_like_transformers(tw, paths, family, as_string, kwargs):
    messages = agent_conversation(as_string)
    if family == "mistral":  # Mistral's template has no reasoning and one system prompt
        messages = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]
    hf = AutoTokenizer.from_pretrained(paths[family])
    expected = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True, **kwargs)
    got = tw.tokenize(model_id=family, messages=messages, tools=TOOLS, chat_template_kwargs=kwargs)
    assert got.prompt == expected
    assert got.tokens == hf.encode(expected, add_special_tokens=False)
    assert FAMILIES[family]["start"] in got.prompt  # the calls were rendered, in the family's syntax
    # generate renders the same prompt
    result, _ = run(tw, family, messages=messages, tools=TOOLS, chat_template_kwargs=kwargs, max_tokens=1,
                    tool_choice="none")
    assert result.usage.prompt_tokens == len(got.tokens)


# -------------------------------------------------------- forced calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("choice", ["required", {"name": "search"},
                                    {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_are_valid_across_seeds_and_temperatures(tw, family, choice):
    """Every seed completes its first call: the schemas bound each call (strings
    of at most 10 characters, even escaped 6 tokens each; bounded integers and
    arrays; an enum) to about 100 tokens at most, within max_tokens (120)."""
    names = None if choice == "required" else [choice.get("name") or choice["function"]["name"]]
    for seed in range(3):
        for temperature in (0.0, 1.0, 3.0):
            result, events = run(tw, family, tools=TOOLS, tool_choice=choice, seed=seed, temperature=temperature)
            calls = check_channels(result, events)
            # The call starts at the first token: a marker event first.
            assert events[0].channel == "marker" and events[0].text == FAMILIES[family]["start"]
            check_calls(result, names)
            # Only max_tokens can cut a call (Mistral may chain calls until then).
            assert all(c.reason == "incomplete" for c in result.invalid_tool_calls)
            assert not result.invalid_tool_calls or result.stop_reason == "max_tokens"
            # Partial arguments were streamed: each call's streamed text parses
            # (with the family's syntax) to the reported arguments.
            assert calls
            first = calls[0]
            if family == "qwen3":
                body = json.loads(first)
                assert body == {"name": result.tool_calls[0].name, "arguments": result.tool_calls[0].arguments}
            else:
                name, _, args = first.partition("[ARGS]")
                assert (name, json.loads(args)) == (result.tool_calls[0].name, result.tool_calls[0].arguments)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_calls_are_constrained_once_started(tw, family):
    """auto: free until the model writes the start marker; from there the
    grammar holds it to a valid call. A bias of +100 on the start marker makes
    it the first token on every seed (it can't win inside a call: the grammar
    masks it), and max_tokens is room for a whole call."""
    start = token_id(tw, family, FAMILIES[family]["start"])
    for seed in range(3):
        result, events = run(tw, family, tools=TOOLS, tool_choice="auto", seed=seed, temperature=1.5,
                             logit_bias={str(start): 100.0}, max_tokens=160)
        check_channels(result, events)
        assert result.tokens[0] == start
        check_calls(result)
        assert all(c.reason == "incomplete" for c in result.invalid_tool_calls)


def test_mistral_several_calls_each_indexed(tw):
    """No end marker: a call ends at the next [TOOL_CALLS]. After a call only
    another call or EOS may follow; EOS pushed away, so calls follow calls
    until max_tokens cuts the last one. The calls are short (an empty-object
    tool), so 60 tokens hold several on any seed."""
    eos = token_id(tw, "mistral", "</s>")
    tools = [{"type": "function", "function": {"name": "ping"}}]
    result, events = run(tw, "mistral", tools=tools, tool_choice="required", seed=3, temperature=1.0,
                         logit_bias={str(eos): -100.0}, max_tokens=60)
    calls = check_channels(result, events)
    assert result.stop_reason == "max_tokens"
    assert len(result.tool_calls) >= 2 and len(calls) == len(result.tool_calls) + 1
    assert all((c.name, c.arguments) == ("ping", {}) for c in result.tool_calls)
    assert [c.reason for c in result.invalid_tool_calls] == ["incomplete"]
    assert result.invalid_tool_calls[0].text == calls[len(calls) - 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_none_never_calls(tw, family):
    start = token_id(tw, family, FAMILIES[family]["start"])
    for seed in range(4):
        result, events = run(tw, family, tools=TOOLS, tool_choice="none", seed=seed, temperature=1.5,
                             logit_bias={str(start): 50.0}, max_tokens=40)
        check_channels(result, events)
        assert start not in result.tokens
        assert not result.tool_calls and not result.invalid_tool_calls
        assert all(e.channel != "tool_call" for e in events)
    # The same bias without "none" starts a call at once: the bias is real.
    result, _ = run(tw, family, tools=TOOLS, seed=0, temperature=1.5, logit_bias={str(start): 50.0}, max_tokens=40)
    assert result.tokens[0] == start


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_that_opens_a_call(tw, family):
    """A host that prefills the start marker: the output completes that call
    under the grammar, and it is reported as a call."""
    prompt = tw.tokenize(model_id=family, messages=ASK, tools=TOOLS).prompt + FAMILIES[family]["start"]
    for seed in range(3):
        result, events = run(tw, family, messages=None, prompt=prompt, tools=TOOLS, seed=seed, temperature=1.0)
        check_channels(result, events)
        assert events[0].channel == "tool_call"
        check_calls(result)
        assert all(c.reason == "incomplete" for c in result.invalid_tool_calls)


# ------------------------------------------------------ interrupted calls


@pytest.mark.parametrize("family", FAMILIES)
def test_call_cut_by_max_tokens_is_incomplete(tw, family):
    result, events = run(tw, family, tools=TOOLS, tool_choice="required", seed=0, max_tokens=6)
    check_channels(result, events)
    assert result.stop_reason == "max_tokens"
    assert result.tool_calls == []
    assert [c.reason for c in result.invalid_tool_calls] == ["incomplete"]


def test_call_cut_by_stop_string_is_incomplete(tw):
    result, events = run(tw, "qwen3", tools=TOOLS, tool_choice="required", seed=0, stop='"arguments"')
    check_channels(result, events)
    assert result.stop_reason == "stop_string"
    assert result.tool_calls == []
    assert [c.reason for c in result.invalid_tool_calls] == ["incomplete"]
    assert result.invalid_tool_calls[0].text.endswith('", ')


@pytest.mark.parametrize("family", FAMILIES)
def test_cancel_inside_a_call_is_incomplete(tw, family):
    """The argument must be 1000 characters long (over 100 tokens), so the
    cancel sent at the call's 8th event lands inside the call."""
    tools = [{"type": "function", "function": {"name": "note", "parameters": {
        "type": "object", "properties": {"text": {"type": "string", "minLength": 1000, "maxLength": 1000}},
        "required": ["text"]}}}]
    stream = tw.generate(model_id=family, messages=ASK, tools=tools, tool_choice="required", seed=0,
                         temperature=0.0, max_tokens=2000)
    result = cancel_after(stream, 8, channel="tool_call")
    assert result.stop_reason == "cancelled"
    assert result.tool_calls == []
    assert [c.reason for c in result.invalid_tool_calls] == ["incomplete"]


def test_a_cancelled_result_from_the_streamed_events_reports_the_call():
    """When the work can't answer a cancelled generate itself (it failed after
    the cancel, or the worker exits first), the result is built from the
    token events sent: a call being streamed is reported as incomplete."""
    from mlx_worker.engine.result import Streamed, cancelled

    streamed = Streamed()
    for channel, text, index in [("content", "ok ", None), ("marker", "<tool_call>", None),
                                 ("tool_call", '\n{"name": ', 0), ("tool_call", '"f"', 0)]:
        event = protocol.TokenEvent(id="g", text=text, tokens=[1], channel=channel)
        if index is not None:
            event.tool_call_index = index
        streamed.record(event)
    result = cancelled(protocol.GenerateParams(prompt="hi"), streamed)
    assert (result.stop_reason, result.text, result.content) == ("cancelled", 'ok <tool_call>\n{"name": "f"', "ok ")
    assert result.tool_calls == []
    assert [(c.reason, c.text) for c in result.invalid_tool_calls] == [("incomplete", '\n{"name": "f"')]


# ------------------------------------------------------------- reasoning


def test_reasoning_split_exactly_at_markers(tw):
    think, end = token_id(tw, "qwen3", "<think>"), token_id(tw, "qwen3", "</think>")
    lark = f'start: <[{think}]> "\\nplan the route\\n" <[{end}]> "\\n\\nGo north."'
    for seed in range(3):
        result, events = run(tw, "qwen3", constraint={"type": "grammar", "lark": lark}, seed=seed,
                             temperature=1.0)
        check_channels(result, events)
        assert result.reasoning == "\nplan the route\n"
        assert result.content == "\n\nGo north."
        assert [e.text for e in events if e.channel == "marker"] == ["<think>", "</think>"]


def test_mistral_reasoning_markers(tw):
    think, end = token_id(tw, "mistral", "[THINK]"), token_id(tw, "mistral", "[/THINK]")
    lark = f'start: <[{think}]> "weigh it" <[{end}]> "Paris."'
    result, events = run(tw, "mistral", constraint={"type": "grammar", "lark": lark}, seed=0, temperature=1.0)
    check_channels(result, events, markers=["[THINK]", "[/THINK]"])
    assert (result.reasoning, result.content) == ("weigh it", "Paris.")


def test_reasoning_opened_in_the_prompt(tw):
    """A template that opens <think> in the generation prompt: generation
    starts in the reasoning channel."""
    end = token_id(tw, "qwen3", "</think>")
    hf_prompt = tw.tokenize(model_id="qwen3", messages=ASK).prompt
    lark = f'start: "step one" <[{end}]> "done"'
    result, events = run(tw, "qwen3", messages=None, prompt=hf_prompt + "<think>\n",
                         constraint={"type": "grammar", "lark": lark}, seed=0)
    check_channels(result, events)
    assert (result.reasoning, result.content) == ("step one", "done")
    assert events[0].channel == "reasoning"
    # enable_thinking=false closes the block in the prompt: content from the start
    result, events = run(tw, "qwen3", chat_template_kwargs={"enable_thinking": False}, seed=0, max_tokens=8,
                         tool_choice="none")
    assert result.reasoning == "" and events[0].channel in ("content", "marker")


def test_reasoning_then_call(tw):
    """auto on a thinking model whose prompt opened <think>: reasoning, then a
    call that the grammar holds to the tool's schema. Forced step by step:
    biases rank a letter, </think>, <tool_call> far above every other token,
    and a presence penalty larger than the biases drops each once written."""
    prompt = tw.tokenize(model_id="qwen3", messages=ASK, tools=TOOLS).prompt + "<think>\n"
    tail = tw.tokenize(model_id="qwen3", text=prompt, add_special_tokens=False).tokens[-20:]
    letter, end, start = (token_id(tw, "qwen3", t) for t in ("Z", "</think>", "<tool_call>"))
    assert not {letter, end, start} & set(tail)  # not penalized by the prompt
    result, events = run(tw, "qwen3", messages=None, prompt=prompt, tools=TOOLS, seed=0, temperature=1.0,
                         max_tokens=160, presence_penalty=200.0,
                         logit_bias={str(letter): 100.0, str(end): 90.0, str(start): 80.0})
    check_channels(result, events)
    assert result.tokens[:3] == [letter, end, start]
    assert [(e.channel, e.text) for e in events[:3]] == [("reasoning", "Z"), ("marker", "</think>"),
                                                           ("marker", "<tool_call>")]
    assert result.reasoning == "Z"
    check_calls(result)


# ------------------------------------------------------------ prompt cache


def test_tool_result_reuses_the_prompt_cache(tw):
    turn1, _ = run(tw, "qwen3", tools=TOOLS, tool_choice={"name": "get_weather"}, seed=5, temperature=0.0)
    call = turn1.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    turn2, _ = run(tw, "qwen3", messages=messages, tools=TOOLS, seed=5, temperature=0.0, max_tokens=12)
    # At least the first turn's prompt is reused, plus the call tokens the
    # template renders the same way.
    assert turn2.usage.cached_tokens > turn1.usage.prompt_tokens
    cold, _ = run(tw, "qwen3", messages=messages, tools=TOOLS, seed=5, temperature=0.0, max_tokens=12,
                  prompt_cache=False)
    assert cold.usage.cached_tokens == 0
    assert cold.tokens == turn2.tokens


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("params, code, field", [
    ({"tool_choice": "required"}, -32602, "params.tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"name": "nope"}}, -32602, "params.tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, -32602, "params.tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, -32602, "params.tools[0].function.name"),
    ({"tools": TOOLS + [TOOLS[0]]}, -32602, "params.tools[2].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "minProperties": "2"}}}]},
     -32007, "params.tools[0].function.parameters"),
    ({"tools": TOOLS, "constraint": {"type": "regex", "pattern": "a+"}}, -32602, "params.constraint"),
])
def test_bad_tool_params_are_named(tw, params, code, field):
    with pytest.raises(RpcError) as err:
        run(tw, "qwen3", **params)
    assert err.value.code == code, err.value
    assert err.value.data["field"] == field
    result, _ = run(tw, "qwen3", max_tokens=2)  # still serving
    assert result.stop_reason == "max_tokens"


def test_load_reports_the_family(tw, paths):
    qwen = tw.load(paths["qwen3"], model_id="qwen3")
    assert (qwen.tool_call_format, qwen.tool_grammar, qwen.reasoning_markers) == ("json_tools", True, ["<think>", "</think>"])
    mistral = tw.load(paths["mistral"], model_id="mistral")
    # [THINK]/[/THINK] (Magistral): a family mlx-lm's detection misses, added by the worker
    assert (mistral.tool_call_format, mistral.tool_grammar, mistral.reasoning_markers) == (
        "mistral", True, ["[THINK]", "[/THINK]"])


def test_typed_client_tools_and_channels(tw):
    """The client takes typed tools and reads the stream by channel."""
    tool = protocol.Tool(function=protocol.ToolFunction(name="get_weather", parameters=WEATHER))
    stream = tw.generate(model_id="qwen3", messages=ASK, tools=[tool], tool_choice=protocol.NamedToolChoice(
        name="get_weather"), max_tokens=120, seed=2)
    result = stream.wait()
    assert stream.channel_text("content") == result.content
    texts = stream.tool_call_texts()
    assert [json.loads(t)["arguments"] for t in texts[: len(result.tool_calls)]] == [c.arguments for c in result.tool_calls]
    check_calls(result, ["get_weather"])


def test_tools_on_a_model_without_a_call_format(worker):
    """tiny-llama's ChatML template has no tool-call format: calls can't be
    constrained, so tools are refused (fail closed) unless tool_choice is none."""
    with pytest.raises(RpcError) as err:
        worker.generate(model_id="tiny", prompt="hi", tools=TOOLS, max_tokens=2).wait()
    assert err.value.code == -32007 and err.value.data["field"] == "params.tools"
    result = worker.generate(model_id="tiny", prompt="hi", tools=TOOLS, tool_choice="none", max_tokens=2).wait()
    assert result.stop_reason in ("max_tokens", "eos") and result.tool_calls == []


def test_merged_events_keep_their_channels(paths):
    """A host that stops reading: the worker merges queued token events, but
    only those of one channel (and call), and never markers, so channels
    still add up. A bias on <tool_call> (masked inside a call) starts a new
    call right after each one ends: `</tool_call>` and `<tool_call>` are
    back to back, several times after the pipe is full (each call is over
    45 tokens: a 300-character argument, of letters: no marker text in it)."""
    from harness import RawWorker

    w = RawWorker()
    try:
        w.call("load", {"model": paths["qwen3"], "model_id": "qwen3"})
        tools = [{"type": "function", "function": {"name": "note", "parameters": {
            "type": "object", "properties": {"text": {"type": "string", "minLength": 300, "maxLength": 310, "pattern": "^[a-z ]+$"}},
            "required": ["text"]}}}]
        marker = w.call("tokenize", {"model_id": "qwen3", "text": "<tool_call>", "add_special_tokens": False})["result"]["tokens"]
        start = len(w.messages)
        w.pause_reading()
        w.request("generate", {"messages": ASK, "tools": tools, "tool_choice": "required", "seed": 0,
                               "max_tokens": 800, "top_logprobs": 20, "logit_bias": {str(marker[0]): 100}}, id="g")
        time.sleep(3.0)  # the pipe fills with ~1 KB events
        w.resume_reading()
        result = msgspec.convert(w.response("g", timeout=120)["result"], protocol.GenerateResult)
        events = [msgspec.convert(m["params"], protocol.TokenEvent) for m in w.messages[start:] if m.get("method") == "token"]
        assert len(events) < len(result.tokens) + 2, "token events were not merged"
        check_channels(result, events)
        markers = [e.text for e in events if e.channel == "marker"]
        assert markers[:4] == ["<tool_call>", "</tool_call>", "<tool_call>", "</tool_call>"]
        assert len(result.tool_calls) >= 2 and all(c.name == "note" for c in result.tool_calls)
    finally:
        w.close()


# --------------------------------------------- markers spelled in pieces


def spelled(w, text: str) -> str:
    """Lark for `text` written in ordinary tokens (never its added token)."""
    cut = len(text) - 2
    ids = w.tokenize(model_id="qwen3", text=text[:cut], add_special_tokens=False).tokens
    ids += w.tokenize(model_id="qwen3", text=text[cut:], add_special_tokens=False).tokens
    assert len(ids) > 1 and w.detokenize(ids, model_id="qwen3") == text
    return " ".join(f"<[{t}]>" for t in ids)


@pytest.mark.parametrize("choice, tools", [("none", TOOLS), ("auto", None)])
def test_a_start_marker_spelled_in_pieces_is_text(tw, choice, tools):
    """`<tool_call>` written in ordinary tokens skipped the grammar and "none":
    a call opens only at the start marker's token, so this is content."""
    body = r'"\n{\"name\": \"get_weather\", \"arguments\": {\"city\": 5, \"extra\": 1}}\n"'
    lark = f'start: {spelled(tw, "<tool_call>")} {body} {spelled(tw, "</tool_call>")}'
    result, events = run(tw, "qwen3", tools=tools, tool_choice=choice, constraint={"type": "grammar", "lark": lark},
                         temperature=0.0)
    assert result.text.startswith("<tool_call>\n{") and result.stop_reason == "eos"
    assert token_id(tw, "qwen3", "<tool_call>") not in result.tokens
    assert result.tool_calls == [] and result.invalid_tool_calls == []
    # the stray end marker stays a marker (as any stray marker); no call channel
    assert [e.text for e in events if e.channel == "marker"] == ["</tool_call>"]
    assert {e.channel for e in events} == {"content", "marker"}
    assert result.content + "</tool_call>" == result.text


def test_the_start_token_inside_content_text_still_opens_a_call(tw):
    """The same text after spelled pieces: the real token opens the call."""
    lark = f'start: {spelled(tw, "<tool_call>")} "x" <[{token_id(tw, "qwen3", "<tool_call>")}]> "\\n"'
    result, events = run(tw, "qwen3", constraint={"type": "grammar", "lark": lark}, temperature=0.0)
    assert result.content == "<tool_call>x"
    assert [e.text for e in events if e.channel == "marker"] == ["<tool_call>"]
    assert [c.text for c in result.invalid_tool_calls] == ["\n"]


def test_an_end_marker_spelled_inside_the_arguments_is_text(tw):
    """A string argument may hold the text `</tool_call>` (in ordinary
    tokens): it is the call's text, the call ends at the end marker token."""
    tools = [{"type": "function", "function": {"name": "note", "parameters": {
        "type": "object", "properties": {"text": {"type": "string", "pattern": "^</tool_call>$"}},
        "required": ["text"], "additionalProperties": False}}}]
    result, events = run(tw, "qwen3", tools=tools, tool_choice="required", temperature=0.0, max_tokens=60)
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("note", {"text": "</tool_call>"})]
    assert result.invalid_tool_calls == []
    assert [e.text for e in events if e.channel == "marker"][:2] == ["<tool_call>", "</tool_call>"]


def test_a_constraint_writes_marker_text_in_ordinary_tokens(tw):
    """Qwen3's `<think>` / `<tool_call>` are non-special added tokens. The
    mask let the added token through for the text, and the matcher refused it
    (-32007 after one token). Constrained text is now written in ordinary
    tokens (a grammar names a marker token with `<[id]>`), so it is text:
    a spelled `<tool_call>` opens no call."""
    lark = 'start: "<think>ok</think>" "<tool_call>"'
    result, events = run(tw, "qwen3", constraint={"type": "grammar", "lark": lark}, temperature=0.0)
    assert result.text == "<think>ok</think><tool_call>" and result.constraint_complete is True
    markers = {token_id(tw, "qwen3", m) for m in ("<think>", "</think>", "<tool_call>")}
    assert not markers & set(result.tokens)
    assert result.tool_calls == [] and result.invalid_tool_calls == []


# ------------------------------------------------- none, ignore_eos, cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tools", [TOOLS, None])
def test_none_keeps_ignore_eos(tw, family, tools):
    """"none" only bans the start marker: not a grammar, so ignore_eos holds."""
    eos = tw.load(str(ensure_model(FAMILIES[family]["model"])), model_id=family).eos_token_ids
    result, _ = run(tw, family, tools=tools, tool_choice="none", ignore_eos=True, max_tokens=10,
                    logit_bias={str(eos[0]): 100.0})
    assert (result.stop_reason, len(result.tokens)) == ("max_tokens", 10)
    assert eos[0] in result.tokens


def test_cache_save_with_tools(tw, worker, tmp_path):
    """cache_save samples nothing: tools only shape the prompt, on a model
    without a call grammar too (it had no tool_choice to say "none")."""
    for w, model in ((worker, "tiny"), (tw, "qwen3")):
        path = str(tmp_path / f"{model}.safetensors")
        saved = w.call("cache_save", {"model_id": model, "messages": ASK, "tools": TOOLS, "path": path})
        expected = w.tokenize(model_id=model, messages=ASK, tools=TOOLS).tokens
        assert saved["prompt_tokens"] == len(expected) and saved["path"] == path
