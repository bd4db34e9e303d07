"""`auto` on a format whose first recipient is grammar (Functionary v3.2's
``>>>all\\n``): once the header says "text", the answer is free text, not
only EOS (as after a call of that family)."""

from __future__ import annotations

from conftest import spawn
from fixtures.build import ensure_model
from mlx_worker import protocol
from test_tool_families import ASK, TOOLS


def test_functionary_text_answer_continues_after_the_all_header():
    w = spawn()
    try:
        load = w.load(str(ensure_model("tiny-functionary-v32-tools")), model_id="f")
        all_id = w.tokenize(model_id="f", text="all", add_special_tokens=False).tokens[0]
        bias = {str(all_id): 30.0, **{str(e): -1e9 for e in load.eos_token_ids}}
        for seed in range(2):
            stream = w.generate(model_id="f", messages=ASK, tools=TOOLS, tool_choice="auto", seed=seed,
                                temperature=1.0, max_tokens=20, logit_bias=bias)
            events = [e for e in stream if isinstance(e, protocol.TokenEvent)]
            result = stream.result
            assert result.text.startswith("all\n"), result.text
            assert result.stop_reason == "max_tokens" and len(result.tokens) == 20, (result.stop_reason, result.text)
            assert not result.tool_calls and not result.invalid_tool_calls
            assert result.content and "".join(e.text for e in events if e.channel == "content") == result.content
    finally:
        w.close()
