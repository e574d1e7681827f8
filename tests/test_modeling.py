"""titletune/modeling.py: where models come from, and clear errors before anything heavy loads."""
from __future__ import annotations

import pytest

from titletune.cli import UserError
from titletune.modeling import load_formatted, load_tokenizer, resolve_model_name
from titletune.params import Model
from titletune.testing import ROOT

TINY = Model(name="models/tiny-llama", load_in_4bit=False, trust_remote_code=False)


def test_a_local_folder_is_relative_to_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert resolve_model_name("models/tiny-llama") == "models/tiny-llama"
    assert load_tokenizer(TINY).eos_token == "</s>"


def test_missing_model_folder_and_offline_hub_id_fail_clearly(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match="'models/no-such-model' is not a folder"):
        resolve_model_name("models/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json; not a Hugging Face model folder"):
        resolve_model_name(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(UserError, match="is a hub id, but the Hugging Face hub cannot be reached"):
        resolve_model_name("unsloth/Llama-3.2-1B-Instruct")


def test_missing_data_says_run_dvc_repro(tmp_path):
    with pytest.raises(UserError, match=r"no formatted dataset; run `dvc repro` \(tokenize-format\) first"):
        load_formatted(tmp_path / "formatted")


class FakeFastLanguageModel:
    """Records what load_model asks Unsloth for."""
    asked: dict = {}

    @classmethod
    def from_pretrained(cls, **kwargs):
        cls.asked = kwargs
        tokenizer = type("Tok", (), {"pad_token": None, "eos_token": "</s>"})()
        return object(), tokenizer


def test_models_load_in_float32_on_every_cpu(monkeypatch):
    """Unsloth's dtype=None would be bfloat16 on CPUs with AVX512-BF16/AMX and float32 on others."""
    import torch

    from titletune import modeling
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(modeling, "unsloth", lambda: FakeFastLanguageModel)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("UNSLOTH_CPU_BF16", "1")            # as if this CPU had bf16
    _, tokenizer = modeling.load_model(TINY, 128)
    assert FakeFastLanguageModel.asked["dtype"] is torch.float32 and modeling.compute_dtype() is torch.float32
    assert tokenizer.pad_token == "</s>"                   # no pad token: EOS pads
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert modeling.compute_dtype() is torch.bfloat16      # GPU: as Unsloth's auto picks (bf16, else fp16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert modeling.compute_dtype() is torch.float16


# ---------------------------------------------------------------- unsafe model folders (#22)

def model_copy(tmp_path, name: str = "model"):
    import shutil
    folder = tmp_path / name
    shutil.copytree(ROOT / "models" / "tiny-llama", folder)
    return folder


def test_a_pickle_only_checkpoint_is_one_line(tmp_path):
    folder = model_copy(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    model = Model(name=str(folder), load_in_4bit=False, trust_remote_code=False)
    with pytest.raises(UserError, match=rf"^model.name: {folder} has pickle weights only \(pytorch_model.bin\), "
                                        "which could run code when loaded: only safetensors are loaded"):
        load_tokenizer(model)
    from titletune.generation.engine import load_for_generation
    with pytest.raises(UserError, match=rf"^model.name: {folder} has pickle weights only"):
        load_for_generation(model)                            # evaluate's, export's and ask's loader
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match=rf"^model.name: {folder} has no model.safetensors \(no weights to load\)$"):
        load_tokenizer(model)


def test_a_folder_that_needs_its_own_code_is_refused_unless_trusted(tmp_path):
    import json
    folder = model_copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=rf"^model.name: {folder} needs code of its own \(auto_map in config.json: "
                                        r"configuration_evil.EvilConfig, modeling_evil.Evil\), which is not run "
                                        r"unless params.yaml model.trust_remote_code is true"):
        load_tokenizer(Model(name=str(folder), load_in_4bit=False, trust_remote_code=False))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config.json: not valid JSON \(Expecting property name"):
        load_tokenizer(Model(name=str(folder), load_in_4bit=False, trust_remote_code=True))


def test_a_pickled_adapter_is_refused_before_the_base_loads(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    from titletune.generation.engine import load_for_generation
    with pytest.raises(UserError, match=rf"^adapter: {adapter} has pickle weights only \(adapter_model.bin\)"):
        load_for_generation(TINY, adapter)                   # evaluate's, export's and ask's loader


def test_the_answer_must_fit_the_model_positions():
    """evaluate.max_new_tokens: 1e8 generated for ever (#22): refused with the limit."""
    from types import SimpleNamespace

    from titletune.modeling import check_answer_room, max_positions
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=1024))
    assert max_positions(model) == 1024
    check_answer_room(model, 87, 937, "evaluate.max_new_tokens", "models/tiny-llama")     # exactly fits
    with pytest.raises(UserError) as err:
        check_answer_room(model, 87, 100_000_000, "evaluate.max_new_tokens", "models/tiny-llama")
    assert str(err.value) == ("params.yaml: evaluate.max_new_tokens: 100000000 is not allowed with models/tiny-llama "
                              "(must be at most 937: its 1,024 positions less the longest test prompt, 87 tokens)")
    check_answer_room(SimpleNamespace(config=SimpleNamespace()), 87, 10**8, "k", "m")     # no limit given: none
