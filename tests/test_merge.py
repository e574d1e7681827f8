"""titletune/export/merge.py: what the merged model's folder carries (chat template, EOS) and the
parity comparison with base + adapter (pure functions; the stage itself: tests/test_export.py)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from titletune.cli import UserError
from titletune.export.merge import (compare, parity_problems, set_generation_eos, token_mismatch,
                                    training_chat_template)
from titletune.prompt import build_prompt, encode_prompts
from titletune.testing import ROOT

TOLERANCES = SimpleNamespace(parity_max_token_mismatch=0.25, parity_max_nll_diff=0.05)


def test_token_mismatch_counts_everything_after_the_first_differing_token():
    assert token_mismatch([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == (0, 4)
    assert token_mismatch([[1, 2, 3, 4]], [[1, 9, 3, 4]]) == (3, 4)     # the path differs from token 2 on
    assert token_mismatch([[1, 2]], [[1, 2, 3, 4]]) == (2, 4)           # one stopped (EOS) earlier
    assert token_mismatch([[], [5]], [[], [5]]) == (0, 1)


def test_compare_and_the_tolerances():
    reference = {"answers": [[1, 2, 3, 4], [5, 6]], "nll": [1.0, 2.0]}
    same = compare(reference, {"answers": [[1, 2, 3, 4], [5, 6]], "nll": [1.0, 2.0 + 1e-7]})
    assert same["answers_identical"] == 2 and same["token_mismatch"] == 0 and same["answer_tokens"] == 6
    assert same["nll_max_abs_diff"] == pytest.approx(1e-7) and parity_problems(same, TOLERANCES) == []

    off = compare(reference, {"answers": [[1, 9, 9, 9], [5, 6]], "nll": [1.2, 2.0]})
    assert off["token_mismatch"] == 0.5 and off["nll_max_abs_diff"] == pytest.approx(0.2)
    problems = parity_problems(off, TOLERANCES)
    assert problems[0] == ("greedy token mismatch 0.5 > export.parity_max_token_mismatch 0.25 "
                           "(1 of 2 answers differ)")
    assert problems[1].startswith("per-token NLL differs by up to 0.2 nats > export.parity_max_nll_diff 0.05")


def test_a_nan_score_fails_the_gate():
    broken = compare({"answers": [[1]], "nll": [1.0]}, {"answers": [[1]], "nll": [math.nan]})
    assert math.isnan(broken["nll_max_abs_diff"])
    assert len(parity_problems(broken, TOLERANCES)) == 1


def tiny_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ROOT / "models/tiny-llama")


def formatted(tok, questions: list[str]) -> list[dict]:
    """Examples as tokenize-format writes them (the columns the template is derived from)."""
    prompts = [build_prompt(tok, q, "instruction") for q in questions]
    ids = encode_prompts(tok, questions, "instruction")
    return [{"question": q, "prompt": p, "input_ids": i} for q, p, i in zip(questions, prompts, ids)]


def test_the_chat_template_writes_the_instruction_training_prompt():
    tok = tiny_tokenizer()
    examples = formatted(tok, ["What is A?", "Describe this product: B"])
    tok.chat_template = training_chat_template(tok, examples)
    question = 'What is "Ünïcode" \\ {title} {{ x }} {% raw %}?'    # quotes, escapes, Jinja syntax, non-ASCII
    rendered = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]
    assert rendered == formatted(tok, [question])[0]["input_ids"] and rendered[0] == tok.bos_token_id
    answer = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                     tokenize=False)
    assert answer.endswith("### Response:\na" + tok.eos_token)


def test_prompts_that_are_not_one_template_are_refused():
    tok = tiny_tokenizer()
    examples = formatted(tok, ["What is A?", "What is B?"])
    examples[1]["prompt"] = "Another wording: What is B?"
    with pytest.raises(UserError, match="not one text around the question"):
        training_chat_template(tok, examples)


@pytest.mark.parametrize("base_eos, expected", [(2, 2), (None, 2), (7, [2, 7]), ([7, 8], [2, 7, 8]), ([8, 2], [8, 2])])
def test_generation_config_stops_on_the_tokenizers_eos(base_eos, expected):
    from transformers import GenerationConfig
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0, bos_token_id=1)
    config = GenerationConfig(eos_token_id=base_eos)
    set_generation_eos(config, tok)
    assert config.eos_token_id == expected and config.pad_token_id == 0 and config.bos_token_id == 1
