"""How many operations one decode step of tinymath's loop runs per decoder layer: every aten call
(views left out) of a Llama step, counted on CPU with a dispatch hook, for two layer counts (the
difference is one layer's). On a GPU each is about one kernel, and in a replayed CUDA graph their
number, more than the rows, sets a small model's step time.

    python benchmarks/decode_ops.py
"""

from __future__ import annotations

import collections

VIEWS = {"view", "_unsafe_view", "expand", "unsqueeze", "squeeze", "transpose", "t", "slice", "select", "permute",
         "alias", "detach", "_reshape_alias", "as_strided", "reshape", "split", "split_with_sizes", "unbind",
         "lift_fresh"}


def ops_per_step(layers: int) -> collections.Counter:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from tinymath.lib.attention import choosing_decode_kernels, use_decode_attention
    from tinymath.lib.decode import _Step

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    use_decode_attention(model)
    rows, width, new = 8, 10, 20
    ids = torch.randint(0, 1000, (rows, width))
    mask = torch.ones_like(ids)
    cache = StaticCache(config=config, max_cache_len=width + new)
    positions = mask.cumsum(-1) - 1
    with torch.no_grad(), choosing_decode_kernels():
        step = _Step(model, cache, mask, positions[:, -1:], width + new)
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache_position=torch.arange(width),
              logits_to_keep=1, **{step.cache_name: cache, "use_cache": True})
        step(torch.zeros(rows, dtype=torch.long), width, False)
        with Count() as counted:
            step._forward()
    return collections.Counter({k: v for k, v in counted.calls.items() if k not in VIEWS})


def main():
    two, three = ops_per_step(2), ops_per_step(3)
    layer = three - two
    print(f"operations per decode step: {sum(two.values())} with 2 layers, {sum(three.values())} with 3; "
          f"per layer {sum(layer.values())}: " + ", ".join(f"{k} {v}" for k, v in layer.most_common()))


if __name__ == "__main__":
    main()
