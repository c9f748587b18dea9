"""The attention of one decode step, as tinymath's decode loop runs it for SmolLM2 (grouped query
heads folded into the query length: [rows, 3, 3, 64] against a [rows, 3, cache, 64] cache, a
left-padding mask), under each SDPA kernel, at the row counts of a full-test evaluation on one GPU,
on two and on four. Prints milliseconds for 30 calls (one per layer).

    python benchmarks/sdpa_kernels.py
"""

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "math": SDPBackend.MATH}


def main():
    torch.manual_seed(0)
    for rows, cache in ((1319, 346), (660, 305), (330, 294)):
        q = torch.randn(rows, 3, 3, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(rows, 3, cache, 64, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        mask = torch.ones(rows, 1, 1, cache, device="cuda", dtype=torch.bool)
        mask[:, :, :, :5] = False
        ms = {}
        for name, kernel in KERNELS.items():
            try:
                with sdpa_kernel([kernel]) if kernel is not None else torch.autocast("cuda", enabled=False):
                    for _ in range(3):
                        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    for _ in range(30):
                        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    torch.cuda.synchronize()
                    ms[name] = round((time.perf_counter() - t) * 1000, 2)
            except RuntimeError as exc:
                ms[name] = type(exc).__name__
        print({"rows": rows, "cache": cache, "ms_for_30_layers": ms}, flush=True)


if __name__ == "__main__":
    main()
