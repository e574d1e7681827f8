"""titletune/prompt.py: the question rotation, the prompt template and the training examples."""
from __future__ import annotations

import pytest

from titletune.params import Format
from titletune.prompt import (IGNORE_INDEX, INSTRUCTION_TEMPLATE, build_prompt, encode_prompts, format_batch,
                              pick_question, token_ids)
from titletune.testing import ROOT

TINY = ROOT / "models" / "tiny-llama"
FMT = Format(style="instruction", max_length=128, max_chars="auto",
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
        ids = encode_prompts(tokenizer, ["What is X?"], style)[0]
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1, style
        # a question without special-token strings: the ids of the whole prompt, as always
        assert ids == tokenizer(build_prompt(tokenizer, "What is X?", style), add_special_tokens=style == "instruction")["input_ids"]


HOSTILE = "Mug </s><s> <|user|> <|assistant|> <pad> <|eot_id|>"   # the tiny tokenizer's special tokens, and Llama 3's


@pytest.mark.parametrize("style", ["instruction", "chat"])
def test_special_token_strings_in_a_title_stay_text(tokenizer, style):
    ids = encode_prompts(tokenizer, [f"What is {HOSTILE}?"], style)[0]
    specials = {tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>")}
    template = encode_prompts(tokenizer, ["What is X?"], style)[0]
    # only the template's own special tokens (BOS; the chat template's markers and EOS) are special
    assert [i for i in ids if i in specials] == [i for i in template if i in specials]
    assert HOSTILE in tokenizer.decode(ids)
    assert tokenizer.decode(ids) == tokenizer.decode(template).replace("X", HOSTILE)


def test_special_token_strings_in_a_description_stay_text(tokenizer):
    batch = {"uid": ["B1"], "title": [HOSTILE], "content": [f"Fits </s> and <s> lids. {HOSTILE}"]}
    out = format_batch(batch, tokenizer, FMT.model_copy(update={"max_length": 1024}))
    ids, mask = out["input_ids"][0], out["completion_mask"][0]
    assert not out["truncated"][0]
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id   # only the real end
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m][:-1]) == batch["content"][0]


def test_long_texts_are_cut_before_tokenising(tokenizer):
    fmt = FMT.model_copy(update={"max_chars": 40})
    batch = {"uid": ["B1", "B2", "B3"], "title": ["T" * 41, "Mug", "Mug"],
             "content": ["short enough description", "word " * 10_000, "exactly forty characters, no more, no le"]}
    out = format_batch(batch, tokenizer, fmt)
    assert out["cut"] == [True, True, False]
    assert out["question"][0].count("T") == 40
    content_ids = [i for i, m in zip(out["input_ids"][1], out["completion_mask"][1]) if m]
    assert tokenizer.decode(content_ids[:-1]) == ("word " * 8)[:40]
    assert FMT.text_cap() == 16 * FMT.max_length


def test_the_default_cut_keeps_every_token_id(tokenizer):
    """auto (16 characters a token) cuts far beyond max_length tokens: the ids are those of the whole text."""
    words = " ".join(f"w{i}x" for i in range(2000))
    batch = {"uid": ["B1"], "title": ["Mug"], "content": [words]}
    out = format_batch(batch, tokenizer, FMT)
    assert out["cut"] == [True] and len(out["input_ids"][0]) == FMT.max_length
    whole = FMT.model_copy(update={"max_chars": len(words)})
    assert format_batch(batch, tokenizer, whole)["input_ids"] == out["input_ids"]


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
    assert out["full_length"][0] == len(ids)
    # the long one is cut at max_length and flagged
    assert len(out["input_ids"][1]) == FMT.max_length and out["truncated"][1]
    assert out["full_length"][1] > FMT.max_length


@pytest.mark.parametrize("add_special_tokens", [False, True])
@pytest.mark.parametrize("split_special_tokens", [False, True])
def test_token_ids_are_those_of_the_tokenizers_own_call(tokenizer, add_special_tokens, split_special_tokens):
    texts = ["A red kettle.", f"Fits </s> and <s> lids. {HOSTILE}", "", "word " * 300, "caf\u00e9 \u2014 \U0001f375"]
    expected = tokenizer(texts, add_special_tokens=add_special_tokens, split_special_tokens=split_special_tokens)
    assert token_ids(tokenizer, texts, add_special_tokens, split_special_tokens) == expected["input_ids"]
    # the Rust tokenizer is left as it was: a later plain call still treats </s> as the special token
    assert tokenizer("</s>", add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]


def test_labels_are_the_ids_with_the_prompt_ignored(tokenizer):
    batch = {"uid": ["B1", "B2"], "title": ["Red Kettle", "Blue Mug"], "content": ["A red kettle for tea.", "word " * 400]}
    out = format_batch(batch, tokenizer, FMT)
    for ids, mask, labels in zip(out["input_ids"], out["completion_mask"], out["labels"]):
        assert labels == [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    assert out["prompt_only"] == [False, False]


def test_a_prompt_that_fills_max_length_is_marked_prompt_only(tokenizer):
    batch = {"uid": ["B1"], "title": ["Kettle " * 200], "content": ["A red kettle for tea."]}
    out = format_batch(batch, tokenizer, FMT)
    assert out["prompt_only"] == [True] and len(out["input_ids"][0]) == FMT.max_length
    assert not any(out["completion_mask"][0]) and set(out["labels"][0]) == {IGNORE_INDEX}
