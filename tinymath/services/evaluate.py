"""eval: GSM8K accuracy of a model or a training run, with the shared answer contract; and the
paired comparison of two evaluations (``eval --compare``).

Writes ``predictions.jsonl`` (question, gold, completion, extracted, correct) and ``summary.json``
(accuracy flexible and strict, n, invalid-answer rate, Wilson 95% interval, tokens, time, settings).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tinymath.base.errors import TinymathError, choice, raise_if_problems
from tinymath.base.runs import PREDICTIONS, SUMMARY
from tinymath.lib.scoring import PROTOCOLS


def _check_options(limit, protocol, samples, temperature) -> None:
    problems = choice("--protocol", protocol, PROTOCOLS)
    if limit is not None and limit <= 0:
        problems.append(f"--limit {limit} must be a positive number of problems")
    if samples < 1:
        problems.append(f"--samples {samples} must be at least 1")
    if samples > 1 and not temperature:
        problems.append(f"--samples {samples} needs sampling: add --temperature, e.g. 0.7")
    if samples > 1 and protocol != "default":
        problems.append(f"--samples {samples} scores the majority answer with tinymath's own extraction; "
                        f"--protocol {protocol} scores one greedy answer (drop one of them)")
    raise_if_problems(problems)


def evaluate(model: str | None = None, adapter: str | None = None, data: str | None = None,
             split: str = "test", limit: int | None = None, out: str | Path | None = None,
             batch_size: int | None = None, max_new_tokens: int = 256, quant: str = "none", fmt: str | None = None,
             system_prompt: str | None = None, merge_base: str = "dequantized", overwrite: bool = False,
             trust_remote_code: bool = False, show_progress: bool = False, calculator: bool | None = None,
             samples: int = 1, temperature: float | None = None, seed: int = 0,
             protocol: str = "default", compile: bool | None = None, compile_steps: bool = False) -> dict:
    """Evaluate on ``split`` of ``data``; returns the summary (also written to ``OUT/summary.json``).

    ``data`` None: an ``adapter`` run's own data where this machine holds its ``split``, else the
    hub's GSM8K (`tinymath.lib.gsm8k.default_eval_data`).

    ``protocol="lm-eval-gsm8k"`` reproduces lm-eval's gsm8k task (5-shot, plain text, its stop
    strings and filters); ``samples=K`` with ``temperature>0`` scores the majority answer (maj@K).
    ``compile``: fast decoding with a static KV cache (`tinymath.lib.decode`; compiled ``generate`` for
    stop strings); None: on a GPU when there is enough work.
    ``compile_steps``: tinymath's decode loop with each step compiled first (a compile per batch shape,
    then faster steps, most at fewer rows: several GPUs sharing an evaluation).
    ``calculator`` None: as the model was trained (a GRPO ``--calculator`` run answers with it).
    """
    import torch

    from tinymath.base.config import absolute_paths
    from tinymath.base.progress import progress_bar
    from tinymath.lib.decode import totals as decode_totals
    from tinymath.lib.distributed import checked_together, process_share, process_state
    from tinymath.lib.generate import (
        GenerationSettings,
        check_compile_steps,
        generate_across_processes,
        load_for_inference,
    )
    from tinymath.lib.gsm8k import read_gsm8k
    from tinymath.lib.speed import compile_seconds

    _check_options(limit, protocol, samples, temperature)  # the command line: the same on every process
    chosen = PROTOCOLS[protocol]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature or 0.0,
                                  calculator=bool(calculator), stop=chosen.stop, static_cache=compile,
                                  compile_steps=compile_steps)

    state = process_state()  # every process joins before its own checks, so none stops alone
    data, rows = _read_alike(state, lambda: _checked_rows(settings, out, overwrite, model, adapter, data, split,
                                                          limit, raw_only=chosen.own_format))
    loading = time.time()
    inference = load_for_inference(model, adapter, quant, fmt, system_prompt, merge_base, trust_remote_code)
    load_seconds = time.time() - loading
    settings.calculator = inference.uses_calculator(calculator)
    checked_together(state, lambda: check_compile_steps(settings, inference.model, model or adapter))
    prompts = chosen.prompts(inference.tokenizer, rows, inference.format, inference.system_prompt,
                             lambda: read_gsm8k(data, "train"), split)

    flat = [p for p in prompts for _ in range(samples)]
    torch.manual_seed(seed + state.process_index)
    decoded_before, compiled_before = decode_totals(), compile_seconds()
    start = time.time()
    share = len(process_share(len(flat)))
    with progress_bar("evaluating", share, show_progress and state.is_main_process) as update:
        generated = generate_across_processes(inference, flat, settings, _saying_compiling(update, inference, settings,
                                                                                          share))
    seconds = time.time() - start
    decoding = {k: v - decoded_before[k] for k, v in decode_totals().items()}
    scored, outputs = _score(chosen, [text for text, _ in generated], [r["answer"] for r in rows], samples)
    tokens = sum(n for _, n in generated)
    summary = dict(scored["summary"])
    summary.update(
        tokens_generated=tokens, load_seconds=round(load_seconds, 3), generation_seconds=round(seconds, 3),
        tokens_per_s=round(tokens / seconds, 1) if seconds else None,
        compile_seconds=round(compile_seconds() - compiled_before, 3),
        graph_capture_seconds=round(decoding.pop("capture_seconds"), 3), decoding=decoding,
        settings=absolute_paths({  # one data file is all its problems, whatever --split says
            "data": data, "split": None if Path(data).expanduser().is_file() else split, "limit": limit,
            "format": None if chosen.own_format else inference.format,  # a protocol's own prompts use neither
            "system_prompt": None if chosen.own_format else inference.system_prompt, "batch_size": batch_size,
            "max_new_tokens": max_new_tokens, "protocol": protocol, "calculator": settings.calculator,
            "samples": samples, "temperature": temperature, "seed": seed, "compile": compile, "compile_steps": compile_steps,
            "processes": state.num_processes, **inference.source}))
    if out is not None and state.is_main_process:
        _write_eval(out, rows, outputs, scored["rows"], summary)
    return summary


def _read_alike(state, check) -> tuple[str, list[dict]]:
    """``check()``'s data and problems, read by every process from its own machine's files: all stop if
    one refused (`checked_together`), or if they read different problems (a path holding other files,
    or a default data folder, on another machine)."""
    import hashlib

    from tinymath.lib.distributed import checked_alike, checked_together

    data, rows = checked_together(state, check)
    digest = hashlib.sha256(json.dumps([(r["question"], r["answer"]) for r in rows]).encode()).hexdigest()
    checked_alike(state, digest, f"the processes of this launch read different problems ({len(rows)} from {data} "
                  "here): each machine reads its own files; give --data that holds the same GSM8K on every machine")
    return data, rows


def _checked_rows(settings, out, overwrite: bool, model: str | None, adapter: str | None, data: str | None,
                  split: str, limit: int | None, raw_only: bool = False) -> tuple[str, list[dict]]:
    """The data read (``data``, or where None the default: raw files only for ``raw_only``, a protocol
    whose few-shot examples come from the whole train split) and the problems to answer, after the
    checks of what one machine of several may see otherwise: its files (the output folder, the
    model, the run and its base, the data)."""
    from tinymath.base.files import check_output_dir
    from tinymath.base.runs import load_run
    from tinymath.lib.generate import check_model_choice
    from tinymath.lib.gsm8k import default_eval_data, read_gsm8k
    from tinymath.lib.lora import check_base_present

    settings.validate()
    check_model_choice(model, adapter)
    if out is not None:
        check_output_dir(out, overwrite, marker=SUMMARY)
    run = load_run(adapter) if adapter is not None else None  # a wrong run folder: named before any data is read
    if run is not None:
        check_base_present(run)
    if data is None:  # the run's own GSM8K files where this machine has them (offline too), else the hub's
        data = default_eval_data(run, split, raw_only)
    return data, read_gsm8k(data, split, limit)


def _saying_compiling(update, inference, settings, prompts: int):
    """The progress update, first naming the compiling that decoding starts with (so a bar at 0
    does not look stuck), then back to plain "evaluating" once answers come."""
    from tinymath.lib.generate import compiles, use_static_cache

    device = next(inference.model.parameters()).device.type
    if not use_static_cache(settings, device, prompts) or not (settings.compile_steps
                                                               or compiles(inference.model, settings)):
        return update
    update(advance=0, description="evaluating (compiling the decoder first: faster the next time on this machine)")

    def advance(n=1, **values):
        update(advance=n, description="evaluating", **values)

    return advance


def _score(protocol, completions: list[str], golds: list[str], samples: int) -> tuple[dict, list[dict]]:
    """The scored rows and summary, and what each problem's prediction line shows."""
    from tinymath.lib.scoring import self_consistency

    if samples > 1:
        grouped = [completions[i * samples:(i + 1) * samples] for i in range(len(golds))]
        return self_consistency(grouped, golds), [{"completions": g} for g in grouped]
    return protocol.score(completions, golds), [{"completion": c} for c in completions]


def _write_eval(out, rows: list[dict], outputs: list[dict], scored: list[dict], summary: dict) -> None:
    from tinymath.base.files import atomic_output_dir, write_json

    with atomic_output_dir(out) as tmp:
        with open(tmp / PREDICTIONS, "w", encoding="utf-8") as f:
            for row, output, s in zip(rows, outputs, scored):
                f.write(json.dumps({"question": row["question"], "gold": row["answer"], **output, **s}) + "\n")
        write_json(tmp / SUMMARY, summary)


def _read_predictions(folder: Path) -> list[dict]:
    from tinymath.base.files import read_jsonl

    path = folder / PREDICTIONS
    if not folder.exists():
        raise TinymathError(f"--compare {folder} does not exist")
    if not path.is_file() or not (folder / SUMMARY).is_file():
        raise TinymathError(f"--compare {folder}: not a `tinymath eval --out` folder (no {PREDICTIONS})")
    rows = read_jsonl(path)
    if not rows:
        raise TinymathError(f"--compare {folder}: {PREDICTIONS} is empty")
    broken = next((i for i, r in enumerate(rows, 1) if not isinstance(r.get("question"), str)
                   or not isinstance(r.get("correct"), bool)), None)
    if broken:
        raise TinymathError(f"--compare {path}, line {broken}: not a prediction (needs question and correct)")
    return rows


def compare(first: str | Path, second: str | Path) -> dict:
    """Paired comparison of two eval outputs on the same problems: both accuracies, the difference
    with a 95% interval, McNemar's exact test, and the problems that flipped each way."""
    from tinymath.base.files import read_json_object
    from tinymath.lib.scoring import paired_comparison

    a, b = (_read_predictions(Path(folder)) for folder in (first, second))
    if [r["question"] for r in a] != [r["question"] for r in b]:
        raise TinymathError(f"--compare: {first} and {second} scored different problems (or in another order); "
                            "evaluate both on the same --data, --split and --limit")
    result = paired_comparison([r["correct"] for r in a], [r["correct"] for r in b])
    only_a, only_b = result.pop("only_a"), result.pop("only_b")
    settings = [read_json_object(Path(folder) / SUMMARY).get("settings") or {} for folder in (first, second)]
    return {**result, "only_a_correct": [a[i]["question"] for i in only_a],
            "only_b_correct": [b[i]["question"] for i in only_b], "a": str(first), "b": str(second),
            "summary_a": settings[0], "summary_b": settings[1],
            "settings_differ": _settings_differ(*settings)}


# how the answers were asked for and scored, with what an evaluation that does not record one did
# (lm-evaluation-harness: its own protocol and prompt); two that differ here measure these too
COMPARED_SETTINGS = {"backend": "tinymath", "protocol": "lm-eval-gsm8k", "format": None, "system_prompt": None,
                     "max_new_tokens": None, "calculator": False, "samples": 1, "temperature": 0.0}


def _settings_differ(a: dict, b: dict) -> dict:
    """The `COMPARED_SETTINGS` two evaluations' settings differ in: ``{name: [a's, b's]}``."""
    def value(settings, key):
        shown = settings.get(key, COMPARED_SETTINGS[key])
        return COMPARED_SETTINGS[key] if shown is None and key == "temperature" else shown  # None: greedy

    def own_prompt(settings):  # lm-eval's prompt: the format and system prompt recorded were not applied
        return settings.get("backend") == "lm-eval" or settings.get("protocol") == "lm-eval-gsm8k"

    skipped = {"format", "system_prompt"} if own_prompt(a) or own_prompt(b) else set()
    return {key: [value(a, key), value(b, key)] for key in COMPARED_SETTINGS
            if key not in skipped and value(a, key) != value(b, key)}
