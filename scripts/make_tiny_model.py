"""Build the embedded tiny base model: a ~1 M-parameter Llama with a SentencePiece BPE tokenizer.

It exists so that the whole pipeline runs offline on 2 CPU cores (CI, first try) through the
same `from_pretrained(path)` code as a hub model. Like a real base model it is pretrained on
plain text — product titles and descriptions of a synthetic corpus made with another seed than
the embedded sample (so no test description is seen) — and has never seen a question/answer
prompt: fine-tuning teaches it to answer. Deterministic on a given machine and torch version
(seeded init, data order and corpus); a few minutes on 2 cores.

The tokenizer is built the way Llama 2's, Mistral's and Gemma's were: a SentencePiece BPE model
(tokenizer.model, byte fallback, no normalisation), here of 2,048 pieces, and transformers'
conversion of it (tokenizer.json). llama.cpp's converter reads tokenizer.model, as for those
models, so the tiny model goes through the same GGUF export as a real one (a byte-level BPE of
our own, like GPT-2's, is refused: llama.cpp knows BPE pre-tokenizers only by the hash of a known
model's output). Llama 3's own 128,256-token vocabulary would make the embedding 16 M
parameters (64 MB in float32, more than the model's whole budget in the repository) and each CPU
training step several times slower (its logits alone: 128,256 per token).

    python scripts/make_tiny_model.py [--out models/tiny-llama] [--pretrain-steps 300]
"""
from __future__ import annotations

import argparse
import gzip
import html
import io
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import sentencepiece
import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
# Role markers of CHAT_TEMPLATE: control pieces, like BOS and EOS (never the tokens of user text).
ROLES = ["<|user|>", "<|assistant|>"]
# Every printable ASCII character is a piece, even one the corpus lacks (the prompt's `#`):
# otherwise it would be spelled in byte-fallback tokens.
ASCII = "".join(map(chr, range(33, 127)))  # the space is ▁, a piece of its own
# A minimal chat template so that `format.style: chat` works on the tiny model as on an instruct model.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus_documents(path: Path) -> list[str]:
    """"title\ndescription" documents (HTML-unescaped, as preprocess does), sorted for determinism.
    No question/answer prompt: answering a question is what fine-tuning teaches."""
    docs = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["content"]:
                docs.add(html.unescape(record["title"]) + "\n" + html.unescape(record["content"]))
    return sorted(docs)


def build_tokenizer(docs: list[str], vocab_size: int, folder: Path) -> LlamaTokenizer:
    """Train a SentencePiece BPE model (byte fallback, no normalisation, digits split, as Llama 2's;
    no dummy prefix space, as Gemma's) into folder/tokenizer.model and load it as transformers'
    LlamaTokenizer (which converts it to a fast tokenizer; BOS added to every text, as Llama's).
    Without the dummy prefix, a text encodes the same whole or in pieces around special tokens
    (a chat template's), in transformers, SentencePiece and llama.cpp alike; with it, transformers
    puts the prefix before the first piece only and llama.cpp before every one.
    One thread: the same pieces on every run."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
        control_symbols=ROLES, required_chars=ASCII, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, max_sentence_length=1 << 16,
        num_threads=1, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizer.from_pretrained(
        folder, pad_token=PAD, add_bos_token=True, add_eos_token=False, add_prefix_space=False,
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


def pretrain(model, tokenizer, docs: list[str], steps: int, seed: int, batch: int = 16, length: int = 128):
    """Plain next-token pretraining on packed documents (nanoGPT style): a base model, not a chat one."""
    ids = []
    for doc in docs:
        ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(ids)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    progress = tqdm(range(steps), desc="pretraining")
    for step in progress:
        lr = 3e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
        x = torch.stack([data[i:i + length] for i in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/tiny-llama"))
    ap.add_argument("--corpus-seed", type=int, default=1, help="make_sample.py seed of the pretraining corpus")
    ap.add_argument("--corpus-records", type=int, default=20000)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(2)  # fixed, so the same machine gives the same weights
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.json.gz"
        subprocess.run([sys.executable, str(Path(__file__).with_name("make_sample.py")), "--out", str(corpus),
                        "--records", str(args.corpus_records), "--seed", str(args.corpus_seed)], check=True)
        docs = corpus_documents(corpus)
        tokenizer = build_tokenizer(docs, args.vocab_size, Path(tmp) / "tokenizer")
        model = build_model(tokenizer, args.hidden, args.layers, args.seed)
        final_loss = pretrain(model, tokenizer, docs, args.pretrain_steps, args.seed)
        if args.out.exists():
            shutil.rmtree(args.out)
        model.save_pretrained(args.out, safe_serialization=True)
        tokenizer.save_pretrained(args.out)
        # transformers 5 writes tokenizer.json only; the SentencePiece model is kept beside it, as in
        # Llama 2's folders (llama.cpp's converter reads it).
        shutil.copy(Path(tmp) / "tokenizer" / "tokenizer.model", args.out / "tokenizer.model")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n_params / 1e6:.2f} M params, vocab {len(tokenizer)}, "
          f"{len(docs):,} pretraining documents, final pretraining loss {final_loss:.3f}")


if __name__ == "__main__":
    main()
