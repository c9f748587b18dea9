"""Padding-free attention for packed training rows.

Training packs many examples into one row; attention must not cross example boundaries. This
module registers ``tinymath_packed`` with transformers' AttentionInterface: given the cumulative
example boundaries (``cu_seq_lens``), it runs PyTorch's variable-length flash attention
(``torch.nn.attention.varlen``) on CUDA, so no T x T mask is ever built and each example only
attends within itself; elsewhere (CPU) it runs causal SDPA example by example. Rows without
boundaries fall back to plain causal SDPA.
"""

from __future__ import annotations

import inspect

NAME = "tinymath_packed"


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens=None, max_seq_len=None, **kwargs):
    """query/key/value: [1, heads, T, dim]; returns ([1, T, heads, dim], None)."""
    import torch
    import torch.nn.functional as F

    groups = query.shape[1] // key.shape[1]
    if cu_seq_lens is None:  # one example per row (e.g. validation on a padded batch)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             is_causal=attention_mask is None, scale=scaling,
                                             enable_gqa=groups > 1)
        return out.transpose(1, 2).contiguous(), None
    varlen_attn, has_gqa = _varlen() if query.is_cuda else (None, False)
    if varlen_attn is not None:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, dim]
        if groups > 1 and not has_gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra = {"enable_gqa": groups > 1} if has_gqa else {}
        out = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_seq_len, max_seq_len, scale=scaling,
                          window_size=(-1, 0), **extra)
        return out.unsqueeze(0), None
    bounds = cu_seq_lens.tolist()
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                           scale=scaling, enable_gqa=groups > 1)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``attn_implementation="tinymath_packed"`` available to transformers; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME
