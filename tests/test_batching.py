"""titletune/training/batching.py: a token budget or an example count becomes SFTConfig batching arguments."""
from __future__ import annotations

import pytest

from titletune.cli import UserError
from titletune.params import load_params
from titletune.training.batching import batching_args, tokens_per_optimizer_step


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
    tp = train.model_copy(update={"per_device_train_batch_size": 6, "padding_free": padding_free, "packing": packing})
    args = batching_args(tp, 256, on_gpu=on_gpu)
    assert args["padding_free"] is expected and args["packing"] is packing and args["max_length"] == 256
    assert args["per_device_train_batch_size"] == args["per_device_eval_batch_size"] == 6
    assert args["prediction_loss_only"] is True  # evaluation never keeps full-vocabulary logits


def test_tokens_per_optimizer_step_counts_accumulation_and_ranks(train):
    budget = train.model_copy(update={"tokens_per_step": 16384, "gradient_accumulation_steps": 2})
    assert tokens_per_optimizer_step(budget, 2048, world_size=2) == 16384 * 2 * 2
    examples = train.model_copy(update={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1})
    assert tokens_per_optimizer_step(examples, 256, world_size=1) == 8 * 256
