"""The prompt: what the model sees before its answer, the same in training, evaluation and `ask`.

Edit the wording here: `dvc repro` then re-runs tokenize-format and everything after it.
"""
from __future__ import annotations

import zlib

from titletune.cli import UserError

# Where the question goes when a chat template is cut into pieces around it (private-use characters:
# in no template).
SLOT = "\ue000question\ue001"
# The label of a token that carries no loss (transformers' and PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100
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


def token_ids(tokenizer, texts: list[str], add_special_tokens: bool = False,
              split_special_tokens: bool = False) -> list[list[int]]:
    """`tokenizer(texts, ...)["input_ids"]`, from the Rust tokenizer itself where there is one: the
    same ids (tests/test_prompt.py checks), a third faster on big batches (transformers builds a
    Python object of offsets and masks for every text, which we never use). A slow (Python)
    tokenizer, or one whose tokenizer.json pads or truncates, goes through transformers' call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation or backend.padding:
        return tokenizer(texts, add_special_tokens=add_special_tokens,
                         split_special_tokens=split_special_tokens)["input_ids"]
    before = backend.encode_special_tokens
    backend.encode_special_tokens = split_special_tokens
    try:
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
    finally:
        backend.encode_special_tokens = before


def encode_text(tokenizer, texts: list[str]) -> list[list[int]]:
    """User text (a title, a description, a question) as text: a special-token string in it
    (`</s>`, `<s>`, `<|eot_id|>`) becomes the tokens of its characters, never the special token."""
    return token_ids(tokenizer, texts, split_special_tokens=True)


def encode_prompts(tokenizer, questions: list[str], style: str,
                   prompts: list[str] | None = None) -> list[list[int]]:
    """The token ids of build_prompt's prompt around each question, as training, evaluation and
    `ask` see them (`prompts`: those prompts, where the caller has built them already). The
    question is user text (encode_text): only the template's own special tokens are special.
    `instruction`: our template has none, so the whole prompt is encoded as text, plus the BOS the
    tokenizer adds. `chat`: the chat template writes its own BOS and role markers; a question with
    a special-token string in it is encoded on its own, as text, between the template's pieces
    (any other, as the whole prompt: the same ids, and what it always was)."""
    if prompts is None:
        prompts = [build_prompt(tokenizer, q, style) for q in questions]
    if style == "instruction":
        return token_ids(tokenizer, prompts, add_special_tokens=True, split_special_tokens=True)
    ids = token_ids(tokenizer, prompts)
    specials = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    for i, question in enumerate(questions):
        if any(special in question for special in specials):
            pieces = build_prompt(tokenizer, SLOT, style).split(SLOT)
            ids[i] = token_ids(tokenizer, pieces[:1])[0]
            for piece in pieces[1:]:
                ids[i] += encode_text(tokenizer, [question])[0] + token_ids(tokenizer, [piece])[0]
    return ids


def format_batch(batch: dict, tokenizer, fmt) -> dict:
    """Training examples for a batch of records (uid, title, content): the question and prompt
    text, `input_ids` (prompt + completion, the description and EOS, cut at
    `format.max_length`), `completion_mask` (1 on the completion tokens: only they carry loss) and
    `labels` (the same as the trainer takes them: input_ids, IGNORE_INDEX on the prompt), so that
    training needs no pass over the data to build them;
    `prompt_only` marks an example whose prompt alone fills max_length (nothing to learn from).

    Titles and descriptions are data: a special-token string in them stays text (encode_text), and
    each is cut at `format.max_chars` characters before tokenising (`cut` says which records were),
    so that one huge record cannot fill the memory; with `auto` the cut lies far beyond max_length
    tokens and changes no token id that is kept."""
    cap = fmt.text_cap()
    titles = [title[:cap] for title in batch["title"]]
    questions = [pick_question(fmt.questions, uid).format(title=title) for uid, title in zip(batch["uid"], titles)]
    prompts = [build_prompt(tokenizer, q, fmt.style) for q in questions]
    prompt_ids = encode_prompts(tokenizer, questions, fmt.style, prompts)
    completion_ids = [ids + [tokenizer.eos_token_id]
                      for ids in encode_text(tokenizer, [content[:cap] for content in batch["content"]])]
    input_ids, masks, labels, lengths, truncated, prompt_only = [], [], [], [], [], []
    for p, c in zip(prompt_ids, completion_ids):
        ids = (p + c)[: fmt.max_length]
        prompt_len = min(len(p), len(ids))
        input_ids.append(ids)
        masks.append([0] * prompt_len + [1] * (len(ids) - prompt_len))
        labels.append([IGNORE_INDEX] * prompt_len + ids[prompt_len:])
        lengths.append(len(p) + len(c))
        truncated.append(len(p) + len(c) > fmt.max_length)
        prompt_only.append(prompt_len == len(ids))
    cut = [len(title) > cap or len(content) > cap for title, content in zip(batch["title"], batch["content"])]
    return {"question": questions, "prompt": prompts,
            "input_ids": input_ids, "completion_mask": masks, "labels": labels,
            "full_length": lengths, "truncated": truncated, "cut": cut, "prompt_only": prompt_only}
