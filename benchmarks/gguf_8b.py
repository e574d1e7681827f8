"""GGUF conversion at full size: a random-init Llama-3.1-8B shape to f16, then q4_k_m (time and size).

    python benchmarks/gguf_8b.py --prepare                   # once, where the venv has `make gguf`'s sdist
    python benchmarks/gguf_8b.py --shape 8b --out DIR        # the run (a GPU machine: the model builds there)

--prepare writes benchmarks/out/llama.cpp: the parts of the pinned llama-cpp-python sdist's llama.cpp
that the run needs (the converter, its gguf-py, the vocabulary of Llama 3, and the C++ sources of
`llama-quantize`, CPU backend only: ~20 MB), so that a machine without the package and without a
network can run it. The run:
1. builds llama-quantize from that tree with cmake, in the background (GGML_NATIVE=OFF, as `make gguf`);
2. rebuilds Llama 3's tokenizer from llama.cpp's vocab-only GGUF of it (128,256 tokens and the
   merges, with Llama 3's pre-tokenizer) and checks it on llama.cpp's test vectors for it;
3. builds a random-init model of the shape (bf16, on the GPU if there is one) and saves it as
   safetensors with that tokenizer: what a fine-tuned 8B's models/merged holds;
4. converts it to f16 with convert_hf_to_gguf.py (as the gguf stage does, titletune.export.gguf),
   then quantizes to q4_k_m with llama-quantize (the same llama.cpp function as the stage's).
It prints one JSON object (seconds and bytes of each step) and writes it to DIR/gguf_8b.json.
--shape small runs the same steps in seconds (a CPU check).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "benchmarks" / "out" / "llama.cpp"
SDIST = "llama_cpp_python-0.3.36"
SHAPES = {  # Llama-3.1-8B, and a small one with K-quant-sized rows (multiples of 256)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False),
}
VOCAB = "models/ggml-vocab-llama-bpe.gguf"
# Llama 3's pre-tokenizer (its tokenizer.json): llama.cpp's "llama-bpe".
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# What the run needs of the sdist's vendor/llama.cpp; ggml's other backends and the other tools are left out.
KEEP = ["LICENSE", "CMakeLists.txt", "cmake", "convert_hf_to_gguf.py", "conversion", "gguf-py", "include", "src",
        "common", "vendor", "ggml", "tools/quantize", VOCAB, VOCAB + ".inp", VOCAB + ".out"]
GGML_BACKENDS_KEPT = {"ggml-cpu", "ggml-blas"}


def prepare() -> None:
    """benchmarks/out/llama.cpp from the sdist that `make gguf` downloaded (else pip downloads it)."""
    sdist = ROOT / ".venv" / "share" / "sdists" / f"{SDIST}.tar.gz"
    if not sdist.is_file():
        sdist = ROOT / "benchmarks" / "out" / f"{SDIST}.tar.gz"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "llama-cpp-python",
                        "-d", str(sdist.parent), f"llama-cpp-python=={SDIST.rsplit('-', 1)[1]}"], check=True)
    prefix = f"{SDIST}/vendor/llama.cpp/"

    def wanted(name: str) -> bool:
        rel = name[len(prefix):]
        if not name.startswith(prefix) or not any(rel == k or rel.startswith(k + "/") for k in KEEP):
            return False
        parts = rel.split("/")
        return not (parts[:2] == ["ggml", "src"] and len(parts) > 3 and parts[2] not in GGML_BACKENDS_KEPT)

    shutil.rmtree(TREE, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if wanted(m.name) and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(TREE, members=members, filter="data")
    # tools/CMakeLists.txt adds every tool: only the quantizer is kept.
    (TREE / "tools" / "CMakeLists.txt").write_text("add_subdirectory(quantize)\n")
    size = sum(p.stat().st_size for p in TREE.rglob("*") if p.is_file())
    print(f"wrote {TREE.relative_to(ROOT)}: {size / 2**20:.1f} MiB")


def build_quantizer(build: Path, results: dict) -> threading.Thread:
    """cmake configure + build of llama-quantize, in the background (results["quantizer_build_s"] when done)."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(TREE), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                 "-DGGML_NATIVE=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                 "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DBUILD_SHARED_LIBS=OFF"]
    compile_ = ["cmake", "--build", str(build), "--target", "llama-quantize", "-j", str(os.cpu_count() or 1)]
    start = time.perf_counter()

    def work():
        with open(build.parent / "quantizer-build.log", "w") as log:
            ok = all(subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode == 0 for cmd in (configure, compile_))
        results["quantizer_build_s" if ok else "quantizer_build_failed_s"] = round(time.perf_counter() - start, 1)

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def llama3_tokenizer():
    """Llama 3's tokenizer rebuilt from llama.cpp's vocab-only GGUF of it, checked on its test vectors."""
    sys.path.insert(0, str(TREE / "gguf-py"))
    from gguf import GGUFReader
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(TREE / VOCAB)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokens, types, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type"), field("tokenizer.ggml.merges")
    bos, eos = tokens[field("tokenizer.ggml.bos_token_id")], tokens[field("tokenizer.ggml.eos_token_id")]
    normal = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == 1}
    tok = Tokenizer(models.BPE(vocab=normal, merges=[tuple(m.split(" ")) for m in merges], ignore_merges=True,
                               byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, types) if kind != 1]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert all(tok.token_to_id(t) == i for i, t in enumerate(tokens)), "token ids differ from the GGUF's"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tokens.index(bos))])
    inputs = (TREE / (VOCAB + ".inp")).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = (TREE / (VOCAB + ".out")).read_text(encoding="utf-8").splitlines()
    passed = sum(tok.encode(text, add_special_tokens=False).ids == [int(i) for i in ids.split()]
                 for text, ids in zip(inputs, expected, strict=True))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos), f"{passed}/{len(inputs)}"


def sh(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} failed (exit {proc.returncode}):\n"
                         + (proc.stderr + proc.stdout)[-3000:])


def timed(results: dict, key: str, fn, *args, **kwargs):
    """Run a step; its seconds go into results, which are written at once (a run cut short by a
    time limit keeps the steps it finished)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    results[key] = round(time.perf_counter() - start, 1)
    print(f"{key}: {results[key]} s", flush=True)
    results["out"].write_text(json.dumps({k: v for k, v in results.items() if k != "out"}, indent=2) + "\n")
    return out


def run(shape: str, out: Path, work: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    results = {"out": out / "gguf_8b.json", "shape": shape, **SHAPES[shape], "python": platform.python_version(),
               "torch": torch.__version__, "cpus": os.cpu_count(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    build = build_quantizer(work / "build", results)
    tokenizer, results["tokenizer_test_vectors"] = timed(results, "tokenizer_s", llama3_tokenizer)

    def make_model():
        config = LlamaConfig(**SHAPES[shape], vocab_size=len(tokenizer), max_position_embeddings=8192,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.set_default_dtype(torch.bfloat16)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
        return model

    model = timed(results, "model_build_s", make_model)
    results["parameters"] = sum(p.numel() for p in model.parameters())
    model_dir = work / "model"
    timed(results, "save_s", lambda: (model.save_pretrained(model_dir), tokenizer.save_pretrained(model_dir)))
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    f16, q4 = work / "model-f16.gguf", work / "model-q4_k_m.gguf"
    timed(results, "convert_f16_s", sh, [sys.executable, str(TREE / "convert_hf_to_gguf.py"), str(model_dir),
                                         "--outfile", str(f16), "--outtype", "f16"])
    results["f16_bytes"] = f16.stat().st_size
    shutil.rmtree(model_dir)
    timed(results, "quantizer_build_wait_s", build.join)
    if "quantizer_build_s" not in results:
        raise SystemExit("llama-quantize did not build:\n" + (work / "quantizer-build.log").read_text()[-3000:])
    timed(results, "quantize_q4_k_m_s", sh, [str(work / "build" / "bin" / "llama-quantize"), str(f16), str(q4),
                                             "Q4_K_M", str(os.cpu_count() or 1)])
    results["q4_k_m_bytes"] = q4.stat().st_size
    results["total_s"] = round(time.perf_counter() - start, 1)
    results.pop("out").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="write benchmarks/out/llama.cpp and stop")
    ap.add_argument("--shape", choices=SHAPES, default="8b")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    args = ap.parse_args()
    if args.prepare:
        return prepare()
    if not (TREE / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{TREE} is missing: run `python benchmarks/gguf_8b.py --prepare` first")
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        results = run(args.shape, args.out, Path(work))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
