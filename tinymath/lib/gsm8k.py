"""GSM8K as data: reading it (hub or local files; a run's own, where this machine has it),
tokenizing it with a prompt format, the answer-only loss mask and a learned EOS, and reading a
prepare-data folder back.

Sources: a hub id (``openai/gsm8k``), a folder holding ``train.jsonl`` / ``test.jsonl`` (the
original GSM8K layout), or a single ``.jsonl`` / ``.json`` / ``.parquet`` file (read as whichever
split is asked for; prepare-data makes it the train split only). Every row needs ``question`` and
``answer``; a bad row is reported by file and line.

Output folder: ``train/``, ``validation/`` (with ``--val-size``), ``test/`` (datasets
``save_to_disk``; columns question, answer, input_ids, labels) and ``prepare.json`` (settings,
counts and token-length statistics).
"""

from __future__ import annotations

import random
from pathlib import Path

from tinymath.base.config import DEFAULT_DATA, INIT_KEYS, check_local_source, val_size_problems
from tinymath.base.errors import TinymathError, choice, raise_if_problems
from tinymath.base.files import (DATA_SUFFIXES, read_json, read_json_object, read_jsonl,
                                  split_file)
from tinymath.base.prompts import CALC_ANNOTATIONS, FORMATS, extract_answer
from tinymath.base.runs import MANIFEST

SPLITS = ("train", "validation", "test")  # GSM8K's (train, test) and the validation prepare-data holds out
HUB_SPLITS = ("train", "test")

# ---------------------------------------------------------------- reading


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = read_jsonl(path, where="_where")
    elif path.suffix == ".json":
        loaded = read_json(path)
        if not isinstance(loaded, list):
            raise TinymathError(f"{path}: expected a JSON list of objects with question and answer")
        rows = [dict(row, _where=f"{path}, item {i}") if isinstance(row, dict) else {"_where": f"{path}, item {i}"}
                for i, row in enumerate(loaded, start=1)]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise TinymathError(f"{path}: not a readable parquet file ({exc})") from None
        rows = [dict(row, _where=f"{path}, row {i}") for i, row in enumerate(rows, start=1)]
    else:
        raise TinymathError(f"--data {path}: unsupported file type; use {', '.join(DATA_SUFFIXES)}")
    if not rows:
        raise TinymathError(f"--data {path} is empty")
    return rows


def _check_rows(rows: list[dict]) -> list[dict]:
    problems = []
    for row in rows:
        for key in ("question", "answer"):
            value = row.get(key)
            if value is None or isinstance(value, str) and not value.strip():
                problems.append(f"{row.get('_where', 'a row')}: missing {key!r}")
            elif not isinstance(value, str):
                problems.append(f"{row.get('_where', 'a row')}: {key!r} is not text ({type(value).__name__})")
        if isinstance(row.get("answer"), str) and extract_answer(row["answer"], strict=True) is None:
            problems.append(f"{row.get('_where', 'a row')}: the answer does not end in '#### N' (GSM8K's final "
                            "answer marker), so it cannot be scored")
        if len(problems) >= 5:
            break
    raise_if_problems(problems)
    return [{"question": row["question"], "answer": row["answer"]} for row in rows]


def local_split_file(data: str, split: str) -> Path | None:
    """The local file holding ``split`` of ``data``, or None if ``data`` is not a local path."""
    path = Path(data).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        own = split_file(path, split)
        if own:
            return own
        found = sorted(p.name for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
        raise TinymathError(f"--data {data} has no {split}.jsonl (found: {', '.join(found) or 'no data files'})")
    check_local_source("--data", data, DATA_SUFFIXES)
    return None


def available_splits(data: str) -> list[str]:
    """The GSM8K splits prepare-data makes of a source: a folder's train, test and (if it has its own
    file) validation, or the hub's train and test; a
    single file is training data only (as its test split too, it would score the model on the
    problems it trained on)."""
    path = Path(data).expanduser()
    if path.is_dir() and (path / MANIFEST).exists():
        raise TinymathError(f"--data {data} is already a prepare-data output; give the raw GSM8K files")
    if path.is_dir():  # a folder's own validation file, if it has one, is its validation split
        return [s for s in SPLITS if split_file(path, s)]
    if path.is_file():
        return ["train"]
    check_local_source("--data", data, DATA_SUFFIXES)  # a path that is not there: named before the hub is asked
    return _hub_splits(data)


def _hub_splits(data: str) -> list[str]:
    """The train and test splits a hub dataset has (GSM8K has both; a dataset of one's own may have
    only train); both when the hub cannot say, so that loading reports why."""
    import datasets

    from tinymath.lib.hub import offline_unless_reachable

    offline_unless_reachable()
    try:
        names = datasets.get_dataset_split_names(data, _hub_config(data))
    except Exception:  # unreachable, unknown: the load that follows says what went wrong
        return ["train", "test"]
    return [s for s in ("train", "test") if s in names] or ["train", "test"]


def _hub_config(data: str) -> str | None:
    """GSM8K's hub datasets keep the problems in their "main" configuration."""
    return "main" if data.rstrip("/").endswith("gsm8k") else None


def read_gsm8k(data: str = DEFAULT_DATA, split: str = "train", limit: int | None = None) -> list[dict]:
    """Rows ``{"question", "answer"}`` of one split of a GSM8K source (hub id, folder, or file)."""
    if Path(data).expanduser().is_dir() and (Path(data).expanduser() / MANIFEST).exists():
        prepared = load_prepared(data)[0]
        if split not in prepared:
            raise TinymathError(f"--data {data} has no {split} split (has {', '.join(prepared)})")
        rows = [{"question": q, "answer": a} for q, a in zip(prepared[split]["question"], prepared[split]["answer"])]
        return rows[:limit] if limit else rows
    local = local_split_file(data, split)
    if local is not None:
        rows = _check_rows(_read_file(local))
    else:
        rows = _read_hub(data, split)
    return rows[:limit] if limit else rows


def default_eval_data(run, split: str, raw_only: bool = False) -> str:
    """What eval reads without --data: the GSM8K of ``run`` (a `RunInfo`, or None) where this machine
    holds ``split`` of it (`run_data_here`), else the hub's; a split the hub's GSM8K does not have
    is refused rather than asked of the hub."""
    here = run_data_here(run, split, raw_only)
    if here is not None:
        return here
    if split not in HUB_SPLITS:
        raise TinymathError(f"--split {split}: the hub's GSM8K has the splits {' and '.join(HUB_SPLITS)}; give --data "
                            "for another (a prepare-data folder holds the validation split it was made with)")
    return DEFAULT_DATA


def run_data_here(run, split: str, raw_only: bool = False) -> str | None:
    """Where this machine holds ``split`` of the GSM8K that ``run`` (a `RunInfo`, or None) was trained
    on: the raw folder it read, or the one its prepare-data folder was made from (the split whole, as
    published), else, unless ``raw_only``, that prepare-data folder if it holds the whole split (not
    made with --limit); None where none holds it (hub data, a single file of training data, a folder
    moved away)."""
    data = run.config.get("data") if run is not None else None
    if not isinstance(data, str) or not Path(data).expanduser().is_dir():
        return None
    if not is_prepared(data):
        return data if split_file(data, split) else None
    try:
        manifest = read_json_object(Path(data).expanduser() / MANIFEST)
    except TinymathError:  # a damaged manifest: not a source to offer
        return None
    raw = manifest.get("data")
    if isinstance(raw, str) and Path(raw).expanduser().is_dir() and split_file(raw, split):
        return raw
    whole = manifest.get("limit") is None and split in (manifest.get("splits") or {})
    return data if whole and not raw_only else None


def _read_hub(data: str, split: str) -> list[dict]:
    import datasets

    from tinymath.lib.hub import offline_unless_reachable, unreachable_hint

    offline_unless_reachable()
    try:
        ds = datasets.load_dataset(data, _hub_config(data), split=split)
    except Exception as exc:  # network, missing dataset, missing split: all user-facing
        raise TinymathError(f"could not load --data {data} (split {split}) from the Hugging Face hub: {exc}"
                            f"{unreachable_hint()}; for GSM8K on this machine, give --data PATH: a folder with "
                            f"{split}.jsonl, or a prepare-data output") from None
    missing = {"question", "answer"} - set(ds.column_names)
    if missing:
        raise TinymathError(f"--data {data} lacks column(s) {', '.join(sorted(missing))}")
    return _check_rows([{"question": q, "answer": a, "_where": f"--data {data} ({split}), row {i + 1}"}
                        for i, (q, a) in enumerate(zip(ds["question"], ds["answer"]))])


# ---------------------------------------------------------------- preparing


def _length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"mean": 0, "p95": 0, "max": 0}
    import math

    ordered = sorted(lengths)  # p95 by nearest rank: the smallest length at or above 95% of them
    return {"mean": round(sum(ordered) / len(ordered), 1), "p95": ordered[math.ceil(0.95 * len(ordered)) - 1],
            "max": ordered[-1]}


def train_and_validation(data: str, val_size: float, seed: int = 0, limit: int | None = None) -> dict[str, list[dict]]:
    """The train rows and, if any, the validation rows: a data folder's own validation file, or
    ``val_size`` held out of train (`split_validation`); not both."""
    own = split_file(data, "validation") if Path(data).expanduser().is_dir() else None
    if own is None:
        return split_validation(read_gsm8k(data, "train", limit), val_size, seed)
    if val_size:
        raise TinymathError(f"--data {data} has its own validation split ({own.name}); drop --val-size, or "
                            "remove that file to hold problems out of train instead")
    return {"train": read_gsm8k(data, "train", limit), "validation": read_gsm8k(data, "validation", limit)}


def split_validation(rows: list[dict], val_size: float, seed: int = 0) -> dict[str, list[dict]]:
    """``{"train": ..., "validation": ...}``: a seeded random ``val_size`` (count, or fraction < 1)
    held out from train; just ``{"train": rows}`` when ``val_size`` is 0."""
    if not val_size:
        return {"train": rows}
    n_val = int(val_size) if val_size >= 1 else int(round(val_size * len(rows)))
    if not 0 < n_val < len(rows):
        raise TinymathError(f"--val-size {val_size} leaves no train or no validation examples (train has {len(rows)})")
    chosen = set(random.Random(seed).sample(range(len(rows)), n_val))
    return {"train": [r for i, r in enumerate(rows) if i not in chosen],
            "validation": [r for i, r in enumerate(rows) if i in chosen]}


def validate_prepare_options(fmt: str, max_length: int, calc_annotations: str, val_size: float,
                             limit: int | None) -> None:
    import math

    if isinstance(val_size, float) and not math.isfinite(val_size):
        raise TinymathError(f"--val-size {val_size} must be a finite number")
    problems = choice("--format", fmt, FORMATS) + choice("--calc-annotations", calc_annotations, CALC_ANNOTATIONS)
    if max_length < 16:
        problems.append(f"--max-length {max_length} is too small; use at least 16 (GSM8K needs ~400)")
    problems += val_size_problems(val_size)
    if limit is not None and limit <= 0:
        problems.append(f"--limit {limit} must be a positive number of examples")
    raise_if_problems(problems)


def tokenize_split(rows: list[dict], tokenizer, fmt: str, system_prompt: str | None, max_length: int,
                   calc_annotations: str, update=lambda advance=1: None,
                   keep_every_row: bool = False) -> tuple[dict, dict]:
    """Tokenize rows into columns (question, answer, input_ids, labels) and their statistics. A row
    whose prompt alone fills ``max_length`` teaches nothing and is dropped, unless ``keep_every_row``
    (a test split: evaluation asks every question, whatever its length)."""
    from tinymath.base.prompts import encode_example

    columns = {"question": [], "answer": [], "input_ids": [], "labels": []}
    lengths, truncated, dropped = [], 0, 0
    for row in rows:
        example = encode_example(tokenizer, row["question"], row["answer"], fmt, system_prompt, max_length,
                                 calc_annotations)
        update()
        if all(label == -100 for label in example["labels"]) and not keep_every_row:
            dropped += 1  # the prompt alone fills --max-length: nothing to learn from
            continue
        truncated += example["truncated"]
        for key in ("input_ids", "labels"):
            columns[key].append(example[key])
        columns["question"].append(row["question"])
        columns["answer"].append(row["answer"])
        lengths.append(len(example["input_ids"]))
    stats = {"examples": len(lengths), "truncated": truncated, "dropped_too_long": dropped,
             "tokens": sum(lengths), "length": _length_stats(lengths)}
    return columns, stats


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a prepare-data output (its manifest is there)."""
    return (Path(path).expanduser() / MANIFEST).exists()


def load_prepared(path: str | Path):
    """The saved DatasetDict of a prepare-data folder and its manifest."""
    import datasets

    path = Path(path)
    if not is_prepared(path):
        raise TinymathError(f"{path} is not a prepare-data output (no {MANIFEST})")
    manifest = read_json_object(path / MANIFEST, "a prepare-data manifest")
    try:
        return datasets.load_from_disk(str(path)), manifest
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise TinymathError(f"--data {path}: the prepared data cannot be read ({exc}); run prepare-data again") from None


# ---------------------------------------------------------------- training data

DATA_SETTINGS = {"format": "chat", "max_length": 512, "calc_annotations": "keep"}  # raw data's defaults


def load_training_data(config, tokenizer) -> tuple[dict[str, list[dict]], dict, dict]:
    """Tokenized train (and validation) examples for a `TrainConfig`: a prepare-data folder, or raw
    data prepared now. Returns (splits, their statistics, the data settings in force: format,
    system prompt, max length, annotations), the config itself left as it was."""
    if not is_prepared(config.data):
        settings = {key: getattr(config, key) or default for key, default in DATA_SETTINGS.items()}
        settings["system_prompt"] = config.system_prompt
        validate_prepare_options(settings["format"], settings["max_length"], settings["calc_annotations"],
                                 config.val_size, None)
        raw = train_and_validation(config.data, config.val_size)
        splits, stats = {}, {}
        for name, split_rows in raw.items():
            columns, stats[name] = tokenize_split(split_rows, tokenizer, settings["format"], settings["system_prompt"],
                                                  settings["max_length"], settings["calc_annotations"])
            splits[name] = _examples(columns)
        return splits, stats, settings
    dataset, manifest = load_prepared(config.data)
    settings = {key: manifest.get(key) for key in ("format", "system_prompt", "max_length", "calc_annotations")}
    for key, saved in settings.items():
        given = getattr(config, key)
        if given is not None and given != saved and getattr(config, "init_adapter", None) and key in INIT_KEYS:
            raise TinymathError(f"--data {config.data} was prepared with {key} {saved}, but --init-adapter "
                                f"{config.init_adapter} was trained with {given}; prepare the data as that run's was")
        if given is not None and given != saved:
            raise TinymathError(f"--{key.replace('_', '-')} {given} contradicts the prepared data "
                                f"({saved}); re-run prepare-data or drop the flag")
    if manifest.get("eos_token") != tokenizer.eos_token or manifest.get("vocab_size", len(tokenizer)) != len(tokenizer):
        raise TinymathError(f"--data {config.data} was tokenized for {manifest.get('model')}, "
                            f"not for --model {config.model}; run prepare-data with this model")
    if "train" not in dataset:
        raise TinymathError(f"--data {config.data} has no train split (has {', '.join(dataset)})")
    splits = {name: _examples(dataset[name].to_dict()) for name in ("train", "validation") if name in dataset}
    return splits, manifest.get("splits", {}), settings


def _examples(columns: dict) -> list[dict]:
    """Tokenized columns (question, answer, input_ids, labels) as one dict per example."""
    keys = ("question", "answer", "input_ids", "labels")
    return [dict(zip(keys, values)) for values in zip(*(columns[k] for k in keys))]
