"""Which attention kernel runs for padding-free / packed batches, and a compatibility layer for torch 2.11.

Unsloth 2026.10.9 sends a padding-free row of several documents to torch's varlen flash kernel
(`torch.nn.attention.varlen.varlen_attn`: one launch per layer, documents never see each other)
only when that function takes `window_size` (torch 2.11) *and* `enable_gqa` (torch 2.12+); see
`unsloth/utils/attention_dispatch.py: _load_torch_varlen_attn`. On torch 2.11 it falls back to one
SDPA call per document, slow on short product descriptions (~80 documents a 16k-token step).

torch 2.11's varlen_attn does not check head counts, and the flash kernel under it takes
fewer KV heads than query heads natively (GQA), so it is safe to hand Unsloth a wrapper that drops
the `enable_gqa` argument. `install_varlen_compat` does that only where it is needed (a CUDA torch
with `window_size` but no `enable_gqa`); tests/test_attention.py checks it against per-document
SDPA on a GPU. Set `UNSLOTH_TORCH_VARLEN=0` to switch the varlen path off entirely.
"""
from __future__ import annotations

import inspect
import os

# The names reported in metrics/train.json (`attention`) and the benchmarks.
DENSE_SDPA = "sdpa"                      # padded batches: one SDPA call per batch
CPU_SDPA = "sdpa (cpu)"                  # no GPU: stock transformers attention
VARLEN = "varlen_flash"                  # torch >= 2.12: Unsloth uses torch's varlen kernel itself
VARLEN_COMPAT = "varlen_flash (compat)"  # torch 2.11 + our wrapper
PER_DOCUMENT = "sdpa_per_document"       # no usable varlen kernel: one SDPA call per document


def varlen_support(varlen_fn) -> str:
    """'native' (takes window_size and enable_gqa), 'compat' (window_size only: torch 2.11) or 'none'."""
    if varlen_fn is None:
        return "none"
    params = inspect.signature(varlen_fn).parameters
    if "window_size" not in params:
        return "none"
    return "native" if "enable_gqa" in params else "compat"


def without_enable_gqa(varlen_fn):
    """varlen_fn with Unsloth's calling convention (enable_gqa=...) on a torch that lacks the argument."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, enable_gqa=False, **kwargs):
        # GQA needs no flag there: the flash kernel maps query heads onto KV heads by itself.
        if enable_gqa and query.shape[-2] % key.shape[-2]:
            raise ValueError(f"query heads ({query.shape[-2]}) not a multiple of KV heads ({key.shape[-2]})")
        return varlen_fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)
    varlen_attn.__wrapped__ = varlen_fn
    return varlen_attn


def choose_path(*, cuda: bool, padding_free: bool, unsloth_has_varlen: bool, support: str,
                flash_available: bool, compat_allowed: bool = True) -> str:
    """The attention path a run takes, from what this machine's torch and Unsloth offer."""
    if not cuda:
        return CPU_SDPA
    if not padding_free:
        return DENSE_SDPA
    if unsloth_has_varlen:
        return VARLEN
    if support == "compat" and flash_available and compat_allowed:
        return VARLEN_COMPAT
    return PER_DOCUMENT


def install_varlen_compat(padding_free: bool) -> str:
    """Give Unsloth the varlen kernel where torch lacks only `enable_gqa`; return the path chosen.

    Call after `import unsloth` and before the first forward pass.
    """
    import torch
    if not torch.cuda.is_available():
        return CPU_SDPA
    from unsloth.utils import attention_dispatch as dispatch
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    path = choose_path(
        cuda=True, padding_free=padding_free,
        unsloth_has_varlen=dispatch._TORCH_VARLEN_ATTN is not None,
        support=varlen_support(varlen_attn),
        flash_available=getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)(),
        compat_allowed=os.environ.get("UNSLOTH_TORCH_VARLEN", "1").lower() not in ("0", "false", "no", "off"))
    if path == VARLEN_COMPAT:
        dispatch._TORCH_VARLEN_ATTN = without_enable_gqa(varlen_attn)
        # Eager calls take the aten flash ops directly (Unsloth's lean path); torch 2.11 has no cuDNN
        # varlen route to prefer over them.
        dispatch._LEAN_VARLEN = True
        dispatch._varlen_can_use_cudnn = lambda *args, **kwargs: False
    return path
