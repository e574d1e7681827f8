"""tokenize-format and train: prompts, masking, params errors, real training, MLflow, resume."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ENV, ROOT, run, set_params

import common
from common import UserError, build_prompt, load_params, pick_question, resolve_model_name

TINY = ROOT / "models" / "tiny-llama"
FMT = {"style": "instruction", "max_length": 128,
       "questions": ["Describe this product: {title}", "What is {title}?", "Tell me about {title}."]}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY)


def test_question_rotation_is_deterministic_and_uses_every_phrasing():
    uids = [f"B{i:09d}" for i in range(200)]
    first = [pick_question(FMT["questions"], u) for u in uids]
    assert first == [pick_question(FMT["questions"], u) for u in reversed(uids)][::-1]
    assert set(first) == set(FMT["questions"])


def test_format_masks_the_prompt_and_ends_with_eos(tokenizer):
    from tokenize_format import format_batch
    batch = {"uid": ["B1", "B2"], "title": ["Red Kettle", "Blue Mug"],
             "content": ["A red kettle for tea.", "word " * 400]}
    out = format_batch(batch, tokenizer, FMT)
    prompt_ids = tokenizer(out["prompt"][0])["input_ids"]
    ids, mask = out["input_ids"][0], out["completion_mask"][0]
    assert ids[:len(prompt_ids)] == prompt_ids and ids[0] == tokenizer.bos_token_id
    assert mask == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))  # loss on the answer only
    assert ids[-1] == tokenizer.eos_token_id and not out["truncated"][0]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True) == batch["content"][0]
    assert "Red Kettle" in out["question"][0] and out["question"][0] in out["prompt"][0]
    # the long one is cut at max_length and flagged
    assert len(out["input_ids"][1]) == FMT["max_length"] and out["truncated"][1]


def test_chat_style_uses_the_tokenizers_template(tokenizer):
    prompt = build_prompt(tokenizer, "What is Blue Mug?", "chat")
    assert prompt.startswith(tokenizer.bos_token) and prompt.endswith("<|assistant|>\n")
    assert "<|user|>\nWhat is Blue Mug?" in prompt


def _params_file(tmp_path: Path, section: str, key: str, value) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "learning_rate", "fast", "train.learning_rate: expected float"),
    ("train", "batch_size", 8.5, "train.batch_size: expected int"),
    ("train", "lerning_rate", 0.1, "train.lerning_rate: unknown key (did you mean learning_rate?)"),
    ("model", "load_in_4bit", "yes", "model.load_in_4bit: expected bool"),
])
def test_wrong_params_name_the_key(tmp_path, section, key, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_params(section, path=_params_file(tmp_path, section, key, value))


def test_yaml_scientific_notation_is_accepted_as_float(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; dvc exp run -S train.learning_rate=1e-4 must still work.
    assert load_params("train", path=_params_file(tmp_path, "train", "learning_rate", "1e-4"))["learning_rate"] == 1e-4


def test_missing_model_folder_and_offline_hub_id_fail_clearly(monkeypatch):
    with pytest.raises(UserError, match="not a folder"):
        resolve_model_name("models/no-such-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(UserError, match="offline"):
        resolve_model_name("unsloth/Llama-3.2-1B-Instruct")


def test_format_stage_reports_a_bad_model_name(repo):
    set_params(repo, {"model": {"name": "models/missing"}})
    (repo / "data" / "processed").mkdir(parents=True)
    proc = run([sys.executable, "stages/tokenize_format.py", "data/processed", "data/formatted", "m.json"],
               repo, check=False)
    assert proc.returncode == 2
    assert "error: model.name: 'models/missing' is not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- real training (slow)

@pytest.mark.slow
def test_training_lowers_val_loss_and_is_recorded_in_mlflow(pipeline_repo):
    metrics = json.loads((pipeline_repo / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 12
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert metrics["tokens_per_s"] > 0 and metrics["effective_batch_size"] == 8
    rows = (pipeline_repo / "metrics" / "train_log.csv").read_text().splitlines()
    assert rows[0] == "step,train_loss,val_loss,learning_rate" and len(rows) >= 6

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_repo / 'mlflow.db'}")
    run_id = json.loads((pipeline_repo / "models" / "adapter" / "training_run.json").read_text())["mlflow_run_id"]
    record = client.get_run(run_id)
    assert record.data.params["train.learning_rate"] == str(load_params("train", path=pipeline_repo / "params.yaml")["learning_rate"])
    assert record.data.metrics["final_val_loss_after"] == pytest.approx(metrics["val_loss_after"])
    lock = yaml.safe_load((pipeline_repo / "dvc.lock").read_text())
    formatted_md5 = next(o["md5"] for o in lock["stages"]["tokenize-format"]["outs"] if o["path"] == "data/formatted")
    assert record.data.tags["data_md5"] == formatted_md5
    assert len(record.data.tags["git_commit"]) == 40
    assert [m.value for m in client.get_metric_history(run_id, "loss")]  # per-step metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"adapter", "plots"} <= artifacts


@pytest.mark.slow
def test_saved_adapter_reloads_to_the_same_logits(pipeline_repo, tmp_path):
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT / 'stages')!r})
import train  # imports unsloth first
from peft import PeftModel
from trl import SFTTrainer
from common import load_formatted, load_model
tp = dict(train.load_params('train', path={str(pipeline_repo / 'params.yaml')!r}), max_steps=3, eval_steps=100, save_steps=100)
params = {{'name': {str(TINY)!r}, 'load_in_4bit': False, 'trust_remote_code': False}}
model, tok = load_model(params, 128)
model = train.add_lora(model, tp)
data = load_formatted({str(pipeline_repo / 'data' / 'formatted')!r})['train'].select_columns(['input_ids', 'completion_mask'])
config = train.sft_config(tp, 128, train.hardware_settings('auto'), 1, {str(tmp_path / 'ckpt')!r})
config.report_to, config.eval_strategy = [], 'no'
SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok).train()
probe = torch.tensor([data[0]['input_ids'][:32]])
model.eval()
with torch.no_grad():
    trained = model(input_ids=probe).logits
model.save_pretrained({str(tmp_path / 'adapter')!r})
base, _ = load_model(params, 128)
reloaded = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
with torch.no_grad():
    again = reloaded(input_ids=probe).logits
    with reloaded.disable_adapter():
        plain = reloaded(input_ids=probe).logits
assert torch.allclose(trained, again, atol=1e-5), (trained - again).abs().max()
assert (trained - plain).abs().max() > 0  # the adapter changed the model
print('SAME LOGITS')
"""
    proc = run([sys.executable, "-c", code], ROOT, timeout=600)
    assert "SAME LOGITS" in proc.stdout


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(pipeline_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    set_params(repo, {"train": {"max_steps": 24, "save_steps": 4, "eval_steps": 100}})
    cmd = [sys.executable, "stages/train.py", "data/formatted", "models/adapter", "metrics"]
    proc = subprocess.Popen(cmd, cwd=repo, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        # trainer_state.json is the last file a checkpoint gets: kill once checkpoint-8 is complete
        while not (repo / "models" / "checkpoints" / "checkpoint-8" / "trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, "training ended before a checkpoint"
            time.sleep(0.5)
        time.sleep(1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = run(["dvc", "repro", "train"], repo, timeout=600)
    assert "resuming from the last checkpoint" in resumed.stdout + resumed.stderr
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 24
    assert not list((repo / "models" / "checkpoints").glob("checkpoint-*"))  # cleaned after success


@pytest.mark.slow
def test_changing_a_train_param_reruns_only_train_and_what_follows(pipeline_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    set_params(repo, {"train": {"learning_rate": 0.001}})
    out = run(["dvc", "status", "--json"], repo).stdout
    changed = set(json.loads(out))
    # train is out of date; the data stages are not (evaluate and export follow once train re-runs)
    assert changed == {"train"}, changed


def test_multi_gpu_launch_command_is_torchrun_of_the_same_script():
    code = ("import sys; sys.path.insert(0, 'stages'); import train; "
            "print(train.launch_command(4, ['stages/train.py', 'a', 'b'])); print(train.is_rank0())")
    out = run([sys.executable, "-c", code], ROOT, env=dict(ENV, RANK="1")).stdout.splitlines()
    assert out[-2].endswith("'-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=4', "
                            "'stages/train.py', 'a', 'b']")
    assert out[-1] == "False"  # rank 1 writes nothing


@pytest.mark.slow
def test_two_process_data_parallel_run_writes_once_from_rank0(pipeline_repo, tmp_path):
    """The multi-GPU path on CPU: torchrun with 2 processes (gloo), exactly as train.gpus=2 launches
    it on GPUs. Both ranks train; only rank 0 writes the adapter, metrics and the MLflow run."""
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    shutil.rmtree(repo / "models" / "adapter")
    set_params(repo, {"train": {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 1}})
    store = tmp_path / "mlflow.db"
    code = ("import json, sys; sys.path.insert(0, 'stages'); import train; "
            "print(json.dumps(train.launch_command(2, ['stages/train.py', 'data/formatted', "
            "'models/adapter', 'metrics'])))")
    cmd = json.loads(run([sys.executable, "-c", code], repo).stdout.splitlines()[-1])
    proc = run(cmd, repo, env=dict(ENV, MLFLOW_TRACKING_URI=f"sqlite:///{store}"), timeout=600)

    log = proc.stdout + proc.stderr
    assert log.count("train: cpu, 2 process(es)") == 2             # both ranks ran
    assert log.count("train: 4 steps in") == 1                     # one summary, from rank 0
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    tp = load_params("train", path=repo / "params.yaml")
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    assert metrics["effective_batch_size"] == 2 * tp["batch_size"] * tp["grad_accum"]
    assert (repo / "models" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((repo / "models" / "checkpoints").glob("checkpoint-*"))

    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.metrics["final_world_size"] == 2
