"""Build the embedded tiny base model: a ~1 M-parameter Llama with a byte-level BPE tokenizer.

It exists so that the whole pipeline runs offline on 2 CPU cores (CI, first try) through the
same `from_pretrained(path)` code as a hub model. Weights are random (seeded): the model knows
nothing, so fine-tuning has an easy, measurable job. Deterministic: same corpus + args give
byte-identical files.

    python scripts/make_tiny_model.py [--corpus data/sample/trn.json.gz] [--out models/tiny-llama]
"""
from __future__ import annotations

import argparse
import gzip
import html
import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# A minimal chat template so that `format.style: chat` works on the tiny model as on an instruct model.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus_texts(path: Path):
    """Titles and descriptions of the sample, HTML-unescaped like the preprocess stage does."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            yield html.unescape(record["title"])
            if record["content"]:
                yield html.unescape(record["content"])


def build_tokenizer(corpus: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sorted(set(corpus_texts(corpus))), trainer=trainer)
    # Llama-style: every encoded text starts with BOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        chat_template=CHAT_TEMPLATE, model_max_length=1024, padding_side="right")


def build_model(tokenizer, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("data/sample/trn.json.gz"))
    ap.add_argument("--out", type=Path, default=Path("models/tiny-llama"))
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tokenizer = build_tokenizer(args.corpus, args.vocab_size)
    model = build_model(tokenizer, args.hidden, args.layers, args.seed)
    if args.out.exists():
        shutil.rmtree(args.out)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n_params / 1e6:.2f} M params, vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
