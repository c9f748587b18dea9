"""The training recipe in phases, for every training method: set-up, one optimizer step, what
follows a step, finish (torchtune's recipe; LitGPT's setup -> fit -> validate).

- `Trainer.setup`: accelerator, tokenizer, data, the NF4 base with LoRA, the loss module, the
  speed plan (micro-batch size, checkpointing, compiling, CUDA graphs), optimizer and schedule,
  the resumed checkpoint, the run folder's first files.
- `Trainer.train_step`: one optimizer step: the packed forward and backward of the step's
  micro-batches (`forward_backward`), the loss across processes, the update.
- `Trainer.after_step`: metrics, validation, retention, trackers, checkpoints, Ctrl-C.
- `Trainer.finish`: adapter, tokenizer, curves and ``run.json`` (written last).

The same code runs on CPU, one GPU, or several GPUs under ``accelerate launch`` (data parallel;
each process holds its own NF4 copy, rank 0 logs and saves). The loss is the mean cross-entropy
over every answer token of an optimizer step (all micro-batches and processes together), so how
a step is cut into micro-batches does not change the math.

The `TrainConfig` is never changed: what the run decides for itself lives in `RunPlan` and is
recorded in the result. The run folder given (``live``) is the one trained in; choosing and
locking it is the train service's job (`tinymath.base.runs`).
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from tinymath.base.config import TrainConfig, parse_memory
from tinymath.base.errors import Stopped, TinymathError
from tinymath.base.progress import status_line
from tinymath.base.runs import BEST, CONFIG_FILE, METRICS, RUN_FILE
from tinymath.lib.batching import (
    check_micro_batch_tokens,
    count_label_tokens,
    micro_batches,
    process_examples,
    to_device,
)
from tinymath.lib.distributed import peers_lost_as_error
from tinymath.lib.speed import eager, inference_mode


# what the progress line says while each set-up phase runs
SETUP_WORDS = {"accelerator": "starting", "data": "reading the data", "model": "loading the model",
               "plan": "planning memory and speed", "optimizer": "building the optimizer",
               "restore": "restoring the checkpoint", "prepare": "preparing the model",
               "run_folder": "writing the run folder"}


@dataclass
class RunPlan:
    """What a run decides for itself on this machine (recorded in ``run.json``'s result)."""

    world: int
    per_step: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    micro_batch_tokens: int | None = None
    gradient_checkpointing: bool = False
    compiled: bool = False
    fused_kernels: bool = False
    cuda_graphs: bool = False
    memory_plan: dict = field(default_factory=dict)


@dataclass
class LoopState:
    """What changes from step to step."""

    start_step: int = 0
    best: dict = field(default_factory=lambda: {"accuracy": None, "step": None})
    last_loss: float = float("nan")
    val_loss: float | None = None  # on the held-out problems, after the last step (with --val-size)
    real_tokens: int = 0
    step_seconds: float = 0.0  # the steps themselves (validation, retention and saving not counted)
    started: float = 0.0
    checkpoint: Path | None = None
    saved_state: dict = field(default_factory=dict)


class Trainer:
    """One training run in ``live``: ``setup()``, then ``fit()`` (steps and their after-steps),
    which ends with ``finish()`` and returns the run summary.

    This is supervised fine-tuning; another method subclasses it and replaces what a step trains
    on (`step_batches`), reusing everything else."""

    method = "sft"
    prefetch = True  # build the next step's batches while the GPU works (they do not depend on the update)
    loss_temperature = 1.0  # the loss's log-probabilities: the model's own distribution

    def __init__(self, config: TrainConfig, live: Path, show_progress: bool = False, resume: bool = False,
                 final: Path | None = None):
        self.config, self.out, self.resume = config, Path(live), resume
        self.final = Path(final) if final is not None else self.out  # where the run ends up (``live``: as it trains)
        self.show_progress = show_progress
        self.state = LoopState()
        self.graphed = None
        self.retention = None
        self.step_metrics: dict = {}  # what a method adds to the step's metrics line
        self.first_step_seconds: float | None = None
        self.first_batches_seconds = 0.0
        self.capture_seconds_before_fallback = 0.0  # captures made before graphs were given up, if they were
        self.restore_process = lambda: None  # undoes what the run changed process-wide (Liger's swaps)

    # ------------------------------------------------------------ set-up

    def setup(self) -> Trainer:
        self.setup_started = time.time()
        from tinymath.lib.speed import compile_seconds

        self.compiled_before = compile_seconds()  # the process's compiling before this run (tests run several)
        self.setup_phases = {}  # where set-up time goes (run.json): phase -> seconds
        phases = {"accelerator": [self._setup_accelerator], "data": [self._load_data], "model": [self._load_model],
                  "plan": [self._plan_speed], "optimizer": [self._setup_optimizer],
                  "restore": [self._restore] if self.resume else [],
                  "prepare": [self._plan_graphs, self._prepare, self._setup_graphs],
                  "run_folder": [self._setup_run_folder, self._setup_retention]}
        with ExitStack() as shown:
            say = lambda text: None  # noqa: E731 (until the main process is known)
            for name, steps in phases.items():
                if name == "data" and self.show_progress:  # the accelerator knows the main process now
                    say = shown.enter_context(status_line("setting up", True))
                say(f"setting up: {SETUP_WORDS[name]}")
                started = time.time()
                for step in steps:
                    step()
                if steps:
                    self.setup_phases[name] = round(time.time() - started, 2)
        self.setup_seconds = time.time() - self.setup_started
        return self

    def _before_setup_seconds(self) -> float | None:
        """Seconds from this process's start to the set-up (Python, imports, checks)."""
        import psutil  # accelerate's dependency

        started = psutil.Process().create_time()
        return round(self.setup_started - started, 2) if self.setup_started >= started else None

    def _setup_accelerator(self) -> None:
        import torch
        from accelerate import Accelerator

        from tinymath.lib.distributed import default_device, process_state
        from tinymath.lib.model import compute_dtype

        process_state()
        device = default_device()
        self.dtype = compute_dtype(device)
        self.log_with = self.config.report_to
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "no")
        # the schedule counts optimizer steps; accelerate would otherwise step it once per process
        self.accelerator = Accelerator(mixed_precision=precision, log_with=self.log_with,
                                       step_scheduler_with_optimizer=False,
                                       project_dir=str(self.out / "logs") if self.log_with else None)
        self.device = device
        self.is_main = self.accelerator.is_main_process
        self.show_progress = self.show_progress and self.is_main

    def _load_data(self) -> None:
        from tinymath.lib.gsm8k import load_training_data
        from tinymath.lib.model import load_tokenizer

        config = self.config
        with self.accelerator.main_process_first():  # a .gguf is converted once, by the main process
            self.tokenizer = load_tokenizer(config.model, config.trust_remote_code)
        self.splits, self.data_stats, self.data_settings = load_training_data(config, self.tokenizer)
        self.train_examples = self.splits["train"]
        if not self.train_examples:
            raise TinymathError(f"--data {config.data} has no training examples")
        check_micro_batch_tokens(config, self.train_examples)
        self.val_rows = self.splits.get("validation", [])[:config.eval_limit] if config.eval_every else []
        self.pad_id = self.tokenizer.pad_token_id

    def _load_model(self) -> None:
        from accelerate.utils import set_seed

        from tinymath.lib.attention import register as register_packed_attention
        from tinymath.lib.batching import build_loss_model
        from tinymath.lib.lora import attach_lora, get_lora_config
        from tinymath.lib.model import load_base_model, model_fingerprint

        config = self.config
        set_seed(config.seed)
        with self.accelerator.main_process_first():
            base = load_base_model(config.model, config.quant, dtype=self.dtype, device=self.device,
                                   trust_remote_code=config.trust_remote_code)
        if config.packing:
            capped = [name for name in ("final_logit_softcapping", "attn_logit_softcapping")
                      if getattr(base.config, name, None)]
            if capped:  # the packed path computes plain logits and plain attention
                raise TinymathError(f"--model {config.model} soft-caps its {' and '.join(capped)}, which packed "
                                    "training does not apply; train it with --no-packing")
            base.set_attn_implementation(register_packed_attention())
        self.fingerprint = model_fingerprint(base)
        self.model = attach_lora(base, get_lora_config(config.lora_r, config.lora_alpha, config.lora_dropout,
                                                       config.target_modules), config.gradient_checkpointing,
                                 base_name=config.model)
        self.loss_model = build_loss_model(self.model, fast=config.packing, temperature=self.loss_temperature)
        self.loss_model.train()  # checkpointing and dropout only act in training mode: plan in it

    def say(self, message: str) -> None:
        """A note for the user, once (main process), on stderr: stdout stays clean for --json."""
        if self.is_main:
            import sys

            print(message, file=sys.stderr, flush=True)

    def _set_checkpointing(self, on: bool) -> None:
        causal_lm = self.model.get_base_model()
        if on:
            causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            causal_lm.gradient_checkpointing_disable()

    def _plan_speed(self) -> None:
        import torch

        from tinymath.lib.speed import (
            CPU_MICRO_BATCH_TOKENS,
            compile_layers,
            fuse_kernels,
            plan_layers,
            plan_micro_batch,
            use_compile_cache,
        )

        config, device = self.config, self.device
        world = self.accelerator.num_processes
        if len(self.train_examples) < world:  # a process with nothing to train on would wait on the others forever
            raise TinymathError(f"--data has {len(self.train_examples)} training example(s), fewer than the "
                                f"{world} processes launched: each needs at least one; launch fewer processes")
        per_step, steps_per_epoch, total = step_counts(len(self.train_examples), config, world)
        warmup = int(config.warmup) if config.warmup >= 1 else int(round(config.warmup * total))
        plan = RunPlan(world, per_step, steps_per_epoch, total, warmup, config.micro_batch_tokens,
                       config.gradient_checkpointing)
        # decided for this machine, not saved in the config: a run resumed elsewhere decides again
        tokens = total * per_step * sum(len(ex["input_ids"]) for ex in self.train_examples) / len(self.train_examples)
        plan.compiled, plan.fused_kernels = plan_layers(config, device, tokens, self.model)
        if plan.fused_kernels:  # before planning: the planner measures the memory of the kernels that run
            self.restore_process = fuse_kernels(self.model)
        if config.packing and plan.micro_batch_tokens is None and device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(device)
            budget = (parse_memory(config.max_memory) if config.max_memory
                      else int(torch.cuda.memory_allocated(device) + free * 0.9))
            with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32):
                plan.micro_batch_tokens, checkpointing, plan.memory_plan = plan_micro_batch(
                    self.loss_model, self.train_examples, config, device, budget, self._set_checkpointing)
            plan.gradient_checkpointing = plan.gradient_checkpointing or checkpointing
            self._set_checkpointing(plan.gradient_checkpointing)
        elif config.packing and plan.micro_batch_tokens is None:  # no planner off the GPU: a size that fits in RAM
            plan.micro_batch_tokens = CPU_MICRO_BATCH_TOKENS
        if plan.compiled:  # after planning: the planner's eager measurement is the larger (safe) one
            use_compile_cache()
            compile_layers(self.model)
        self.plan = plan

    def _setup_optimizer(self) -> None:
        import torch
        from transformers import get_cosine_schedule_with_warmup

        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=self.config.lr, weight_decay=self.config.weight_decay,
                                           fused=self.device.startswith("cuda"))
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, self.plan.warmup_steps, self.plan.total_steps)

    def _restore(self) -> None:
        from tinymath.lib.checkpoint import check_processes, finished_steps, load_latest_checkpoint

        state = self.state  # a run with no checkpoint at all was refused before loading (`check_resumable`)
        finished = finished_steps(self.out)
        if finished is not None and finished >= self.plan.total_steps:
            raise TinymathError(f"--resume {self.out}: the run has finished its {finished} steps ({RUN_FILE}); "
                                "pass a larger --max-steps or --epochs to train it further")
        state.checkpoint, state.saved_state = load_latest_checkpoint(self.out, self.model, self.optimizer,
                                                                     self.scheduler, say=self.say,
                                                                     rank=self.accelerator.process_index)
        check_processes(state.saved_state, self.plan.world, self.out)
        # the optimizer comes back with the rate the saved schedule set; this run's schedule (a new
        # --max-steps or --epochs changes it) decides the next step's, as a straight run's would
        scheduler = self.scheduler
        for group, base, rate in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * rate(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        state.start_step, state.best = state.saved_state["step"], state.saved_state.get("best", state.best)
        if finished is not None and state.start_step < finished:
            again = f"step {finished} runs" if finished == state.start_step + 1 else \
                f"steps {state.start_step + 1}-{finished} run"
            self.say(f"The run finished at step {finished}; its last checkpoint is at step {state.start_step}, "
                     f"so {again} again.")
        if state.start_step >= self.plan.total_steps:
            raise TinymathError(f"--resume {self.out}: the checkpoint is at step {state.start_step}, the run ends at "
                                f"step {self.plan.total_steps}; pass a larger --max-steps or --epochs to train further")

    def _plan_graphs(self) -> None:
        from tinymath.lib.graphs import use_cuda_graphs

        plan = self.plan
        lengths = [len(ex["input_ids"]) for ex in self.train_examples]
        room = (plan.micro_batch_tokens or 0) / (sum(lengths) / len(lengths) * self._local_examples())  # in steps
        refusal = None
        try:
            wanted = use_cuda_graphs(self.config, self.device, plan.world, self.accelerator.scaler is not None,
                                     room, plan.gradient_checkpointing, plan.total_steps)
        except TinymathError as exc:  # --cuda-graphs where they cannot run
            wanted, refusal = False, exc
        if plan.world > 1:  # each process planned its own memory; with graphs their collectives differ: agree
            import torch

            votes = self.accelerator.reduce(torch.tensor([float(wanted), float(refusal is not None)],
                                                         device=self.accelerator.device), reduction="sum").tolist()
            wanted = votes[0] == plan.world
            if votes[1] and refusal is None:
                refusal = TinymathError("--cuda-graphs cannot run on another process of this run (its output "
                                        "says why); drop --cuda-graphs")
        if refusal is not None:
            raise refusal
        plan.cuda_graphs = wanted

    def _local_examples(self) -> int:
        return math.ceil(self.plan.per_step / self.plan.world)

    def _prepare(self) -> None:
        if self.plan.cuda_graphs and self.plan.world > 1:
            # no DDP wrapper: it keeps the gradient nodes it saw at set-up (made on the default stream),
            # and a backward captured on another stream then breaks the capture. The processes start
            # from the same weights (DDP's broadcast) and `forward_backward` averages the gradients
            self.loss_model = self.accelerator.prepare_model(self.loss_model, evaluation_mode=True)
            self.optimizer, self.scheduler = self.accelerator.prepare(self.optimizer, self.scheduler)
            self._broadcast_trainable()
            return
        self.loss_model, self.optimizer, self.scheduler = self.accelerator.prepare(self.loss_model, self.optimizer,
                                                                                   self.scheduler)

    def _setup_graphs(self) -> None:
        from tinymath.lib.graphs import GraphedMicroBatches

        if self.plan.cuda_graphs:
            self.graphed = GraphedMicroBatches(self.accelerator.unwrap_model(self.loss_model), self.trainable,
                                               self.pad_id or 0, max_examples=self._local_examples(),
                                               max_seq_len=max(len(ex["input_ids"]) for ex in self.train_examples),
                                               device=self.accelerator.device, compiled=self.plan.compiled)

    def _setup_run_folder(self) -> None:
        """The main process writes the resolved config (and, resuming, forgets what was logged after
        the checkpoint: those steps run again)."""
        from tinymath.base.files import write_json
        from tinymath.base.runs import keep_metrics_until
        from tinymath.lib.checkpoint import restore_best

        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / CONFIG_FILE, asdict(self.config))
            if self.resume:
                keep_metrics_until(self.out, self.state.start_step)
                (self.out / RUN_FILE).unlink(missing_ok=True)
                restore_best(self.state.checkpoint, self.out, self.state.saved_state)
        self.accelerator.wait_for_everyone()
        if self.log_with:
            self.accelerator.init_trackers("tinymath", config={k: v for k, v in asdict(self.config).items()
                                                               if isinstance(v, (int, float, str, bool))})

    def _setup_retention(self) -> None:
        """``--retention-every``: the base's replies to a slice of general prompts, once; then a
        function that measures the drift of the model being trained from them."""
        if not (self.config.retention_every and self.is_main):
            return
        from tinymath.lib.drift import RETENTION_SLICE, adapter_drift, base_replies, retention_prompts

        fmt, system = self.data_settings["format"], self.data_settings["system_prompt"]
        prompts = retention_prompts()[:RETENTION_SLICE]
        with inference_mode(self.model), self.model.disable_adapter():
            replies = base_replies(self.model, self.tokenizer, prompts, fmt, system, 32)

        def measure() -> dict:
            with inference_mode(self.model):
                return adapter_drift(self.model, self.tokenizer, prompts, replies, fmt, system)

        self.retention = measure

    # ------------------------------------------------------------ the loop

    def step_examples(self, step: int) -> list[dict]:
        """The examples of optimizer step ``step``: a pure function of (seed, epoch, step)."""
        epoch, index = divmod(step, self.plan.steps_per_epoch)
        order = _epoch_order(len(self.train_examples), self.config.seed + epoch)
        per_step = self.plan.per_step
        return [self.train_examples[i] for i in order[index * per_step:(index + 1) * per_step]]

    def step_batches(self, step: int) -> tuple[list[dict], int, list[dict]]:
        """A step's examples, its answer-token count and this process's micro-batches."""
        examples = self.step_examples(step)
        local = process_examples(examples, self.accelerator.process_index, self.plan.world)
        return examples, count_label_tokens(examples), list(micro_batches(local, self.config, self.pad_id,
                                                                          self.plan.micro_batch_tokens))

    def fit(self) -> dict:
        """Train from the start (or the resumed) step to the end; returns the run summary."""
        import torch

        from tinymath.base.progress import progress_bar
        from tinymath.lib.checkpoint import stop_on_signals

        state, plan = self.state, self.plan
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        state.started = time.time()
        fields_fmt = "{task.fields[numbers]}"  # the last step's loss, learning rate and speed; none before
        metrics = open(self.out / METRICS, "a", encoding="utf-8") if self.is_main else nullcontext()
        try:
            with peers_lost_as_error(plan.world, self._resume_hint), clear_library_errors(), \
                    stop_on_signals(self._stop_notice() if self.is_main else None) as self.stop, \
                    metrics as self.metrics_file, \
                    progress_bar("training", plan.total_steps, self.show_progress, fields_fmt, numbers="") as self.update:
                self.update(advance=state.start_step)
                self.before_steps()
                if plan.compiled:  # the first step compiles: say so, not look stuck
                    self.update(advance=0, description="compiling the layers first (about a minute)")
                elif self.graphed is not None:
                    self.update(advance=0, description="capturing CUDA graphs")
                started = time.time()
                upcoming = self.step_batches(state.start_step)
                self.first_batches_seconds = time.time() - started  # GRPO: the first step's sampling
                for step in range(state.start_step, plan.total_steps):
                    upcoming = self.train_step(step, upcoming)
        finally:
            if self.log_with:
                self.accelerator.end_training()
        return self.finish()

    def before_steps(self) -> None:
        """Anything a method does before its first step (nothing for SFT)."""

    def train_step(self, step: int, batches):
        """One optimizer step on ``batches`` (`step_batches`); returns the next step's batches,
        built while the GPU works on this one."""
        t0 = self.step_started = time.time()
        examples, step_tokens, micro = batches
        loss_total = self.forward_backward(micro, step_tokens)
        more = step + 1 < self.plan.total_steps
        upcoming = self.step_batches(step + 1) if more and self.prefetch else None
        loss, stop_votes = self._reduce(loss_total, step_tokens)
        if not math.isfinite(loss):  # checked before the update: the weights stay good
            self._fail_non_finite(f"the loss became {loss} at step {step + 1}")
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=self.graphed is None)  # graphs keep adding into the same buffers
        real = sum(len(ex["input_ids"]) for ex in examples)
        if self.first_step_seconds is None:  # building its batches, compiling and graph capture included
            self.first_step_seconds = round(time.time() - t0 + self.first_batches_seconds, 2)
            self.update(advance=0, description="training")
        self.after_step(step + 1, loss, lr, real, real / max(time.time() - t0, 1e-9), stop_votes)
        return self.step_batches(step + 1) if more and upcoming is None else upcoming

    def forward_backward(self, batches: list[dict], step_tokens: int):
        """Forward and backward of this process's micro-batches, the gradients scaled so that the
        step's loss is the mean over its ``step_tokens`` answer tokens (all processes together; DDP
        averages over processes, hence the factor ``world``). Returns the summed loss (a tensor)."""
        import torch

        from tinymath.lib.graphs import GraphCaptureError

        world = self.plan.world
        loss_total = torch.zeros((), device=self.accelerator.device)
        for i, batch in enumerate(batches):
            if self.graphed is not None:
                try:
                    loss_total += self.graphed.step(batch, world / step_tokens)
                    continue
                except GraphCaptureError as exc:  # a model or library that graphs cannot hold
                    # a failed capture can leave the CUDA RNG unusable; and under several processes
                    # the others would go on averaging after their replays: collectives that differ
                    if self.config.lora_dropout or world > 1:
                        raise TinymathError(f"CUDA graphs could not capture this model ({exc}); "
                                            "train with --no-cuda-graphs") from exc
                    self.say(f"tinymath: training without CUDA graphs ({exc})")
                    self.capture_seconds_before_fallback = self.graphed.capture_seconds
                    self.graphed = None
            sync = i == len(batches) - 1
            with nullcontext() if sync else self.accelerator.no_sync(self.loss_model):
                micro_loss = self.loss_model(**to_device(batch, self.accelerator.device))
                self.accelerator.backward(micro_loss * world / step_tokens)
            loss_total += micro_loss.detach()
        if world > 1 and self.graphed is not None:  # (a failed capture ends a run of several processes)
            self._average_gradients()
        return loss_total

    def _average_gradients(self) -> None:
        """What DDP does in its backward hooks, done once after graph replays: every trainable
        gradient averaged over the processes, in one collective on one flat buffer."""
        self._collective([p.grad for p in self.trainable], lambda flat: self.accelerator.reduce(flat, reduction="mean"))

    def _broadcast_trainable(self) -> None:
        """What DDP does when it wraps a model: every process starts from the main process's weights."""
        from accelerate.utils import broadcast

        self._collective([p.data for p in self.trainable], broadcast)

    @staticmethod
    def _collective(tensors: list, op) -> None:
        """``op`` on one flat buffer of ``tensors``, copied back into them."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        flat = op(_flatten_dense_tensors(tensors))
        for tensor, result in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            tensor.copy_(result)

    def _reduce(self, loss_total, step_tokens: int) -> tuple[float, float]:
        """One collective per step: the loss, and whether any rank was asked to stop (all ranks must
        agree to stop at the same step, or they deadlock)."""
        import torch

        device = self.accelerator.device
        totals = torch.stack([loss_total, torch.tensor(float(bool(self.stop["signal"])), device=device)])
        if self.plan.world > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        loss_sum, stop_votes = totals.tolist()
        return loss_sum / step_tokens, stop_votes

    def _resume_hint(self) -> str:
        from tinymath.lib.checkpoint import latest_checkpoint, resume_command
        from tinymath.lib.distributed import several_machines

        if not latest_checkpoint(self.out):
            return ""
        return f"Continue from its last checkpoint with: {resume_command(self.out, self.plan.world, several_machines())}"

    def _fail_non_finite(self, what: str) -> None:
        from tinymath.lib.checkpoint import latest_checkpoint

        last = latest_checkpoint(self.out)
        kept = f"the last good checkpoint is {last}; " if last else ""
        raise TinymathError(f"{what}; stopped. {kept}lower --lr (now {self.config.lr}) and start again"
                            + (f" (or --resume {self.out})" if last else ""))

    # ------------------------------------------------------------ after a step

    def after_step(self, done: int, loss: float, lr: float, real: int, tps: float, stop_votes: float) -> None:
        """Log the step; validate, measure drift, plot, save and stop when it is time."""
        config, state, total = self.config, self.state, self.plan.total_steps
        state.real_tokens += real
        state.step_seconds += real / max(tps, 1e-9)
        state.last_loss = loss
        record = {"step": done, "epoch": round(done / self.plan.steps_per_epoch, 4), "loss": round(loss, 6),
                  "lr": lr, "tokens_per_s": round(tps, 1), "tokens": real, **self.step_metrics}
        evaluating = self._validate(done, record)
        if self.retention and (done % config.retention_every == 0 or done == total):
            numbers = self.retention()
            record.update(retention_kl=numbers["kl"], retention_top1=numbers["top1_agreement"])
            evaluating = True
        self.log_record(record, to_file=done % config.log_every == 0 or done == total or evaluating)
        if evaluating and self.is_main:
            from tinymath.lib.curves import plot_curves

            plot_curves(self.out)
        self.update(numbers=f"loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s")
        if config.save_every and done % config.save_every == 0 and done < total:
            self.save(done)
        self._stop_if_asked(done, stop_votes)

    def log_record(self, record: dict, to_file: bool = True) -> None:
        """A step's record to the trackers of ``--report-to`` and, ``to_file``, as one line of
        ``metrics.jsonl`` (main process)."""
        if to_file and self.metrics_file:
            import json

            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.log_with:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def _validate(self, done: int, record: dict) -> bool:
        """Validation loss at the end, validation accuracy every ``--eval-every`` steps (keeping the
        best adapter with ``--keep best``); whether the step was evaluated."""
        config, total = self.config, self.plan.total_steps
        if "validation" in self.splits and done == total:
            self.update(advance=0, description="validation loss")
            loss = self.validation_loss(self.splits["validation"])
            if not math.isfinite(loss):  # the weights are finite (checked): keep the run, without the figure
                self.say(f"tinymath: the validation loss came out {loss}; the run is kept, without it")
            record["val_loss"] = self.state.val_loss = round(loss, 6) if math.isfinite(loss) else None
        evaluating = bool(config.eval_every and (done % config.eval_every == 0 or done == total))
        if evaluating and self.is_main:
            self.update(advance=0, description=f"validating ({len(self.val_rows)} problems)")
            record["val_accuracy"] = self.validation_accuracy()
            self.note_accuracy(record["val_accuracy"], done)
        self.update(advance=0, description="training")
        return evaluating

    def note_accuracy(self, accuracy: float, step: int) -> None:
        """A validation accuracy: the best so far is remembered, and with ``--keep best`` its adapter."""
        best = self.state.best
        if best["accuracy"] is None or accuracy > best["accuracy"]:
            self.state.best = {"accuracy": accuracy, "step": step}
            if self.config.keep == "best":
                self.model.save_pretrained(str(self.out / BEST))
                (self.out / BEST / "README.md").unlink(missing_ok=True)  # PEFT's blank card; the run's is the card

    def validation_accuracy(self) -> float:
        """Greedy GSM8K accuracy of the model being trained on the held-out rows."""
        with inference_mode(self.model):
            return validation_accuracy(self.model, self.tokenizer, self.val_rows, self.data_settings["format"],
                                       self.data_settings["system_prompt"])

    def validation_loss(self, examples: list[dict]) -> float:
        """Mean answer-token loss on held-out examples (same batching as training, no gradients)."""
        import torch

        total = 0.0
        self.loss_model.eval()
        with torch.no_grad(), eager():
            for batch in micro_batches(examples, self.config, self.pad_id, self.plan.micro_batch_tokens):
                total += self.loss_model(**to_device(batch, self.accelerator.device)).item()
        self.loss_model.train()
        return total / max(count_label_tokens(examples), 1)

    def _stop_notice(self) -> str:
        # several processes: the signal may be the launcher's, after another process died, and then
        # no checkpoint can be saved (this process then says that the other stopped)
        saving = "a checkpoint to resume from" if self.plan.world == 1 else \
            "a checkpoint to resume from if every process of the run is still there"
        return (f"tinymath: stopping after this step, with {saving} (the last step finishes the run instead); "
                "Ctrl-C again stops at once")

    def _stop_if_asked(self, done: int, stop_votes: float) -> None:
        """Save and stop after this step when Ctrl-C (or SIGTERM) came; after the last step the run
        finishes instead (its result is written next, and a checkpoint there could not be resumed)."""
        if done == self.plan.total_steps:
            return
        if self.plan.world == 1:
            stopping = self.stop["signal"]
        else:  # only the agreed vote counts: a signal that came after it waits for the next step
            stopping = (self.stop["signal"] or "a signal") if stop_votes else None
        if stopping:
            self.stop["signal"] = stopping
            self.save(done)
            from tinymath.lib.checkpoint import resume_command
            from tinymath.lib.distributed import several_machines

            resume = resume_command(self.out, self.plan.world, several_machines())
            raise Stopped(f"stopped by {stopping} after step {done} of {self.plan.total_steps}; a checkpoint is "
                          f"saved. Continue with: {resume}", stopping, every_process=self.plan.world > 1)

    def save(self, step: int) -> None:
        """A resumable checkpoint after ``step`` (the main process writes; all wait)."""
        from tinymath.lib.checkpoint import rng_state, save_checkpoint

        self._check_weights_finite(step)
        rng_states = [rng_state()]
        if self.plan.world > 1:  # each process's own: its dropout masks and samples continue exactly
            from accelerate.utils import gather_object

            rng_states = gather_object(rng_states)
        if self.is_main:
            save_checkpoint(self.out, step, self.accelerator.unwrap_model(self.loss_model).peft_model,
                            self.optimizer, self.scheduler, {"best": self.state.best}, self.config.keep_checkpoints,
                            rng_states)
        self.accelerator.wait_for_everyone()

    def _check_weights_finite(self, step: int) -> None:
        import torch

        if not all(torch.isfinite(p).all() for p in self.trainable):
            self._fail_non_finite(f"the adapter's weights became NaN or infinite at step {step}")

    # ------------------------------------------------------------ finish

    def summary(self) -> dict:
        """The run's figures for run.json and the report. train_seconds is the whole loop, CUDA-graph
        captures (graph_capture_seconds) included; setup_seconds (loading, planning) comes before
        it, split by phase in setup_phases (model: loading and quantizing the base, attaching LoRA),
        and process_start_to_setup_seconds before that (Python, imports, checks); compile_seconds
        is the run's time in ``torch.compile``, mostly in the first steps."""
        import torch

        from tinymath.lib.speed import compile_seconds

        state, plan = self.state, self.plan
        seconds = time.time() - state.started
        summary = {"steps": plan.total_steps, "final_loss": state.last_loss, "val_loss": state.val_loss,
                   "train_seconds": round(seconds, 2),
                   "process_start_to_setup_seconds": self._before_setup_seconds(),
                   "setup_seconds": round(self.setup_seconds, 2), "setup_phases": self.setup_phases,
                   "first_step_seconds": self.first_step_seconds,
                   "compile_seconds": round(compile_seconds() - self.compiled_before, 2),
                   "graph_capture_seconds": round(self.graphed.capture_seconds if self.graphed else
                                                  self.capture_seconds_before_fallback, 2),
                   "real_tokens_per_s": round(state.real_tokens / max(state.step_seconds, 1e-9), 1),
                   "out": str(self.final.absolute()),
                   "micro_batch_tokens": plan.micro_batch_tokens, "gradient_checkpointing": plan.gradient_checkpointing,
                   "compiled": plan.compiled, "fused_kernels": plan.fused_kernels,
                   "cuda_graphs": self.graphed is not None,
                   "resumed_from_step": state.start_step or None, "best_val_accuracy": state.best["accuracy"],
                   "best_step": state.best["step"], "adapter_step": self._adapter_step()}
        if self.device.startswith("cuda"):
            summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return summary

    def _adapter_step(self) -> int:
        """The step whose adapter the run folder ships: with ``--keep best``, the best validated one
        (0: the adapter the run started from); else the last. final_loss and val_loss stay the last
        step's."""
        return self.state.best["step"] if self._ships_best() else self.plan.total_steps

    def _ships_best(self) -> bool:
        """Whether the run folder ships the best validated adapter (``--keep best``, one was saved)."""
        from tinymath.base.runs import ADAPTER_WEIGHTS

        return self.config.keep == "best" and self.state.best["step"] is not None \
            and (self.out / BEST / ADAPTER_WEIGHTS).exists()

    def finish(self) -> dict:
        """Check the weights, then save the adapter, tokenizer, curves and run.json (last: its presence
        marks a complete run). Returns the run summary."""
        import shutil

        from tinymath.base.files import permissions_as_umask_allows, write_json, write_text
        from tinymath.base.runs import ADAPTER_WEIGHTS, MODEL_CARD, model_card
        from tinymath.lib.curves import plot_curves

        self._check_weights_finite(self.plan.total_steps)
        summary = self.summary()
        self.accelerator.wait_for_everyone()
        if self.is_main:
            run = {**asdict(self.config), "out": str(self.final.absolute()), **self.data_settings,
                   "dtype": str(self.dtype).removeprefix("torch."), "base_fingerprint": self.fingerprint,
                   "data_stats": self.data_stats, "versions": _versions(), "git_commit": _git_commit(),
                   "num_processes": self.plan.world, "memory_plan": self.plan.memory_plan, "result": summary}
            self.model.save_pretrained(str(self.out))
            if self._ships_best():
                shutil.copy(self.out / BEST / ADAPTER_WEIGHTS, self.out / ADAPTER_WEIGHTS)
            self.tokenizer.save_pretrained(str(self.out))
            plot_curves(self.out)
            write_text(self.out / MODEL_CARD, model_card(run))  # PEFT's own is a template of blanks
            write_json(self.out / RUN_FILE, run)
            permissions_as_umask_allows(self.out)
        self.accelerator.wait_for_everyone()
        return summary


def step_counts(examples: int, config: TrainConfig, world: int) -> tuple[int, int, int]:
    """(examples per optimizer step over all processes, steps per epoch, the run's steps): an
    epoch's last partial step is left out; ``--max-steps`` wins over ``--epochs``."""
    per_step = config.batch_size * config.grad_accum * world
    steps_per_epoch = max(1, examples // per_step)
    return per_step, steps_per_epoch, config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))


@contextmanager
def clear_library_errors():
    """Library failures that are the machine's, not a bug: one message with the fix."""
    import torch

    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        cause = exc.inner_exception
        first_line = (str(cause).splitlines() or [""])[0]
        raise TinymathError(f"torch.compile could not compile the model on this machine "
                            f"({type(cause).__name__}: {first_line}); train with --no-compile") from exc
    except torch.OutOfMemoryError:
        raise TinymathError("the GPU ran out of memory; pass --max-memory (e.g. 6GB) to size micro-batches, "
                            "--gradient-checkpointing, a smaller --batch-size or --max-length") from None


@lru_cache(maxsize=1)  # one shuffle per epoch
def _epoch_order(count: int, seed: int) -> list[int]:
    """The shuffled order of ``count`` examples for one epoch."""
    import random

    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def validation_accuracy(model, tokenizer, rows: list[dict], fmt: str, system_prompt: str | None,
                        calculator: bool = False, static_cache: bool | None = None) -> float:
    """GSM8K accuracy of ``model`` on held-out train-split rows (greedy, batched; ``calculator``:
    ``<<expr=`` completed by the calculator; ``static_cache``: as `GenerationSettings`)."""
    from tinymath.lib.generate import GenerationSettings, InferenceModel, generate_batch
    from tinymath.lib.scoring import default_prompts, score

    inference = InferenceModel(model, tokenizer, fmt, system_prompt, {})
    prompts = default_prompts(tokenizer, rows, fmt, system_prompt)
    settings = GenerationSettings(max_new_tokens=256, calculator=calculator, static_cache=static_cache)
    completions = [text for text, _ in generate_batch(inference, prompts, settings)]
    return score(completions, [r["answer"] for r in rows])["summary"]["accuracy"]


def _versions() -> dict:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("tinymath", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
