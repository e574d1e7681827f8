"""How formatted examples become training and evaluation batches (SFTConfig keyword arguments).

Two modes:
- a token budget (`train.tokens_per_step` > 0): TRL packs whole examples best-fit-decreasing into
  rows of at most that many tokens, one row per device per micro-step. Unsloth runs each row
  padding-free (documents never attend across each other), so every step holds about the same
  number of real tokens whatever the document lengths: the GPU is filled, memory is predictable,
  and data-parallel ranks get steps of equal work. Evaluation packs the same way, so it never
  needs more memory than a training step.
  On CPU, where Unsloth cannot keep packed documents apart, the budget buys budget // max_length
  padded examples a step instead.
- an example count (`tokens_per_step: 0`): `per_device_train_batch_size` examples per
  micro-step, padded to the longest on CPU. On a GPU `padding_free: false` leaves the choice to
  Unsloth, which makes them padding-free for most models; `true` asks for it.

`tokens_per_step: auto` (the default) picks the fast path of the machine: on a GPU a budget of
AUTO_BUDGET tokens (at least format.max_length), which ran the 1B shape 4.6x faster than 16 padded
examples a step on an H100 (varlen flash attention against dense SDPA); on a CPU an example count,
as 0 does. Any number set in params.yaml is used as it is.
"""
from __future__ import annotations

from titletune.cli import UserError
from titletune.params import Train


AUTO_BUDGET = 16384  # tokens per GPU step for `tokens_per_step: auto`: the GPU profiles' budget (docs/gpu.md)


def resolve_tokens_per_step(tp: Train, max_length: int, on_gpu: bool) -> Train:
    """The train params with `tokens_per_step: auto` made a number for this machine (see above)."""
    if tp.tokens_per_step != "auto":
        return tp
    return tp.model_copy(update={"tokens_per_step": max(AUTO_BUDGET, max_length) if on_gpu else 0})


def batching_args(tp: Train, max_length: int, on_gpu: bool) -> dict:
    """SFTConfig arguments for batching, from the train params and format.max_length."""
    budget = resolve_tokens_per_step(tp, max_length, on_gpu).tokens_per_step
    # Evaluation only needs the loss: never keep full-vocabulary logits of every batch.
    common = {"prediction_loss_only": True}
    # Unpacked, the formatted data is what the trainer takes as it is: token ids and labels, cut at
    # format.max_length, prompt-only examples dropped (tokenize-format). TRL's preparation would
    # only pass over every example again (a few minutes on the full corpus before step 1).
    unpacked = {**common, "dataset_kwargs": {"skip_prepare_dataset": True}}
    if budget and budget < max_length:
        raise UserError(f"params.yaml: train.tokens_per_step: {budget} is not allowed (must be 0 or at least "
                        f"format.max_length, {max_length}: a step must hold the longest example)")
    if budget and not on_gpu:
        # Unsloth's CPU path has no FlashAttention to keep packed documents apart and turns packing
        # off: there the budget buys padded examples of format.max_length tokens.
        batch = budget // max_length
        return {**unpacked, "packing": False, "padding_free": False, "max_length": max_length,
                "per_device_train_batch_size": batch, "per_device_eval_batch_size": batch}
    if budget:
        return {**common, "packing": True, "packing_strategy": "bfd", "padding_free": True, "eval_packing": True,
                "max_length": budget, "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1}
    batch = tp.per_device_train_batch_size
    # padding_free=None lets Unsloth choose padding-free batches on a GPU; on CPU they stay padded.
    padding_free = tp.padding_free or (None if on_gpu and not tp.packing else False)
    return {**(common if tp.packing else unpacked), "packing": tp.packing, "padding_free": padding_free,
            "max_length": max_length, "per_device_train_batch_size": batch, "per_device_eval_batch_size": batch}


def describe_batching(args) -> str:
    """The batching an SFTConfig runs, in words (the train summary line, metrics/train.json)."""
    if args.packing:
        return f"packed rows of up to {args.max_length} tokens, padding-free"
    rows = "padded" if args.padding_free is False else "padding-free" if args.padding_free else \
        "padding-free where Unsloth supports it"
    return f"{args.per_device_train_batch_size} examples a step, {rows}"


def tokens_per_optimizer_step(tp: Train, max_length: int, world_size: int) -> int:
    """Upper bound of the tokens one optimizer step sees (all ranks, all accumulation steps)."""
    per_micro = tp.tokens_per_step or tp.per_device_train_batch_size * max_length
    return per_micro * tp.gradient_accumulation_steps * world_size
