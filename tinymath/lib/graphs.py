"""CUDA-graph replay of a training micro-batch (forward and backward together).

A small model such as SmolLM2-135M is launch-bound on a large GPU: a step makes thousands of small
kernel launches (most of them LoRA's little matmuls), and the GPU waits on the CPU issuing them.
Capturing one micro-batch's forward and backward into a CUDA graph and replaying it issues them all
at once.

A graph replays fixed shapes, so each packed row is padded up to a multiple of ``BUCKET`` tokens.
The padding is one more example with no labels, in its own attention segment: it changes no loss
and no gradient. The example boundaries are padded to a fixed count with empty segments. The loss
runs over every position (unlabelled ones are ignored) instead of selecting the labelled ones,
which would be a data-dependent shape. Each padded length gets its own graph, captured the first
time it is seen. The first length runs two eager warm-up passes before its capture (the
libraries' lazy initialisation; compiling, where the layers compile); a later length of an
uncompiled model is captured at once (its kernels are the same, at other sizes), a compiled one
gets one warm-up pass (it compiles for the new length). All graphs share one
memory pool, and gradients accumulate into ``.grad`` buffers allocated once, outside the graphs,
so gradient accumulation over several micro-batches works as without graphs.

Used by default on a GPU with bf16, without gradient checkpointing and with memory to spare; see
`use_cuda_graphs`. Under several processes (`accelerate launch`) the model is not wrapped in DDP
(DDP's gradient hooks cannot be captured, and the gradient nodes it keeps from set-up belong to
another stream than the capture's): the processes start from the same weights, the graphs run the
plain module, and the trainer averages the gradients across the processes after the replays, in
one collective per step, as DDP would have. With LoRA dropout, warm-up passes draw random numbers, so a resumed
run's dropout masks differ from an uninterrupted run's (the default dropout is 0).
"""

from __future__ import annotations

from tinymath.base.errors import TinymathError

BUCKET = 512  # padded lengths are multiples of this: at most 511 wasted tokens a micro-batch


def pad_packed(batch: dict, size: int, slots: int, pad_id: int) -> dict:
    """A packed row (`tinymath.lib.batching.pack_examples`) padded to ``size`` tokens with ``slots``
    boundaries; the same losses and gradients as ``batch``."""
    import torch

    n = batch["input_ids"].shape[1]
    extra = size - n
    bounds = batch["cu_seq_lens"].tolist() + ([size] if extra else [])
    if len(bounds) > slots:
        raise ValueError(f"{len(bounds) - 1} segments do not fit in {slots - 1}")
    bounds += [size] * (slots - len(bounds))  # empty segments
    filler = {"input_ids": torch.full((1, extra), pad_id), "labels": torch.full((1, extra), -100),
              "position_ids": torch.arange(extra).unsqueeze(0)}
    padded = {k: torch.cat([batch[k], filler[k].to(batch[k].dtype)], dim=1) for k in filler}
    padded["cu_seq_lens"] = torch.tensor(bounds, dtype=torch.int32)
    return padded


class GraphCaptureError(RuntimeError):
    """A micro-batch could not be captured (an op that synchronizes with the CPU, say): train without."""


class GraphedMicroBatches:
    """``step(batch, scale)`` runs forward and backward of ``loss_model`` on a packed micro-batch,
    adding ``scale`` x the gradient of its summed loss to the parameters' ``.grad``; returns the
    summed loss (a tensor that the next call overwrites)."""

    def __init__(self, loss_model, params: list, pad_id: int, max_examples: int, max_seq_len: int, device,
                 compiled: bool = False):
        import torch

        self.loss_model, self.pad_id, self.device = loss_model, pad_id, device
        self.compiled = compiled  # the layers run torch.compile: a new length compiles, outside the capture
        self.slots = max_examples + 2  # the examples' boundaries, and the padding's
        self.max_seq_len = max(int(max_seq_len), BUCKET)  # a fixed bound: flash attention skips what is beyond
        self.graphs: dict[int, tuple] = {}
        self.capture_seconds = 0.0  # warm-up passes and captures, compiling (where the layers compile) not counted
        self.pool = None
        self.scale = torch.zeros((), device=device)
        for p in params:  # accumulated into in place by every replay, whichever graph
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _forward_backward(self, inputs: dict):
        loss = self.loss_model(**inputs, max_seq_len=self.max_seq_len, all_positions=True)
        (loss * self.scale).backward()
        return loss.detach()

    def _capture(self, size: int, inputs: dict):
        import torch

        self.scale.zero_()  # warm-up passes add zero to the gradients
        warm_ups = self._warm_ups()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warm_ups):  # lazy initialisation, compiling: not in the capture
                self._forward_backward(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if warm_ups:
            torch.cuda.empty_cache()  # the warm-ups' cached blocks, free for the graphs' own pool
        graph = torch.cuda.CUDAGraph()
        # thread-local: only this thread's calls can break the capture, not another thread's (such
        # as the NCCL watchdog polling its events under several processes)
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            loss = self._forward_backward(inputs)
        self.pool = self.pool or graph.pool()
        self.graphs[size] = (graph, inputs, loss)

    def _warm_ups(self) -> int:
        """Eager passes before capturing a new length: two for the first, one more per new length
        where it compiles, none otherwise."""
        if not self.graphs:
            return 2
        return 1 if self.compiled else 0

    def step(self, batch: dict, scale: float):
        import math

        size = BUCKET * math.ceil(batch["input_ids"].shape[1] / BUCKET)
        padded = pad_packed(batch, size, self.slots, self.pad_id)
        if size not in self.graphs:
            import time

            import torch

            from tinymath.lib.speed import compile_seconds

            started, compiling = time.perf_counter(), compile_seconds()
            try:
                self._capture(size, {k: v.to(self.device) for k, v in padded.items()})
            except RuntimeError as exc:  # the gradients are untouched: warm-up adds zero, a capture runs nothing
                torch.cuda.synchronize(self.device)
                raise GraphCaptureError(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from exc
            torch.cuda.synchronize(self.device)
            self.capture_seconds += time.perf_counter() - started - (compile_seconds() - compiling)
        graph, inputs, loss = self.graphs[size]
        for key, value in padded.items():
            inputs[key].copy_(value)
        self.scale.fill_(scale)
        graph.replay()
        return loss


MIN_GRAPHED_STEPS = 20  # the first padded length costs about two steps' warm-up to capture


CUDA_GRAPHS_REFUSAL = ("--cuda-graphs needs a GPU with bf16 (no fp16 loss scaling), --packing and no gradient "
                       "checkpointing (with --max-memory the planner may have chosen it); drop --cuda-graphs")


def check_cuda_graphs_asked(config, device: str) -> None:
    """``--cuda-graphs`` where they cannot run whatever the plan, refused before anything is loaded
    (what the plan decides, gradient checkpointing under --max-memory, is checked once planned)."""
    if config.cuda_graphs and (not device.startswith("cuda") or not config.packing or config.gradient_checkpointing):
        raise TinymathError(CUDA_GRAPHS_REFUSAL)


def use_cuda_graphs(config, device: str, world: int, loss_scaling: bool, room: float,
                    gradient_checkpointing: bool | None = None, total_steps: int | None = None) -> bool:
    """Whether to train with graphs: ``--cuda-graphs``/``--no-cuda-graphs`` if given (an error where
    graphs cannot run), else the default. They can run on a GPU, with packed rows, no gradient
    checkpointing and no fp16 loss scaling (bf16 GPUs), in one process or several (``world``; then
    without DDP's wrapper, see `tinymath.lib.trainer.Trainer._prepare`);
    ``gradient_checkpointing``: whether the run uses it (asked for, or planned; default: as asked).
    By default they also need micro-batches with ``room`` for at least two average
    steps: that keeps them to where memory is plentiful (a new length's capture, or a compiled
    model's eager warm-up, comes beside the pool holding the earlier graphs), and a memory-bound
    run's large micro-batches gain little."""
    if gradient_checkpointing is None:
        gradient_checkpointing = config.gradient_checkpointing
    possible = device.startswith("cuda") and config.packing and not gradient_checkpointing and not loss_scaling
    if config.cuda_graphs and not possible:
        raise TinymathError(CUDA_GRAPHS_REFUSAL)
    if config.cuda_graphs is not None:
        return config.cuda_graphs
    long_enough = total_steps is None or total_steps >= MIN_GRAPHED_STEPS  # short runs: captures would not pay
    return possible and room >= 2 and long_enough
