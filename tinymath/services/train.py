"""train: QLoRA fine-tuning (NF4 base via bitsandbytes + PEFT LoRA) into a run folder, by
supervised fine-tuning or by reinforcement learning (``--method``, `tinymath.lib.grpo.METHODS`).

The service checks the config and the output folder, claims the folder (`tinymath.base.runs`:
locked before anything in it is read or deleted; a run that replaces another trains beside it and
takes its place only when complete) and runs the method's phased recipe (`tinymath.lib.trainer`).
"""

from __future__ import annotations

from contextlib import ExitStack

from tinymath.base.config import TrainConfig
from tinymath.base.errors import TinymathError


def _check_reporter(config: TrainConfig) -> None:
    import importlib.util

    from tinymath.base.config import REPORTERS

    if config.report_to and importlib.util.find_spec(REPORTERS[config.report_to]) is None:
        module = REPORTERS[config.report_to]
        raise TinymathError(f"--report-to {config.report_to}: {module} is not installed (pip install {module})")


def train(config: TrainConfig, show_progress: bool = False, resume: bool = False) -> dict:
    """Fine-tune ``config.model`` on ``config.data`` into ``config.out``; returns the run summary.

    ``resume``: continue the run in ``config.out`` from its latest intact checkpoint.
    """
    from tinymath.base.files import check_writable, sigterm_as_interrupt
    from tinymath.base.runs import plan_train_output
    from tinymath.lib.checkpoint import check_resumable
    from tinymath.lib.distributed import checked_together, launched_together, peers_lost_as_error, process_state
    from tinymath.lib.grpo import METHODS

    def check():  # the settings, and what one machine of several may see otherwise: its files
        _check_settings(config)
        _check_machine(config)
        output = plan_train_output(config.out, config.overwrite, resume)  # reads only, on every process
        check_writable(output.live.absolute().parent, named=output.final)
        if resume and not output.live.is_dir():
            raise TinymathError(f"--resume {output.live}: no such run folder")
        if resume:
            check_resumable(output.live, output.final, joined.num_processes if joined else 1)
        return output

    # under a launcher every process joins before its own checks, so none stops alone
    joined = process_state() if launched_together() else None
    output = checked_together(joined, check)  # and every process has checked the folder before it changes
    state = joined or process_state()
    trainer = METHODS[config.method](config, output.live, show_progress, resume, final=output.final)
    try:
        with sigterm_as_interrupt(), peers_lost_as_error(state.num_processes), ExitStack() as held:
            # the main process claims the folder (and puts the result in place); the others learn
            # whether it could before they start, so none waits on a process that has stopped
            claimed = _claim(held, output, resume) if state.is_main_process else None
            _agree_on_claim(state, claimed)
            summary = trainer.setup().fit()
    finally:
        trainer.restore_process()  # a model built later in this process (an evaluation's, say) is plain
    return summary


def _check_settings(config: TrainConfig) -> None:
    """What the run and its dry run refuse in the settings alone (the same on every process)."""
    from tinymath.base.errors import choice, raise_if_problems
    from tinymath.lib.grpo import METHODS

    config.validate()
    raise_if_problems(choice("--method", config.method, METHODS))


def _check_machine(config: TrainConfig) -> None:
    """What the run and its dry run refuse on this machine before the weights are loaded: the
    tracker, fused kernels where they cannot run, the local sources, and LoRA layers the model lacks
    (from its config alone)."""
    from tinymath.lib.distributed import default_device
    from tinymath.lib.graphs import check_cuda_graphs_asked
    from tinymath.lib.lora import check_target_modules, target_module_names
    from tinymath.lib.model import model_skeleton
    from tinymath.lib.speed import check_fused_kernels_asked

    _check_reporter(config)
    check_fused_kernels_asked(config, default_device())
    check_cuda_graphs_asked(config, default_device())
    _check_sources(config)
    skeleton = model_skeleton(config.model, config.trust_remote_code) if config.target_modules != "all-linear" else None
    if skeleton is not None:  # else checked on the loaded model
        check_target_modules(skeleton, target_module_names(config.target_modules))


def _check_sources(config: TrainConfig) -> None:
    """A local --data or --model that does not exist, and local raw data that cannot be read (empty,
    malformed, no answers), named before anything is loaded: the tokenizer comes first, and for a
    hub id (the default model) that can mean a download."""
    from pathlib import Path

    from tinymath.base.config import check_local_source
    from tinymath.base.files import DATA_SUFFIXES, MODEL_SUFFIXES
    from tinymath.lib.gsm8k import is_prepared, train_and_validation

    check_local_source("--data", config.data, DATA_SUFFIXES)
    check_local_source("--model", config.model, MODEL_SUFFIXES)
    if Path(config.data).expanduser().exists() and not is_prepared(config.data):
        train_and_validation(config.data, config.val_size)  # read again, tokenized, once the tokenizer is loaded


def _claim(held: ExitStack, output, resume: bool) -> TinymathError | None:
    """Claim the run folder for the rest of ``held``; the refusal, if it could not."""
    from tinymath.base.runs import claimed_train_output

    try:
        held.enter_context(claimed_train_output(output, resume))
    except TinymathError as exc:
        return exc
    return None


def _agree_on_claim(state, refusal: TinymathError | None) -> None:
    """Raise the main process's refusal to claim the folder on every process (one process: its own)."""
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        said = [str(refusal) if refusal is not None else None]
        broadcast_object_list(said, from_process=0)
        if said[0] is not None and not state.is_main_process:
            raise TinymathError(f"the run's main process could not start it: {said[0]}")
    if refusal is not None:
        raise refusal


def dry_run_report(config: TrainConfig, resume: bool = False) -> dict:
    """The resolved config and what the data amounts to, without loading the model's weights; and
    (``out_refused``) why the real run would refuse its ``--out``, if it would."""
    from dataclasses import asdict

    from tinymath.base.runs import plan_train_output
    from tinymath.lib.batching import check_micro_batch_tokens, count_label_tokens
    from tinymath.lib.checkpoint import check_resumable
    from tinymath.lib.distributed import process_state
    from tinymath.lib.gsm8k import load_training_data
    from tinymath.lib.model import load_tokenizer
    from tinymath.lib.trainer import step_counts

    _check_settings(config)
    _check_machine(config)
    try:
        output = plan_train_output(config.out, config.overwrite, resume)
        if resume:
            check_resumable(output.live, output.final, process_state().num_processes)
        refused = None
    except TinymathError as exc:
        refused = str(exc)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    splits, _, settings = load_training_data(config, tokenizer)
    check_micro_batch_tokens(config, splits["train"])
    per_step, steps_per_epoch, total = step_counts(len(splits["train"]), config, process_state().num_processes)
    return {"config": {**asdict(config), **settings},
            "data": {name: {"examples": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows),
                            "answer_tokens": count_label_tokens(rows)} for name, rows in splits.items()},
            "steps_per_epoch": steps_per_epoch, "total_steps": total, "examples_per_step": per_step,
            "out_refused": refused}
