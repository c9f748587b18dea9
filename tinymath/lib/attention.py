"""tinymath's two attention functions, registered with transformers' AttentionInterface.

``tinymath_packed`` (training): many examples packed into one row; attention must not cross example
boundaries. Given the cumulative example boundaries (``cu_seq_lens``), it runs PyTorch's
variable-length flash attention (``torch.nn.attention.varlen``) on CUDA, so no T x T mask is ever
built and each example only attends within itself; elsewhere (CPU) it runs causal SDPA example by
example. Rows without boundaries fall back to plain causal SDPA.

``tinymath_decode`` (generation): SDPA, except for one-token decode steps of grouped-query models.
There transformers' SDPA path copies every key/value head once per query head it serves (its
``repeat_kv``, because masked SDPA kernels take no GQA), which at eval's batch sizes moves many
gigabytes per step. Instead the query heads that share a key/value head are folded into the query
length: the same attention, with no copy of the cache. In tinymath's decode loop on a GPU, those
steps run on the memory-efficient SDPA kernel where, timed once per shape, it is clearly faster
than SDPA's own choice (`fastest_decode_kernel`): on an H200, cuDNN's kernel (SDPA's choice there)
takes SmolLM2's attention as long for 660 rows as for 1,319; the memory-efficient one 0.57x as long.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

NAME = "tinymath_packed"
DECODE_NAME = "tinymath_decode"


_VARLEN = []


def _varlen():
    """(varlen_attn or None, whether it takes enable_gqa); looked up once (and outside torch.compile)."""
    if not _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN.append((None, False))
        else:
            _VARLEN.append((varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters))
    return _VARLEN[0]


def _groups(module) -> int:
    """Query heads per key/value head, from the module's settings (1 for models without GQA)."""
    groups = getattr(module, "num_key_value_groups", None)
    if groups is None:
        config = module.config
        heads = config.num_attention_heads
        groups = heads // (getattr(config, "num_key_value_heads", None) or heads)
    return int(groups)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens=None, max_seq_len=None, **kwargs):
    """query/key/value: [1, heads, T, dim]; returns ([1, T, heads, dim], None)."""
    import torch
    import torch.nn.functional as F

    groups = _groups(module)
    gqa = groups > 1  # plain Python values, not symbolic ones, under torch.compile
    if cu_seq_lens is None:  # one example per row (e.g. validation on a padded batch)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             is_causal=attention_mask is None, scale=scaling,
                                             enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    varlen_attn, has_gqa = _varlen() if query.is_cuda and query.dtype != torch.float32 else (None, False)
    if varlen_attn is not None:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, dim]
        if gqa and not has_gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra = {"enable_gqa": gqa} if has_gqa else {}
        out = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_seq_len, max_seq_len, scale=scaling,
                          window_size=(-1, 0), **extra)
        return out.unsqueeze(0), None
    bounds = cu_seq_lens.tolist()
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                           scale=scaling, enable_gqa=gqa)
            for s, e in zip(bounds[:-1], bounds[1:]) if e > s]  # empty segments: padding of `tinymath.graphs`
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``attn_implementation="tinymath_packed"`` available to transformers; returns the name."""
    from transformers import AttentionInterface

    _varlen()

    AttentionInterface.register(NAME, packed_attention)
    return NAME


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with grouped query heads folded into the query length on decode steps (query length 1)."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if length != 1 or heads == kv_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    # query head h uses key/value head h // groups (transformers' repeat_kv order)
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    mask = attention_mask[:, :, :, :key.shape[-2]] if attention_mask is not None else None
    kernel = fastest_decode_kernel(grouped, key, value, mask, scaling) if query.is_cuda and _CHOOSING else None
    if kernel is None:
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([kernel]):
            out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


_FASTEST: dict = {}  # decode step's shape -> the SDPA kernel to run it with (None: SDPA's own choice)
_CHOOSING: list = []  # non-empty inside `choosing_decode_kernels`
TIMED_CALLS = 5
CLEARLY_FASTER = 0.9  # the memory-efficient kernel replaces SDPA's choice only when this much faster


@contextmanager
def choosing_decode_kernels():
    """Within this block (tinymath's decode loop, whose static cache keeps a batch's shapes fixed)
    decode steps run on the kernel `fastest_decode_kernel` picks. Outside it (``generate`` with a
    growing cache: a new shape every step) SDPA chooses as usual."""
    _CHOOSING.append(True)
    try:
        yield
    finally:
        _CHOOSING.pop()


def fastest_decode_kernel(query, key, value, mask, scale):
    """The SDPA kernel for a decode step of this shape on this GPU: the memory-efficient one where
    it runs the shape clearly faster (`CLEARLY_FASTER`) than cuDNN's (SDPA's first choice on
    Hopper, which for SmolLM2 on an H200 takes as long for 660 rows as for 1,319), else None (SDPA
    chooses). Both are timed the first time the shape is seen (a few calls each, a millisecond or
    so), then the choice is remembered for the process; the margin keeps timing noise from
    flipping it between runs. None also under ``torch.compile``, inside a CUDA-graph capture
    before the shape was timed eagerly, or when the memory-efficient kernel cannot run it. The
    decode loop's first steps are eager, so its captured graph uses the timed choice."""
    import warnings

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if torch.compiler.is_compiling():  # compiled `generate`: its own kernel choice, no context manager traced
        return None
    shape = (tuple(query.shape), key.shape[-2], query.dtype, query.device, mask is None)
    if shape in _FASTEST:
        return _FASTEST[shape]
    if torch.cuda.is_current_stream_capturing():
        return None
    times = {}
    for kernel in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:  # a kernel that cannot run the shape warns why, then raises: neither is the user's concern
            with sdpa_kernel([kernel]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)  # warm-up
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(TIMED_CALLS):
                    F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
                end.record()
                end.synchronize()
        except RuntimeError:  # this kernel cannot run this shape (or this GPU has no cuDNN attention)
            continue
        times[kernel] = start.elapsed_time(end)
    efficient, cudnn = times.get(SDPBackend.EFFICIENT_ATTENTION), times.get(SDPBackend.CUDNN_ATTENTION)
    faster = efficient is not None and (cudnn is None or efficient < CLEARLY_FASTER * cudnn)
    _FASTEST[shape] = SDPBackend.EFFICIENT_ATTENTION if faster else None
    return _FASTEST[shape]


def use_decode_attention(model) -> None:
    """Switch an SDPA model to ``tinymath_decode`` (same masks as SDPA); other implementations stay."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation != "sdpa":
        return
    AttentionInterface.register(DECODE_NAME, decode_attention)
    AttentionMaskInterface.register(DECODE_NAME, sdpa_mask)
    model.set_attn_implementation(DECODE_NAME)
