"""detokenize decodes exactly as generated text does.

Many real tokenizers ship ``clean_up_tokenization_spaces: true`` (it turns
" ," into "," and " 's" into "'s"). Generated text must be the exact
continuation, so it never cleans up; detokenize must not either, or a host
that detokenizes prompt + tokens gets another text than the one streamed.
"""

from __future__ import annotations

import json
import shutil

import pytest

from mlx_worker import protocol
from tests.conftest import spawn

PROMPT = "Yes , it is . Is it ? No !"


@pytest.fixture(scope="module")
def cleanup_model(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("cleanup") / "tiny-llama-cleanup"
    shutil.copytree(tiny_model, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["clean_up_tokenization_spaces"] = True
    # transformers 5 applies the clean-up to non-BPE tokenizers only (Unigram,
    # WordPiece: many SentencePiece checkpoints) unless told to for BPE too.
    config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = True
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return str(folder)


def test_detokenize_matches_prompt_plus_streamed_text(cleanup_model):
    w = spawn()
    try:
        w.load(cleanup_model, model_id="c")
        prompt_ids = w.tokenize(model_id="c", text=PROMPT).tokens
        # The tokenizer is the one the test means: its own decode would clean up.
        assert w.detokenize(prompt_ids, model_id="c") == PROMPT
        comma = w.tokenize(model_id="c", text=" ,").tokens
        # A bias towards " ," makes the continuation need the same care.
        stream = w.generate(model_id="c", prompt=PROMPT, max_tokens=12, temperature=0, ignore_eos=True,
                            logit_bias={str(t): 8.0 for t in comma})
        streamed = "".join(e.text for e in stream if isinstance(e, protocol.TokenEvent))
        result = stream.result
        assert streamed == result.text
        assert w.detokenize(prompt_ids + result.tokens, model_id="c") == PROMPT + result.text
    finally:
        w.close()
