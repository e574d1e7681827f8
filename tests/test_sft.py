"""titletune/training/sft.py: the SFTConfig from params, LoRA on the model, the saved adapter.

Importing titletune.training.sft imports Unsloth (~16 s, and it patches transformers for the whole
process), so these checks run in one subprocess.
"""
from __future__ import annotations

import json
import sys

import pytest

from titletune.testing import ENV, ROOT, run

TRAIN_AND_RELOAD = """
import json, sys, torch
from titletune.training import sft as training  # imports unsloth first
from peft import PeftModel
from trl import SFTTrainer
from titletune.modeling import load_formatted, load_model
from titletune.params import load_params

model_params, fmt, tp = load_params("model", "format", "train")
tp = tp.model_copy(update=dict(max_steps=3, eval_steps=100, save_steps=100))
hw = training.hardware_settings(tp.optim)
config = training.sft_config(tp, fmt.max_length, hw, 1, sys.argv[1] + "/ckpt")
report = {"same": {k: getattr(config, k) == getattr(tp, k) for k in training.SFT_KEYS},
          "hw": hw, "eval_batch": config.per_device_eval_batch_size, "max_steps": config.max_steps,
          "data_seed": config.data_seed, "optim": config.optim, "bf16": config.bf16, "max_length": config.max_length,
          "warmup": config.get_warmup_steps(60), "report_to": config.report_to,
          "no_epochs_cap": training.sft_config(tp.model_copy(update={"max_steps": 0}), 128, hw, 1, "x").max_steps}

model, tok = load_model(model_params, fmt.max_length)
report["dtype"] = str(model.dtype)
model = training.add_lora(model, tp)
lora = model.peft_config["default"]
report["lora"] = [lora.r, lora.lora_alpha, lora.lora_dropout, sorted(lora.target_modules)]
data = load_formatted("data/formatted")["train"].select_columns(["input_ids", "labels"])
report["eval_sets"] = [{name: len(rows) for name, rows in training.eval_sets(data, data.select(range(n))).items()}
                       for n in (32, 1000)]
config.report_to, config.eval_strategy = [], "no"
SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok).train()
probe = torch.tensor([data[0]["input_ids"][:32]])
model.eval()
with torch.no_grad():
    trained = model(input_ids=probe).logits
model.save_pretrained(sys.argv[1] + "/adapter")
base, _ = load_model(model_params, fmt.max_length)
reloaded = PeftModel.from_pretrained(base, sys.argv[1] + "/adapter").eval()
with torch.no_grad():
    again = reloaded(input_ids=probe).logits
    with reloaded.disable_adapter():
        plain = reloaded(input_ids=probe).logits
report["reload_max_diff"] = float((trained - again).abs().max())
report["adapter_effect"] = float((trained - plain).abs().max())

# Early stopping: the SFTConfig keys (the callback: tests/test_early_stopping.py).
es_tp = tp.model_copy(update=dict(early_stopping_patience=1, eval_steps=2, save_steps=2))
es_config = training.sft_config(es_tp, fmt.max_length, hw, 1, sys.argv[1] + "/es")
report["es_args"] = [es_config.load_best_model_at_end, es_config.metric_for_best_model, es_config.greater_is_better]
print("REPORT " + json.dumps(report))
"""


@pytest.mark.slow
def test_sft_config_lora_and_saved_adapter(pipeline_repo, tmp_path):
    """Runs in the pipeline repo (its params.yaml, data/formatted and tiny model), read-only, as on a
    CPU with bfloat16 (UNSLOTH_CPU_BF16=1), where Unsloth's own choice would be bfloat16."""
    proc = run([sys.executable, "-c", TRAIN_AND_RELOAD, str(tmp_path)], pipeline_repo, timeout=600,
               env=dict(ENV, UNSLOTH_CPU_BF16="1"))
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))[7:])
    # The SFTConfig takes every same-named train param as it is, but for those it decides (optim: auto
    # here); the rest comes from the hardware.
    assert [key for key, same in report["same"].items() if not same] == ["optim"], report["same"]
    assert len(report["same"]) >= 15 and {"learning_rate", "seed", "save_total_limit"} <= set(report["same"])
    assert report["hw"] == {"device": "cpu", "bf16": False, "fp16": False, "use_cpu": True, "optim": "adamw_torch"}
    # transformers 5 takes adamw_torch as its fused implementation where torch has one
    assert report["optim"] in ("adamw_torch", "adamw_torch_fused") and report["bf16"] is False
    assert report["eval_batch"] == 8 and report["max_steps"] == 3 and report["data_seed"] == 42
    assert report["max_length"] == 128 and report["report_to"] == ["mlflow"]
    assert report["dtype"] == "torch.float32"      # on every CPU (titletune.modeling.compute_dtype)
    assert report["warmup"] == 3                    # warmup_steps 0.05 of 60 steps, rounded up
    assert report["no_epochs_cap"] == -1            # max_steps 0: num_train_epochs decides
    assert report["lora"] == [16, 32, 0.0, sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])]
    # The saved adapter reloads onto a fresh base to the same logits, and it changed the model.
    assert report["reload_max_diff"] < 1e-5 and report["adapter_effect"] > 0
    # The train loss is measured on as many training examples as the val loss, LOSS_SUBSET at most.
    assert report["eval_sets"] == [{"val": 32, "train_subset": 32}, {"val": 1000, "train_subset": 256}]
    # Early stopping: on the validation loss, lower is better.
    assert report["es_args"] == [True, "eval_val_loss", False]


CHECK_LORA = """
from titletune.training import sft  # imports unsloth first
from titletune.cli import UserError
from titletune.modeling import load_model
from titletune.params import load_params
model_params, fmt, tp = load_params("model", "format", "train")
model, _ = load_model(model_params, 128)
for update in ({"target_modules": ["q_proj", "k_prj", "mlp"]}, {"lora_r": 129},
               {"lora_r": 128, "target_modules": ["self_attn.q_proj", "embed_tokens"]}):
    try:
        sft.add_lora(model, tp.model_copy(update=update))
        print("OK")
    except UserError as err:
        print(err)
"""


@pytest.mark.slow
def test_target_modules_and_lora_r_are_checked_against_the_model():
    """A misspelled module is one line naming the model's layers (PEFT: a traceback); a rank above the
    hidden size is refused (lora_r 1e9 asked PEFT for 512 GB)."""
    proc = run([sys.executable, "-c", CHECK_LORA], ROOT, env=dict(ENV, PYTHONPATH=str(ROOT)))
    assert proc.stdout.splitlines()[-3:] == [
        'params.yaml: train.target_modules: ["k_prj", "mlp"] is not allowed (must name layers of models/tiny-llama: '
        "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)",
        "params.yaml: train.lora_r: 129 is not allowed with models/tiny-llama (must be at most its hidden size, 128)",
        "OK"]
