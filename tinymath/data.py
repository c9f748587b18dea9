"""prepare-data: read GSM8K (hub or local files), format it with a prompt format, tokenize it with
the answer-only loss mask and a learned EOS, and save it with a manifest.

Sources: a hub id (``openai/gsm8k``), a folder holding ``train.jsonl`` / ``test.jsonl`` (the
original GSM8K layout), or a single ``.jsonl`` / ``.json`` / ``.parquet`` file (treated as every
split). Every row needs ``question`` and ``answer``; a bad row is reported by file and line.

Output folder: ``train/``, ``validation/`` (with ``--val-size``), ``test/`` (datasets
``save_to_disk``; columns question, answer, input_ids, labels) and ``prepare.json`` (settings,
counts and token-length statistics).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tinymath.errors import TinymathError, raise_if_problems
from tinymath.prompts import FORMATS

DEFAULT_DATA = "openai/gsm8k"
DEFAULT_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
MANIFEST = "prepare.json"


# ---------------------------------------------------------------- reading


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TinymathError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise TinymathError(f"{path}, line {number}: expected a JSON object with question and answer")
            row["_where"] = f"{path}, line {number}"
            rows.append(row)
    return rows


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".json":
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TinymathError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(loaded, list):
            raise TinymathError(f"{path}: expected a JSON list of objects with question and answer")
        rows = [dict(row, _where=f"{path}, item {i}") if isinstance(row, dict) else {"_where": f"{path}, item {i}"}
                for i, row in enumerate(loaded)]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise TinymathError(f"{path}: not a readable parquet file ({exc})") from None
        rows = [dict(row, _where=f"{path}, row {i}") for i, row in enumerate(rows)]
    else:
        raise TinymathError(f"--data {path}: unsupported file type; use {', '.join(FILE_SUFFIXES)}")
    if not rows:
        raise TinymathError(f"--data {path} is empty")
    return rows


def _check_rows(rows: list[dict]) -> list[dict]:
    problems = []
    for row in rows:
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                problems.append(f"{row.get('_where', 'a row')}: missing {key!r}")
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
        for suffix in FILE_SUFFIXES:
            if (path / f"{split}{suffix}").exists():
                return path / f"{split}{suffix}"
        found = sorted(p.name for p in path.iterdir() if p.suffix in FILE_SUFFIXES)
        raise TinymathError(f"--data {data} has no {split}.jsonl (found: {', '.join(found) or 'no data files'})")
    if data.startswith((".", "/", "~")) or path.suffix in FILE_SUFFIXES or data.count("/") != 1:
        raise TinymathError(f"--data {data} does not exist")
    return None


def available_splits(data: str) -> list[str]:
    """The GSM8K splits a source has (a single file counts as every split)."""
    path = Path(data).expanduser()
    if path.is_dir() and (path / MANIFEST).exists():
        raise TinymathError(f"--data {data} is already a prepare-data output; give the raw GSM8K files")
    if path.is_dir():
        return [s for s in ("train", "test") if any((path / f"{s}{x}").exists() for x in FILE_SUFFIXES)]
    return ["train", "test"]


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


def _read_hub(data: str, split: str) -> list[dict]:
    import datasets

    try:
        name = "main" if data.rstrip("/").endswith("gsm8k") else None
        ds = datasets.load_dataset(data, name, split=split)
    except Exception as exc:  # network, missing dataset, missing split: all user-facing
        raise TinymathError(f"could not load --data {data} (split {split}) from the Hugging Face hub: {exc}") from None
    missing = {"question", "answer"} - set(ds.column_names)
    if missing:
        raise TinymathError(f"--data {data} lacks column(s) {', '.join(sorted(missing))}")
    return [{"question": q, "answer": a} for q, a in zip(ds["question"], ds["answer"])]


# ---------------------------------------------------------------- preparing


def _length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"mean": 0, "p95": 0, "max": 0}
    ordered = sorted(lengths)
    return {"mean": round(sum(ordered) / len(ordered), 1), "p95": ordered[int(0.95 * (len(ordered) - 1))],
            "max": ordered[-1]}


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
    problems = []
    if fmt not in FORMATS:
        problems.append(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if max_length < 16:
        problems.append(f"--max-length {max_length} is too small; use at least 16 (GSM8K needs ~400)")
    if calc_annotations not in ("strip", "keep"):
        problems.append(f"--calc-annotations {calc_annotations}: use strip or keep")
    if val_size < 0:
        problems.append(f"--val-size {val_size} must be >= 0 (a count, or a fraction below 1)")
    if limit is not None and limit <= 0:
        problems.append(f"--limit {limit} must be a positive number of examples")
    raise_if_problems(problems)


def tokenize_split(rows: list[dict], tokenizer, fmt: str, system_prompt: str | None, max_length: int,
                   calc_annotations: str, update=lambda advance=1: None) -> tuple[dict, dict]:
    """Tokenize rows into columns (question, answer, input_ids, labels) and their statistics."""
    from tinymath.prompts import encode_example

    columns = {"question": [], "answer": [], "input_ids": [], "labels": []}
    lengths, truncated, dropped = [], 0, 0
    for row in rows:
        example = encode_example(tokenizer, row["question"], row["answer"], fmt, system_prompt, max_length,
                                 calc_annotations)
        update()
        if all(label == -100 for label in example["labels"]):
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


def prepare_data(data: str = DEFAULT_DATA, model: str = DEFAULT_MODEL, out: str | Path = "prep",
                 fmt: str = "chat", system_prompt: str | None = None, max_length: int = 512,
                 calc_annotations: str = "keep", val_size: float = 0, limit: int | None = None,
                 seed: int = 0, overwrite: bool = False, trust_remote_code: bool = False,
                 show_progress: bool = False) -> dict:
    """Prepare GSM8K for training and return the manifest (also saved as ``OUT/prepare.json``).

    ``val_size`` takes a validation split from train: a count (>= 1) or a fraction (< 1).
    """
    import datasets

    from tinymath.files import atomic_output_dir, check_output_dir, write_json
    from tinymath.model import load_tokenizer
    from tinymath.progress import progress_bar

    validate_prepare_options(fmt, max_length, calc_annotations, val_size, limit)
    check_output_dir(out, overwrite, marker=MANIFEST)
    found = available_splits(data)
    if not found:
        raise TinymathError(f"--data {data} has no train.jsonl or test.jsonl (nor .json/.parquet); "
                            "give the GSM8K folder or one data file")
    splits = {split: read_gsm8k(data, split, limit) for split in found}
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)

    if "train" in splits:
        splits.update(split_validation(splits["train"], val_size, seed))

    prepared, stats = {}, {}
    total = sum(len(rows) for rows in splits.values())
    with progress_bar("tokenizing", total, enabled=show_progress) as update:
        for split, rows in splits.items():
            columns, stats[split] = tokenize_split(rows, tokenizer, fmt, system_prompt, max_length,
                                                   calc_annotations, update)
            prepared[split] = datasets.Dataset.from_dict(columns)

    manifest = {
        "data": data, "model": model, "format": fmt, "system_prompt": system_prompt,
        "max_length": max_length, "calc_annotations": calc_annotations, "val_size": val_size,
        "limit": limit, "seed": seed, "eos_token": tokenizer.eos_token, "vocab_size": len(tokenizer),
        "splits": stats,
    }
    with atomic_output_dir(out) as tmp:
        datasets.DatasetDict(prepared).save_to_disk(str(tmp))
        write_json(tmp / MANIFEST, manifest)
    return manifest


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).exists()


def load_prepared(path: str | Path):
    """The saved DatasetDict of a prepare-data folder and its manifest."""
    import datasets

    from tinymath.files import read_json

    path = Path(path)
    if not is_prepared(path):
        raise TinymathError(f"{path} is not a prepare-data output (no {MANIFEST})")
    return datasets.load_from_disk(str(path)), read_json(path / MANIFEST)
