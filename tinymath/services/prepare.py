"""prepare-data: GSM8K (hub or local files) formatted with a prompt format, tokenized with the
answer-only loss mask and a learned EOS, and saved with a manifest.

Output folder: ``train/``, ``validation/`` (with ``--val-size``), ``test/`` (datasets
``save_to_disk``; columns question, answer, input_ids, labels) and ``prepare.json`` (settings,
counts and token-length statistics).
"""

from __future__ import annotations

from pathlib import Path

from tinymath.base.config import DEFAULT_DATA, DEFAULT_MODEL
from tinymath.base.errors import TinymathError
from tinymath.base.runs import MANIFEST
from tinymath.lib.gsm8k import (
    available_splits,
    read_gsm8k,
    tokenize_split,
    train_and_validation,
    validate_prepare_options,
)


def prepare_data(data: str = DEFAULT_DATA, model: str = DEFAULT_MODEL, out: str | Path = "prep",
                 fmt: str = "chat", system_prompt: str | None = None, max_length: int = 512,
                 calc_annotations: str = "keep", val_size: float = 0, limit: int | None = None,
                 seed: int = 0, overwrite: bool = False, trust_remote_code: bool = False,
                 show_progress: bool = False) -> dict:
    """Prepare GSM8K for training and return the manifest (also saved as ``OUT/prepare.json``).

    ``val_size`` takes a validation split from train: a count (>= 1) or a fraction (< 1).
    """
    import datasets

    from tinymath.base.config import absolute_paths
    from tinymath.base.files import atomic_output_dir, check_output_dir, write_json
    from tinymath.base.progress import progress_bar
    from tinymath.lib.model import load_tokenizer

    validate_prepare_options(fmt, max_length, calc_annotations, val_size, limit)
    found = available_splits(data)  # the input first: a wrong --data is named before the --out it would fill
    if not found:
        raise TinymathError(f"--data {data} has no train.jsonl or test.jsonl (nor .json/.parquet); "
                            "give the GSM8K folder or one data file")
    if val_size and "train" not in found:
        raise TinymathError(f"--val-size holds problems out of the train split, and --data {data} has none "
                            f"(only {', '.join(found)}); drop --val-size or add train.jsonl")
    check_output_dir(out, overwrite, marker=MANIFEST)
    splits = train_and_validation(data, val_size, seed, limit) if "train" in found else {}
    splits.update({split: read_gsm8k(data, split, limit) for split in found if split not in splits})
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)

    prepared, stats = {}, {}
    total = sum(len(rows) for rows in splits.values())
    with progress_bar("tokenizing", total, enabled=show_progress) as update:
        for split, rows in splits.items():
            columns, stats[split] = tokenize_split(rows, tokenizer, fmt, system_prompt, max_length,
                                                   calc_annotations, update, keep_every_row=split == "test")
            prepared[split] = datasets.Dataset.from_dict(columns)
    empty = [split for split, s in stats.items() if not s["examples"]]
    if empty:
        raise TinymathError(f"--max-length {max_length} leaves no examples in {', '.join(empty)}: every prompt "
                            "alone is that long; raise --max-length (GSM8K needs about 400)")

    manifest = {
        **absolute_paths({"data": data, "model": model}), "format": fmt, "system_prompt": system_prompt,
        "max_length": max_length, "calc_annotations": calc_annotations, "val_size": val_size,
        "limit": limit, "seed": seed, "eos_token": tokenizer.eos_token, "vocab_size": len(tokenizer),
        "splits": stats,
    }
    with atomic_output_dir(out) as tmp:
        datasets.DatasetDict(prepared).save_to_disk(str(tmp))
        write_json(tmp / MANIFEST, manifest)
    return manifest
