"""titletune/training/batching.py: a token budget or an example count becomes SFTConfig batching arguments."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from titletune.cli import UserError
from titletune.params import load_params
from titletune.training.batching import (AUTO_BUDGET, batching_args, describe_batching, resolve_tokens_per_step,
                                         tokens_per_optimizer_step)


@pytest.fixture
def train():
    return load_params("train")


def test_a_token_budget_on_a_gpu_packs_whole_examples_into_one_row_per_step(train):
    args = batching_args(train.model_copy(update={"tokens_per_step": 16384}), 2048, on_gpu=True)
    assert args == {"packing": True, "packing_strategy": "bfd", "padding_free": True, "eval_packing": True,
                    "max_length": 16384, "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1,
                    "prediction_loss_only": True}


def test_a_token_budget_on_cpu_buys_padded_examples(train):
    """Unsloth's CPU path cannot keep packed documents apart: the budget becomes budget // max_length examples."""
    args = batching_args(train.model_copy(update={"tokens_per_step": 1000}), 256, on_gpu=False)
    assert args["packing"] is False and args["padding_free"] is False and args["max_length"] == 256
    assert args["per_device_train_batch_size"] == args["per_device_eval_batch_size"] == 3


def test_a_budget_below_the_longest_example_is_refused_naming_both(train):
    with pytest.raises(UserError, match=r"train.tokens_per_step: 100 is not allowed .*format.max_length, 256"):
        batching_args(train.model_copy(update={"tokens_per_step": 100}), 256, on_gpu=True)


@pytest.mark.parametrize("on_gpu, padding_free, packing, expected", [
    (True, False, False, None),    # Unsloth decides (padding-free for most models)
    (True, True, False, True),     # asked for
    (True, False, True, False),    # packing rows of max_length: TRL makes them padding-free itself
    (False, False, False, False),  # CPU: padded
])
def test_an_example_count_keeps_the_batch_size(train, on_gpu, padding_free, packing, expected):
    tp = train.model_copy(update={"tokens_per_step": 0, "per_device_train_batch_size": 6, "padding_free": padding_free,
                                  "packing": packing})
    args = batching_args(tp, 256, on_gpu=on_gpu)
    assert args["padding_free"] is expected and args["packing"] is packing and args["max_length"] == 256
    assert args["per_device_train_batch_size"] == args["per_device_eval_batch_size"] == 6
    assert args["prediction_loss_only"] is True  # evaluation never keeps full-vocabulary logits


def test_tokens_per_optimizer_step_counts_accumulation_and_ranks(train):
    budget = train.model_copy(update={"tokens_per_step": 16384, "gradient_accumulation_steps": 2})
    assert tokens_per_optimizer_step(budget, 2048, world_size=2) == 16384 * 2 * 2
    examples = train.model_copy(update={"tokens_per_step": 0, "per_device_train_batch_size": 8,
                                        "gradient_accumulation_steps": 1})
    assert tokens_per_optimizer_step(examples, 256, world_size=1) == 8 * 256


def test_auto_is_a_token_budget_on_a_gpu_and_examples_per_step_on_a_cpu(train):
    assert train.tokens_per_step == "auto"                       # the default in params.yaml
    on_gpu = resolve_tokens_per_step(train, 2048, on_gpu=True)
    assert on_gpu.tokens_per_step == AUTO_BUDGET == 16384
    assert resolve_tokens_per_step(train, 32768, on_gpu=True).tokens_per_step == 32768   # the longest example fits
    assert batching_args(train, 2048, on_gpu=True) == batching_args(on_gpu, 2048, on_gpu=True)
    # A CPU keeps today's behaviour: auto is 0, per_device_train_batch_size padded examples a step.
    assert resolve_tokens_per_step(train, 256, on_gpu=False).tokens_per_step == 0
    zero = train.model_copy(update={"tokens_per_step": 0})
    assert batching_args(train, 256, on_gpu=False) == batching_args(zero, 256, on_gpu=False)
    assert batching_args(train, 256, on_gpu=False)["per_device_train_batch_size"] == train.per_device_train_batch_size


@pytest.mark.parametrize("explicit", [0, 4096])
def test_an_explicit_tokens_per_step_is_kept_on_every_machine(train, explicit):
    tp = train.model_copy(update={"tokens_per_step": explicit})
    for on_gpu in (True, False):
        assert resolve_tokens_per_step(tp, 256, on_gpu=on_gpu) is tp
    assert batching_args(tp, 256, on_gpu=True)["packing"] is bool(explicit)


def test_the_batching_is_described_in_words(train):
    def words(tp, on_gpu):
        return describe_batching(SimpleNamespace(**batching_args(tp, 256, on_gpu=on_gpu)))
    assert words(train, on_gpu=True) == "packed rows of up to 16384 tokens, padding-free"
    assert words(train, on_gpu=False) == f"{train.per_device_train_batch_size} examples a step, padded"
    zero = train.model_copy(update={"tokens_per_step": 0})
    assert words(zero, on_gpu=True) == f"{train.per_device_train_batch_size} examples a step, " \
                                       "padding-free where Unsloth supports it"
