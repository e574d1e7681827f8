"""titletune/modeling.py: where models come from, and clear errors before anything heavy loads."""
from __future__ import annotations

import pytest

from titletune.cli import UserError
from titletune.modeling import load_formatted, load_tokenizer, load_tuned_model, resolve_model_name
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


def test_missing_adapter_and_missing_data_say_run_dvc_repro(tmp_path):
    with pytest.raises(UserError, match=r"no trained adapter here; run `dvc repro` first"):
        load_tuned_model(TINY, 128, tmp_path / "adapter")     # before any model loads
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
