"""The prompt: what the model sees before its answer, the same in training, evaluation and `ask`.

Edit the wording here: `dvc repro` then re-runs tokenize-format and everything after it.
"""
from __future__ import annotations

import zlib

from titletune.cli import UserError

# Our own wording for base models (the seed notebook used an Alpaca-style instruction).
INSTRUCTION_TEMPLATE = (
    "Below is a question about a product. Write a response that answers it.\n\n"
    "### Question:\n{question}\n\n### Response:\n"
)


def pick_question(questions: list[str], uid: str) -> str:
    """The question phrasing for a record: deterministic by uid, independent of order."""
    return questions[zlib.crc32(uid.encode("utf-8")) % len(questions)]


def build_prompt(tokenizer, question: str, style: str) -> str:
    """`format.style` instruction: our template (base models); chat: the tokenizer's chat template."""
    if style == "instruction":
        return INSTRUCTION_TEMPLATE.format(question=question)
    if style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("format.style is 'chat' but the tokenizer has no chat template; "
                            "use style: instruction for base models")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    raise ValueError(f"format.style: {style!r}")  # params.Format allows only the two above


def encode_prompts(tokenizer, prompts, style: str, **kwargs):
    """Tokenise prompts from build_prompt as training does: the chat template writes its own BOS,
    the plain instruction template relies on the tokenizer adding it."""
    return tokenizer(prompts, add_special_tokens=style == "instruction", **kwargs)


def format_batch(batch: dict, tokenizer, fmt) -> dict:
    """Training examples for a batch of records (uid, title, content): the question and prompt
    text, the completion (the description + EOS), `input_ids` (prompt + completion, cut at
    `format.max_length`) and `completion_mask` (1 on the completion tokens: only they carry loss)."""
    questions = [pick_question(fmt.questions, uid).format(title=title)
                 for uid, title in zip(batch["uid"], batch["title"])]
    prompts = [build_prompt(tokenizer, q, fmt.style) for q in questions]
    completions = [content + tokenizer.eos_token for content in batch["content"]]
    prompt_ids = encode_prompts(tokenizer, prompts, fmt.style)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    input_ids, masks, lengths, truncated = [], [], [], []
    for p, c in zip(prompt_ids, completion_ids):
        ids = (p + c)[: fmt.max_length]
        input_ids.append(ids)
        masks.append([0] * len(p) + [1] * (len(ids) - len(p)))
        lengths.append(len(p) + len(c))
        truncated.append(len(p) + len(c) > fmt.max_length)
    return {"question": questions, "prompt": prompts, "completion": completions,
            "input_ids": input_ids, "completion_mask": masks,
            "full_length": lengths, "truncated": truncated}
