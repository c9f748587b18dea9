"""tinymath's own decode loop for batched generation: a static KV cache, and on a GPU each
one-token step replayed from a CUDA graph.

transformers' ``generate`` spends most of a small model's decode step in Python (its logits
processors, stopping checks and a GPU-to-CPU sync every step), and its fast path compiles the
model with ``torch.compile``, which costs a minute or more in every new process. Here the prompt
is run once (prefill), then every decode step is the same few kernels on fixed-shape tensors: the
step's token, its position, its cache slot and the attention mask over the whole cache. Those are
captured once per batch into a CUDA graph (no compiler, a fraction of a second) and replayed;
the only per-step host work is a handful of small kernels, and (greedy) whether every row has
finished is read every `CHECK_EVERY` steps, not every step.

A replayed step of a small model is still about 3,000 small kernels, whose fixed cost does not
shrink with the rows: half the rows (two GPUs sharing an evaluation) take two thirds of the time.
With ``compiled`` (``--compile-steps``), each step is first compiled by ``torch.compile``
(Inductor fuses the elementwise kernels) and then captured: about 25 s per batch shape in a new
process (8 s once Inductor's cache, `tinymath.lib.speed.use_compile_cache`, has it, plus a few
seconds loading its kernels), then steps whose time follows their rows (SmolLM2 on an H200: 1,319
rows 1.92x the time of 660).

What it supports is what eval and GRPO sampling need: greedy, or sampling with temperature,
top-k and top-p (the order transformers applies them), ``min_new_tokens`` from the model's
generation config, one EOS token, full attention in every layer, and a tool that writes some of
a row's tokens itself (the calculator's results, read as the row is decoded). Anything else (stop strings,
stopping criteria, other logits processors in the model's generation config, sliding-window
layers, attention other than ``tinymath_decode``) stays with ``generate`` (`supported`).
"""

from __future__ import annotations

from tinymath.lib.attention import DECODE_NAME, choosing_decode_kernels

GENERATE_TOP_K = 50  # what `generate` samples from when the model's generation config sets no top_k
CHECK_EVERY = 8  # steps between reads of "has every row finished?" (each read waits for the GPU)
COMPILED_SHAPES = 64  # batch shapes one process may compile steps for (torch.compile's own limit is 8)

# what this process's decode loops did, for the timing a command reports (`totals`)
_TOTALS = {"replayed_steps": 0, "eager_steps": 0, "capture_seconds": 0.0, "failed_captures": 0}


def totals() -> dict:
    """Steps replayed from a CUDA graph and run eagerly, seconds spent capturing graphs, and
    captures that failed, summed over every `decode` in this process so far."""
    return dict(_TOTALS)

# generation-config fields with these values change nothing; any other value needs `generate`
_NEUTRAL = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
            "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
            "forced_eos_token_id": (None,), "min_length": (None, 0), "encoder_repetition_penalty": (None, 1.0),
            "sequence_bias": (None,), "exponential_decay_length_penalty": (None,), "min_p": (None,),
            "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
            "renormalize_logits": (None, False), "num_beams": (None, 1), "guidance_scale": (None, 1.0),
            "watermarking_config": (None,), "num_return_sequences": (None, 1), "top_h": (None,)}


def supported(model) -> bool:
    """Whether `decode` gives what ``generate`` would for this model: its attention is
    ``tinymath_decode`` (which takes the step's ready-made mask) and its generation config asks for
    nothing beyond temperature, top-k, top-p and ``min_new_tokens``."""
    if getattr(model.config, "_attn_implementation", None) != DECODE_NAME or not _full_attention(model.config):
        return False
    config = getattr(model, "generation_config", None)
    return config is None or all(getattr(config, k, None) in ok for k, ok in _NEUTRAL.items())


def _full_attention(config) -> bool:
    """Every layer attends to the whole cache: the loop's one mask over all slots is right (a
    sliding-window layer keeps and masks only its window)."""
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return all(kind == "full_attention" for kind in kinds)
    return getattr(config, "sliding_window", None) is None


def _processors(model, sample: dict | None, prompt_width: int, eos: int, device):
    """The logits processors ``generate`` would apply, in its order."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    config = getattr(model, "generation_config", None)
    chain = LogitsProcessorList()
    min_new = getattr(config, "min_new_tokens", None)
    if min_new:
        chain.append(MinNewTokensLengthLogitsProcessor(prompt_width, min_new, eos, device=device))
    if sample:
        if sample["temperature"] != 1.0:
            chain.append(TemperatureLogitsWarper(sample["temperature"]))
        top_k = getattr(config, "top_k", None)
        top_k = GENERATE_TOP_K if top_k is None else top_k
        if top_k:
            chain.append(TopKLogitsWarper(top_k))
        if sample["top_p"] < 1.0:
            chain.append(TopPLogitsWarper(sample["top_p"]))
    return chain


def decode(model, input_ids, attention_mask, max_new_tokens: int, eos: int, pad: int,
           sample: dict | None = None, graphs: bool | None = None, compiled: bool = False,
           live: int | None = None, tool=None):
    """Complete a left-padded batch: ``input_ids`` followed by up to ``max_new_tokens`` new tokens
    per row ([rows, width + new], rows that finished padded with ``pad``), as ``generate`` returns.
    ``sample``: {"temperature", "top_p"} to sample, None for greedy. ``graphs``: replay decode
    steps from a CUDA graph (None: on a GPU). ``compiled``: each step compiled first (`compiled_step`;
    one compile per shape of rows and width + max_new_tokens). ``live``: only the first rows are
    answers; the rest fill a batch to its compiled shape, start finished and never hold it up.
    ``tool``: writes some of the tokens (the calculator's results, `tinymath.lib.generate.CalculatorTool`):
    after a row's own token that is one of ``tool.triggers``, ``tool(row, its tokens so far)`` gives
    the tokens that row takes in the next steps instead of the model's (their count within
    ``max_new_tokens``; read each step, so the loop waits for the GPU every step)."""
    import torch
    from transformers import StaticCache

    rows, width = input_ids.shape
    device = input_ids.device
    graphs = device.type == "cuda" if graphs is None else graphs
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    processors = _processors(model, sample, width, eos, device)
    with torch.no_grad(), choosing_decode_kernels():
        step = _Step(model, cache, attention_mask, positions[:, -1:], width + max_new_tokens, compiled)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       cache_position=torch.arange(width, device=device), logits_to_keep=1,
                       **{step.cache_name: cache, "use_cache": True}).logits[:, -1]
        seen = input_ids
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        if live is not None:
            finished[live:] = True
        new = []
        written = _ToolRows(tool, rows) if tool is not None else None
        for t in range(max_new_tokens):
            scores = processors(seen, logits.float()) if processors else logits.float()
            if sample:
                chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                chosen = scores.argmax(dim=-1)
            chosen = torch.where(finished, torch.full_like(chosen, pad), chosen)
            if written is not None:
                chosen = written.step(chosen, finished)
            finished |= chosen == eos
            new.append(chosen)
            if processors:  # they read the tokens so far (min_new_tokens counts them)
                seen = torch.cat([seen, chosen[:, None]], dim=1)
            # sampling checks every step: a step after all rows finished would draw random numbers
            # that `generate` does not, and the next batch's samples would differ from its
            if t == max_new_tokens - 1 or ((sample or (t + 1) % CHECK_EVERY == 0) and bool(finished.all())):
                break
            logits = step(chosen, width + t, graphs)
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


class _ToolRows:
    """What a `decode` tool has written and will write, per row."""

    def __init__(self, tool, rows: int):
        self.tool, self.queued, self.made = tool, [[] for _ in range(rows)], [[] for _ in range(rows)]

    def step(self, chosen, finished):
        """This step's tokens: the tool's where it has some queued for a row, else the model's; a
        row whose own token is a trigger asks the tool for the next ones."""
        import torch

        tokens, done, wrote = chosen.tolist(), finished.tolist(), False
        for row, token in enumerate(tokens):
            if done[row]:
                continue
            if self.queued[row]:
                tokens[row], wrote = self.queued[row].pop(0), True
            elif token in self.tool.triggers:
                self.queued[row] = list(self.tool(row, self.made[row] + [token]))
            self.made[row].append(tokens[row])
        return torch.tensor(tokens, dtype=chosen.dtype, device=chosen.device) if wrote else chosen


class _Step:
    """One decode step on fixed-shape tensors: the previous token goes into cache slot ``slot``;
    returns the logits for the next token. With ``graphs``, the first `EAGER_STEPS` steps run as
    they are (warming up cuBLAS and the like, which a capture cannot do) and the next is captured
    into a CUDA graph that every later step replays. The cache writes where it is told (the slot:
    older transformers) or where it counts it is (its own length counter, a tensor the graph advances)."""

    EAGER_STEPS = 2

    def __init__(self, model, cache, prompt_mask, last_position, cache_len: int, compiled: bool = False):
        import inspect

        import torch

        rows, width = prompt_mask.shape
        device = prompt_mask.device
        self.model, self.calls = model, 0
        self.compiled = compiled_step() if compiled else None
        # newer transformers name the argument `cache`
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.mask = torch.zeros((rows, 1, 1, cache_len), dtype=torch.bool, device=device)
        self.mask[:, 0, 0, :width] = prompt_mask.bool()
        self.token = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.position = last_position.clone()
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.inputs = {"input_ids": self.token, "attention_mask": self.mask, "position_ids": self.position,
                       "cache_position": self.slot, self.cache_name: cache, "use_cache": True}
        self.graph = self.logits = None
        self.failed = False

    def _forward(self):
        if self.compiled is None:
            return self.model(**self.inputs).logits[:, -1]
        from torch._dynamo.exc import BackendCompilerFailed

        try:
            with _compiled_attention():
                return self.compiled(self.model, self.inputs)
        except BackendCompilerFailed as exc:  # e.g. no C++ compiler for Inductor's CPU code
            from tinymath.base.errors import TinymathError

            inner = getattr(exc, "inner_exception", None) or exc
            text = str(inner).strip()
            reason = f"{type(inner).__name__}: {text.splitlines()[0]}" if text else type(inner).__name__
            raise TinymathError(f"--compile-steps: torch.compile cannot compile the decode step on this machine "
                                f"({reason}); drop --compile-steps") from None

    def __call__(self, token, slot: int, graphs: bool):
        import torch

        self.token.copy_(token[:, None])
        self.position += 1
        self.slot.fill_(slot)
        self.mask[:, :, :, slot] = True
        self.calls += 1
        if not graphs or self.calls <= self.EAGER_STEPS or self.failed:
            _TOTALS["eager_steps"] += 1
            return self._forward()
        if self.graph is None:
            import time

            graph = torch.cuda.CUDAGraph()
            started = time.perf_counter()
            try:  # thread-local: another thread (NCCL's watchdog under accelerate launch) cannot break it
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.logits = self._forward()
            except RuntimeError:  # something in this model syncs with the CPU: nothing ran, go on without
                torch.cuda.synchronize(self.token.device)
                self.failed = True
                _TOTALS["failed_captures"] += 1
                _TOTALS["eager_steps"] += 1
                return self._forward()
            finally:
                _TOTALS["capture_seconds"] += time.perf_counter() - started
            self.graph = graph
        _TOTALS["replayed_steps"] += 1
        self.graph.replay()
        return self.logits


_COMPILED: list = []  # the compiled step, made at the first use in the process


def compiled_step():
    """A decode step through ``torch.compile`` (fixed shapes, Inductor's fused kernels), made once
    per process: called as ``step(model, inputs)``, it returns the logits of the next token. The
    model is an argument, so another model of the same architecture and shapes reuses the compiled
    code (its weights are inputs) and nothing keeps a model alive. Artefacts go to tinymath's compile
    cache, so a later process on this machine compiles the same shapes faster."""
    if not _COMPILED:
        import torch

        from tinymath.lib.speed import use_compile_cache

        use_compile_cache()
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, COMPILED_SHAPES)
        _COMPILED.append(torch.compile(_next_logits, dynamic=False))
    return _COMPILED[0]


def _next_logits(model, inputs: dict):
    return model(**inputs).logits[:, -1]


def _compiled_attention():
    """The SDPA kernels a compiled step may trace: any but cuDNN's. Under ``torch.compile`` the
    per-shape choice of `tinymath.lib.attention.fastest_decode_kernel` is not made, and cuDNN's
    kernel, SDPA's first choice on Hopper, takes SmolLM2's attention as long for 660 rows as for
    1,319 (the memory-efficient one halves)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
