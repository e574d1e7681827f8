"""titletune/training/attention.py: attention-path selection (CPU) and the torch 2.11 varlen layer (GPU)."""
from __future__ import annotations

import pytest
import torch

from titletune.training import attention
from titletune.training.attention import (CPU_SDPA, DENSE_SDPA, PER_DOCUMENT, VARLEN, VARLEN_COMPAT, choose_path,
                                          varlen_support, without_enable_gqa)


# Signatures of torch.nn.attention.varlen.varlen_attn across releases.
def varlen_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None):
    return query


def varlen_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
    return query


def test_varlen_support_reads_the_signature():
    assert varlen_support(None) == "none"
    assert varlen_support(varlen_torch_2_10) == "none"
    assert varlen_support(varlen_torch_2_11) == "compat"
    from torch.nn.attention.varlen import varlen_attn
    installed = tuple(int(part) for part in torch.__version__.split(".")[:2])
    assert varlen_support(varlen_attn) == ("native" if installed >= (2, 12) else "compat")


@pytest.mark.parametrize("kwargs, expected", [
    (dict(cuda=False, padding_free=True, unsloth_has_varlen=True, support="native", flash_available=True), CPU_SDPA),
    (dict(cuda=True, padding_free=False, unsloth_has_varlen=True, support="native", flash_available=True), DENSE_SDPA),
    (dict(cuda=True, padding_free=True, unsloth_has_varlen=True, support="native", flash_available=True), VARLEN),
    (dict(cuda=True, padding_free=True, unsloth_has_varlen=False, support="compat", flash_available=True),
     VARLEN_COMPAT),
    (dict(cuda=True, padding_free=True, unsloth_has_varlen=False, support="compat", flash_available=True,
          compat_allowed=False), PER_DOCUMENT),
    (dict(cuda=True, padding_free=True, unsloth_has_varlen=False, support="compat", flash_available=False),
     PER_DOCUMENT),
    (dict(cuda=True, padding_free=True, unsloth_has_varlen=False, support="none", flash_available=True),
     PER_DOCUMENT),
])
def test_choose_path(kwargs, expected):
    assert choose_path(**kwargs) == expected


def test_wrapper_drops_enable_gqa_and_passes_the_rest():
    seen = {}

    def varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        seen.update(scale=scale, window_size=window_size, max_q=max_q)
        return query

    q, kv = torch.zeros(10, 32, 8), torch.zeros(10, 8, 8)
    out = without_enable_gqa(varlen)(q, kv, kv, None, None, 7, 7, scale=0.5, window_size=(-1, 0), enable_gqa=True)
    assert out is q and seen == {"scale": 0.5, "window_size": (-1, 0), "max_q": 7}
    with pytest.raises(ValueError, match="not a multiple"):
        without_enable_gqa(varlen)(torch.zeros(10, 30, 8), kv, kv, None, None, 7, 7, enable_gqa=True)


def test_cpu_runs_report_cpu_sdpa():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert attention.install_varlen_compat(padding_free=True) == CPU_SDPA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent H200)")
def test_varlen_path_matches_per_document_sdpa_on_gpu():
    """The kernel Unsloth now runs (eager: aten flash via its lean path; compiled: the varlen function)
    equals per-document SDPA in bf16, forward and backward, with Llama-3-8B heads (32 query, 8 KV)."""
    import unsloth  # noqa: F401
    import torch.nn.functional as F
    from unsloth.utils import attention_dispatch as dispatch

    path = attention.install_varlen_compat(padding_free=True)
    assert path in (VARLEN, VARLEN_COMPAT)
    torch.manual_seed(0)
    lengths = [100, 37, 300, 64, 1]
    total, heads, kv_heads, dim = sum(lengths), 32, 8, 128
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16)

    def per_document():
        outs = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qs, ks, vs = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        return torch.cat(outs)

    def grads(fn):
        for x in (q, k, v):
            x.grad = None
        out = fn()
        out.backward(grad_out)
        return out.detach().float(), [x.grad.detach().float() for x in (q, k, v)]

    ref, ref_grads = grads(per_document)
    runs = {
        "eager": lambda: dispatch._varlen_attn_call(q, k, v, cu, max(lengths), scale=None, window_size=(-1, 0),
                                                    enable_gqa=True),
        "function": lambda: dispatch._TORCH_VARLEN_ATTN(q, k, v, cu, cu, max(lengths), max(lengths),
                                                       window_size=(-1, 0), enable_gqa=True),
    }
    for name, fn in runs.items():
        out, out_grads = grads(fn)
        assert (out - ref).abs().max().item() < 0.02, name
        for g, r in zip(out_grads, ref_grads):
            assert (g - r).abs().max().item() < 0.05 * max(1.0, r.abs().max().item()), name
