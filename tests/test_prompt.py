"""titletune/prompt.py: the question rotation, the prompt template and the training examples."""
from __future__ import annotations

import pytest

from titletune.params import Format
from titletune.prompt import INSTRUCTION_TEMPLATE, build_prompt, encode_prompts, format_batch, pick_question
from titletune.testing import ROOT

TINY = ROOT / "models" / "tiny-llama"
FMT = Format(style="instruction", max_length=128,
             questions=["Describe this product: {title}", "What is {title}?", "Tell me about {title}."])


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY)


def test_question_rotation_is_deterministic_and_uses_every_phrasing():
    uids = [f"B{i:09d}" for i in range(200)]
    first = [pick_question(FMT.questions, u) for u in uids]
    assert first == [pick_question(FMT.questions, u) for u in reversed(uids)][::-1]
    assert set(first) == set(FMT.questions)


def test_instruction_prompt_is_the_template_around_the_question(tokenizer):
    prompt = build_prompt(tokenizer, "What is Blue Mug?", "instruction")
    assert prompt == INSTRUCTION_TEMPLATE.format(question="What is Blue Mug?")
    assert prompt.endswith("### Question:\nWhat is Blue Mug?\n\n### Response:\n")


def test_chat_style_uses_the_tokenizers_template(tokenizer):
    prompt = build_prompt(tokenizer, "What is Blue Mug?", "chat")
    assert prompt.startswith(tokenizer.bos_token) and prompt.endswith("<|assistant|>\n")
    assert "<|user|>\nWhat is Blue Mug?" in prompt


def test_chat_style_without_a_chat_template_is_a_user_error(tokenizer):
    from titletune.cli import UserError
    plain = type("Plain", (), {"chat_template": None})()
    with pytest.raises(UserError, match="no chat template; use style: instruction"):
        build_prompt(plain, "What is X?", "chat")


def test_bos_once_in_both_styles(tokenizer):
    for style in ("instruction", "chat"):
        ids = encode_prompts(tokenizer, build_prompt(tokenizer, "What is X?", style), style)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1, style


def test_format_masks_the_prompt_and_ends_with_eos(tokenizer):
    batch = {"uid": ["B1", "B2"], "title": ["Red Kettle", "Blue Mug"],
             "content": ["A red kettle for tea.", "word " * 400]}
    out = format_batch(batch, tokenizer, FMT)
    prompt_ids = tokenizer(out["prompt"][0])["input_ids"]
    ids, mask = out["input_ids"][0], out["completion_mask"][0]
    assert ids[:len(prompt_ids)] == prompt_ids and ids[0] == tokenizer.bos_token_id
    assert mask == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))  # loss on the answer only
    assert ids[-1] == tokenizer.eos_token_id and not out["truncated"][0]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True) == batch["content"][0]
    assert out["question"][0] == pick_question(FMT.questions, "B1").format(title="Red Kettle")
    assert out["question"][0] in out["prompt"][0]
    assert out["completion"][0] == "A red kettle for tea." + tokenizer.eos_token
    assert out["full_length"][0] == len(ids)
    # the long one is cut at max_length and flagged
    assert len(out["input_ids"][1]) == FMT.max_length and out["truncated"][1]
    assert out["full_length"][1] > FMT.max_length
