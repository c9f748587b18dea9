"""Batches and the loss: a step's examples cut into padding-free packed rows (or padded rows, the
plain reference path), and the module whose forward returns a micro-batch's summed answer-token
loss. Every training method shares these: how a step is cut into micro-batches, or whether
examples are packed, does not change the math.
"""

from __future__ import annotations

from tinymath.base.config import TrainConfig
from tinymath.base.errors import TinymathError


def pack_examples(examples: list[dict]):
    """One padding-free row: examples concatenated, ``position_ids`` restarting at each example and
    the example boundaries (``cu_seq_lens``) for `tinymath.lib.attention`, so attention never crosses
    from one example into another."""
    import torch

    input_ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    positions = [p for ex in examples for p in range(len(ex["input_ids"]))]
    lengths = [len(ex["input_ids"]) for ex in examples]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    batch = {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
             "position_ids": torch.tensor([positions]), "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
             "max_seq_len": max(lengths)}
    if "weights" in examples[0]:  # per-token loss weights (GRPO's advantages), aligned with labels
        batch["weights"] = torch.tensor([[w for ex in examples for w in ex["weights"]]], dtype=torch.float32)
    return batch


def pad_examples(examples: list[dict], pad_id: int):
    """The plain reference batch: right-padded rows with an attention mask."""
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    weights = torch.zeros((len(examples), width)) if "weights" in examples[0] else None
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, :n] = torch.tensor(ex["labels"])
        mask[row, :n] = 1
        if weights is not None:
            weights[row, :n] = torch.tensor(ex["weights"], dtype=torch.float32)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return batch if weights is None else {**batch, "weights": weights}


def count_label_tokens(examples: list[dict]) -> int:
    """Answer tokens that carry loss (labels shift by one: the first token is never a target)."""
    return sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)


def process_examples(examples: list[dict], index: int, processes: int) -> list[dict]:
    """Process ``index``'s share of a step's examples when ``processes`` split it: as even in tokens
    as the examples allow (longest first, each to the share with the fewest tokens so far among
    those not yet holding an even split's count: CUDA graphs are sized for that many examples), so
    no process waits at the gradient exchange for one that drew longer examples. Every process
    computes the same split; a share keeps the step's order. One process: all of them."""
    if processes == 1:
        return examples
    most = -(-len(examples) // processes)  # no share holds more examples than an even split would
    tokens, counts = [0] * processes, [0] * processes
    owner = [0] * len(examples)
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"])):
        owner[i] = min((p for p in range(processes) if counts[p] < most), key=lambda p: tokens[p])
        tokens[owner[i]] += len(examples[i]["input_ids"])
        counts[owner[i]] += 1
    return [ex for ex, p in zip(examples, owner) if p == index]


def check_micro_batch_tokens(config: TrainConfig, examples: list[dict]) -> None:
    """A ``--micro-batch-tokens`` below the longest SFT example is refused: that example would make a
    micro-batch of its own, larger than the size asked for (GRPO's solutions are not known yet)."""
    if not (config.packing and config.micro_batch_tokens and config.method == "sft"):
        return
    longest = max(len(ex["input_ids"]) for ex in examples)
    if config.micro_batch_tokens < longest:
        raise TinymathError(f"--micro-batch-tokens {config.micro_batch_tokens} is smaller than the longest training "
                            f"example ({longest} tokens), and a micro-batch holds at least one whole example; give at "
                            f"least {longest}, or leave it out to have it planned")


def micro_batches(examples: list[dict], config: TrainConfig, pad_id: int, max_tokens: int | None = None):
    """Cut a step's examples into micro-batches: packed rows of at most ``max_tokens`` tokens, or
    (reference path) padded batches of ``batch_size`` examples."""
    if not config.packing:
        for start in range(0, len(examples), config.batch_size):
            yield pad_examples(examples[start:start + config.batch_size], pad_id)
        return
    chunk, size = [], 0
    for ex in examples:
        n = len(ex["input_ids"])
        if chunk and max_tokens and size + n > max_tokens:
            yield pack_examples(chunk)
            chunk, size = [], 0
        chunk.append(ex)
        size += n
    if chunk:
        yield pack_examples(chunk)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def build_loss_model(model, fast: bool = True, chunk_tokens: int = 4096, temperature: float = 1.0):
    """Wrap the PEFT model in a module whose forward returns the summed answer-token loss (each
    token's cross-entropy times its weight when the batch carries ``weights``: with GRPO's
    advantages as weights, the policy-gradient loss).

    ``temperature``: the weighted loss takes the logits divided by it, i.e. the log-probabilities of
    the distribution GRPO sampled its solutions from at that temperature (1: the model's own); an
    unweighted loss (SFT, or a validation loss on reference solutions) is the model's own.

    ``fast``: the LM head runs only on labelled positions, in chunks whose fp32 logits are
    recomputed in the backward pass (checkpointed) instead of kept: the full ``tokens x
    vocabulary`` logits are never materialized. Otherwise the plain reference: the model's full
    logits and one cross-entropy. One module, so DDP (under accelerate) sees a single forward.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(head, hidden, targets):
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")

    def weighted_chunk_loss(head, hidden, targets, weights):
        logits = head(hidden).float()
        logits = logits if temperature == 1.0 else logits / temperature
        return (F.cross_entropy(logits, targets, reduction="none", ignore_index=-100) * weights).sum()

    class CausalLMLoss(torch.nn.Module):
        def __init__(self, peft_model):
            super().__init__()
            self.peft_model = peft_model

        def forward(self, input_ids, labels, all_positions=False, weights=None, **kwargs):
            """``all_positions``: the loss over every position, unlabelled ones ignored, instead of
            over the selected labelled ones (the same sum; a fixed shape for `tinymath.lib.graphs`).
            ``weights``: one per token, like ``labels``."""
            if not fast:
                logits = self.peft_model(input_ids=input_ids, use_cache=False, **kwargs).logits[:, :-1].float()
                flat_logits, targets = logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
                if weights is None:
                    return F.cross_entropy(flat_logits, targets, ignore_index=-100, reduction="sum")
                flat_logits = flat_logits if temperature == 1.0 else flat_logits / temperature
                return (F.cross_entropy(flat_logits, targets, ignore_index=-100, reduction="none")
                        * weights[:, 1:].reshape(-1)).sum()
            causal_lm = self.peft_model.get_base_model()
            hidden = causal_lm.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
            hidden, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
            weights = weights[:, 1:].reshape(-1) if weights is not None else None
            if not all_positions:
                keep = targets != -100
                hidden, targets = hidden[keep], targets[keep]
                weights = weights[keep] if weights is not None else None
            head = causal_lm.get_output_embeddings()
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, targets.shape[0], chunk_tokens):
                part = slice(start, start + chunk_tokens)
                fn, args = ((chunk_loss, (head, hidden[part], targets[part])) if weights is None
                            else (weighted_chunk_loss, (head, hidden[part], targets[part], weights[part])))
                # no random numbers in the loss: nothing to save (and no RNG state read under a CUDA graph)
                total = total + (checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
                                 if torch.is_grad_enabled() else fn(*args))
            return total

    return CausalLMLoss(model)
