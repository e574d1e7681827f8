"""Parity of the generation engine with the evaluate path before it, on a briefly trained model
(GPU). Random-init models have near-tied next-token scores, so greedy answers are compared on a
model trained a few hundred steps first.

    python benchmarks/engine_parity.py --work /tmp/parity --out results.json     # on a GPU

1. A random-init model of the Llama-3.2-1B shape (but the embedded tiny model's 2,048-token
   vocabulary, so that the sample's data fits it) is written to WORK/base.
2. The pipeline's stages run on it in a copy of this repository (decompress, preprocess,
   tokenize-format, train with train.max_steps --steps and a 16,384-token budget a step), on the
   sample or (--records N) on a generated corpus of N records, whose larger test split steadies
   the metrics.
3. Three paths answer the whole test split with the tuned model (base + adapter), greedy, 64 new
   tokens, each in a process of its own: `before` (Unsloth's from_pretrained + PeftModel +
   for_inference, transformers' generate on batches of 64: evaluate's path until the engine),
   `transformers` (the engine's own model, loaded by load_for_generation, answered by transformers'
   generate on batches of 64) and `engine`; then `transformers` and `engine` again in float32
   (`:float32`), where no bf16 rounding tells the two apart. The report: the share of identical
   answers of the engine with each path of its dtype, and evaluate's metrics (with the reference
   NLL) from all of them.

On an H100 the `before` path's model scored the references at 1.75 nats a token where the same
adapter through transformers + PEFT (merged or not) scored 0.98 (training's own val loss: 1.08):
Unsloth's reload of a saved adapter is not the trained model there, so `transformers` is the
reference the engine must match (benchmarks/results/engine_parity_h100*.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from titletune.cli import write_json

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("before", "transformers", "engine", "transformers:float32", "engine:float32")
SHAPE_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, head_dim=64, tie_word_embeddings=True)
SHAPE_MINI = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, head_dim=32, tie_word_embeddings=True)  # --mini: a CPU rehearsal


def engine_of(path: str) -> str:
    """The engine path of the same dtype ("transformers:float32" -> "engine:float32")."""
    _, _, dtype = path.partition(":")
    return ":".join(filter(None, ["engine", dtype]))


def build(work: Path, shape: dict) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tiny = ROOT / "models/tiny-llama"
    config = LlamaConfig.from_pretrained(tiny)
    for key, value in shape.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(work / "base")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(work / "base")
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (tiny / extra).exists():
            shutil.copy(tiny / extra, work / "base" / extra)


def answers(path: str, repo: Path) -> dict:
    """One path's answers and metrics for the whole test split (run in a process of its own)."""
    os.chdir(repo)
    path, _, dtype = path.partition(":")
    import torch
    from titletune.generation.engine import eos_token_ids, generate, prompt_ids, reference_nll, until_eos
    from titletune.generation.metrics import score
    from titletune.modeling import load_formatted
    from titletune.params import load_params
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generation_speed import before_generate, load
    model_params = load_params("model")
    model, tok = load("before" if path == "before" else "engine", Path(model_params.name), repo / "models/adapter")
    if dtype:
        model = model.to(getattr(torch, dtype))
    examples = load_formatted(repo / "data/formatted")["test"]
    prompts, eos_ids = prompt_ids(examples), eos_token_ids(model, tok)
    start = time.perf_counter()
    if path in ("before", "transformers"):
        new = before_generate(model, prompts, pad_token_id=tok.pad_token_id, batch_size=64, eos_ids=eos_ids,
                              max_new_tokens=64)
    else:
        new = generate(model, prompts, pad_token_id=tok.pad_token_id, max_new_tokens=64, eos_ids=eos_ids)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ids = [until_eos(a, eos_ids) for a in new]
    texts = [tok.decode(a, skip_special_tokens=True).strip() for a in ids]
    nll, n = reference_nll(model, examples, pad_token_id=tok.pad_token_id, batch_size=64, progress=False)
    return {"path": f"{path}:{dtype}" if dtype else path, "ids": ids, "seconds": seconds,
            "metrics": score(texts, examples["content"], list(map(len, ids)), nll, n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/titletune-parity"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--paths", default=",".join(PATHS),
                    help=f"which of {', '.join(PATHS)} (each with the engine of its dtype)")
    ap.add_argument("--records", type=int, default=0,
                    help="a generated corpus of N records instead of the sample (its 104 test prompts are few for "
                         "BLEU: 40,000 records give ~1,000)")
    ap.add_argument("--mini", action="store_true", help="a tiny shape instead of 1B: rehearse the command on CPU")
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    repo = args.work / "repo"
    if args.path:
        print(json.dumps(answers(args.path, repo)))
        return

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    args.work.mkdir(parents=True, exist_ok=True)
    build(args.work, SHAPE_MINI if args.mini else SHAPE_1B)
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".venv", "*.tgz", "mlruns", "mlflow.db",
                                                              "interim", "processed", "formatted", "adapter", "merged"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["name"] = str(args.work / "base")
    if args.records:
        source = args.work / f"trn_{args.records}.json.gz"
        subprocess.run([sys.executable, str(ROOT / "scripts/make_sample.py"), "--records", str(args.records),
                        "--out", str(source)], check=True)
        params["data"]["source"] = str(source)
    params["train"].update(max_steps=args.steps, tokens_per_step=16384, learning_rate=0.0005, eval_steps=100,
                           save_steps=100, logging_steps=25)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    timings = {}
    for cmd in (["decompress", "data/interim/trn.jsonl"],
                ["preprocess", "data/interim/trn.jsonl", "data/processed", "metrics/data.json"],
                ["tokenize_format", "data/processed", "data/formatted", "metrics/format.json"],
                ["train", "data/formatted", "models/adapter", "metrics"]):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"stages.{cmd[0]}", *cmd[1:]], cwd=repo, env=env, check=True)
        timings[cmd[0]] = time.perf_counter() - start
    chosen = set(args.paths.split(","))
    chosen |= {engine_of(path) for path in chosen}
    torch = __import__("torch")
    header = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU", "steps": args.steps,
              "train": json.loads((repo / "metrics/train.json").read_text()), "stage_seconds": timings,
              "command": "python benchmarks/engine_parity.py " + " ".join(sys.argv[1:])}
    paths = {}
    for path in [p for p in PATHS if p in chosen]:   # in PATHS' order
        proc = subprocess.run([sys.executable, __file__, "--path", path, "--work", str(args.work), "--out", "-"],
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{path} failed:\n{proc.stderr[-3000:]}")
        paths[path] = json.loads(proc.stdout.strip().splitlines()[-1])
        # written after every path: a run cut short by its time limit keeps the pairs it finished
        report = compare(header, paths)
        write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "train"}, indent=1))


def compare(header: dict, paths: dict) -> dict:
    """The report: the run's header, metrics and time of every path answered so far, and the engine
    against each path of its dtype (identical answers, metrics' relative difference) once both have
    answered."""
    report = {**header, "prompts": len(next(iter(paths.values()))["ids"])}
    for name, other in paths.items():
        report[f"metrics_{name}"] = other["metrics"]
        report.setdefault("seconds", {})[name] = other["seconds"]
        engine = paths.get(engine_of(name))
        if engine is not None and engine is not other:
            same = sum(a == b for a, b in zip(other["ids"], engine["ids"]))
            report[f"engine_vs_{name}"] = {
                "identical_answers": same, "identical_share": same / len(engine["ids"]),
                "relative_difference": {k: (engine["metrics"][k] - v) / v if v else 0.0
                                        for k, v in other["metrics"].items() if isinstance(v, (int, float))}}
    return report


if __name__ == "__main__":
    main()
