"""eval --backend lm-eval: lm-evaluation-harness's own ``gsm8k`` task (5-shot, its prompt, stop
strings and filters) on a model or a run, through the harness's Python API on the model tinymath
loaded (a run's adapter merged in memory), reading GSM8K from ``--data`` when it is a local folder
(the hub is not always there).

Writes the harness's own numbers into ``summary.json`` (``accuracy_strict``: its strict-match
filter, ``accuracy``: flexible-extract), its samples into ``samples.jsonl``, and one line per
problem into ``predictions.jsonl`` as tinymath's own eval does, so ``eval --compare`` pairs the
harness with tinymath's ``--protocol lm-eval-gsm8k`` problem by problem.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tinymath.base.config import absolute_paths
from tinymath.base.errors import TinymathError
from tinymath.base.runs import PREDICTIONS, SUMMARY

TASK = "gsm8k"
LOCAL_TASK = "tinymath_gsm8k"  # the harness's gsm8k task, reading local files


def _harness():
    try:
        import lm_eval
    except ImportError:
        raise TinymathError("--backend lm-eval needs lm-evaluation-harness: pip install lm-eval (the lm-eval extra)") from None
    return lm_eval


def _local_task(data: str, folder: Path) -> str:
    """The harness's own gsm8k task definition, pointed at local GSM8K files; returns its name
    (the plain ``gsm8k`` task, from the hub, when ``data`` is not local)."""
    import yaml

    from tinymath.lib.gsm8k import local_split_file

    test = local_split_file(data, "test")
    if test is None:
        return TASK
    lm_eval = _harness()
    spec = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    spec.pop("tag", None)
    spec.update(task=LOCAL_TASK, dataset_path="json", dataset_name=None,
                dataset_kwargs={"data_files": {"train": str(local_split_file(data, "train").absolute()),
                                               "test": str(test.absolute())}})
    (folder / f"{LOCAL_TASK}.yaml").write_text(yaml.safe_dump(spec))
    return LOCAL_TASK


def evaluate_with_lm_eval(model: str | None = None, adapter: str | None = None, data: str | None = None,
                          limit: int | None = None, out: str | Path | None = None, batch_size: int | None = None,
                          max_new_tokens: int = 256, merge_base: str = "dequantized", overwrite: bool = False,
                          trust_remote_code: bool = False) -> dict:
    """GSM8K test accuracy by lm-evaluation-harness's ``gsm8k`` task; returns the summary. ``data``
    None: the raw GSM8K files an ``adapter`` run was trained from, where this machine has them, else the hub's."""
    import tempfile
    from unittest import mock

    from tinymath.base.files import check_output_dir
    from tinymath.base.runs import load_run
    from tinymath.lib.generate import load_for_inference

    from tinymath.lib.gsm8k import default_eval_data, is_prepared

    run = load_run(adapter) if adapter is not None else None
    if data is None:  # the harness reads raw files only: a run's prepare-data folder is no source for it
        data = default_eval_data(run, "test", raw_only=True)
    if Path(data).expanduser().is_dir() and is_prepared(Path(data).expanduser()):
        raise TinymathError(f"--data {data} is a prepare-data output; lm-evaluation-harness reads raw GSM8K files: "
                            "give the folder with train.jsonl and test.jsonl (or leave --data out for the hub's)")
    lm_eval = _harness()
    if limit is not None and limit <= 0:
        raise TinymathError(f"--limit {limit} must be a positive number of problems")
    if out is not None:
        check_output_dir(out, overwrite, marker=SUMMARY)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    inference = load_for_inference(model, adapter, merge_base=merge_base, trust_remote_code=trust_remote_code)
    started = time.time()
    # The harness records the working folder's git commit (the user's, not tinymath's or the model's),
    # and outside a repository git prints "fatal: not a git repository" to the terminal: not asked.
    with tempfile.TemporaryDirectory() as folder, \
            mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None):
        task = _local_task(data, Path(folder))
        results = lm_eval.simple_evaluate(
            model=HFLM(pretrained=inference.model, tokenizer=inference.tokenizer, batch_size=batch_size or 16),
            tasks=[task], task_manager=TaskManager(include_path=folder), limit=limit, log_samples=True,
            gen_kwargs={"max_gen_toks": max_new_tokens})
    numbers, samples = results["results"][task], results["samples"][task]
    summary = {"accuracy": numbers["exact_match,flexible-extract"], "accuracy_strict": numbers["exact_match,strict-match"],
               "n": len({s["doc_id"] for s in samples}), "generation_seconds": round(time.time() - started, 3),
               "settings": absolute_paths({"backend": "lm-eval", "task": TASK, "lm_eval_version": _version(),
                                           "data": data, "limit": limit, "max_new_tokens": max_new_tokens,
                                           **inference.source})}
    if out is not None:
        _write(out, samples, summary)
    return summary


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm-eval")


def _write(out, samples: list[dict], summary: dict) -> None:
    from tinymath.base.files import atomic_output_dir, write_json

    with atomic_output_dir(out) as tmp:
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample, default=str) + "\n")
        strict = {s["doc_id"]: bool(s["exact_match"]) for s in samples if s.get("filter") == "strict-match"}
        with open(tmp / PREDICTIONS, "w", encoding="utf-8") as f:
            for sample in sorted((s for s in samples if s.get("filter") == "flexible-extract"), key=lambda s: s["doc_id"]):
                f.write(json.dumps({"question": sample["doc"]["question"], "gold": sample["doc"]["answer"],
                                    "completion": sample["resps"][0][0], "extracted": sample["filtered_resps"][0],
                                    "correct": bool(sample["exact_match"]),
                                    "correct_strict": strict.get(sample["doc_id"], False)}) + "\n")
        write_json(tmp / SUMMARY, summary)
