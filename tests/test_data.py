"""prepare-data: sources, splits, manifest, and bad input through the real CLI."""

import json

import pytest
from conftest import run_cli

from tinymath.lib.gsm8k import load_prepared, read_gsm8k


def test_prepare_folder_writes_splits_and_manifest(tiny_model, gsm8k_dir, tmp_path):
    out = tmp_path / "prep"
    result = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", out,
                     "--val-size", 2, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["splits"]["train"]["examples"] == 6
    assert manifest["splits"]["validation"]["examples"] == 2
    assert manifest["splits"]["test"]["examples"] == 3
    assert manifest["splits"]["train"]["length"]["max"] >= manifest["splits"]["train"]["length"]["p95"]
    for split in manifest["splits"].values():  # even for a few rows the 95th percentile is not below the mean
        assert split["length"]["p95"] >= split["length"]["mean"]
    dataset, saved = load_prepared(out)
    assert saved == manifest
    row = dataset["train"][0]
    assert len(row["input_ids"]) == len(row["labels"]) and row["labels"][0] == -100
    assert row["labels"][-1] == row["input_ids"][-1]  # EOS is a target


def test_single_file_and_limit(gsm8k_dir):
    rows = read_gsm8k(str(gsm8k_dir / "train.jsonl"), "test", limit=3)
    assert len(rows) == 3 and rows[0]["answer"].endswith("#### 12")


def test_a_single_file_is_prepared_as_training_data_only(tiny_model, gsm8k_dir, tmp_path):
    """Made its test split too, it would score a model on the problems it trained on."""
    out = tmp_path / "prep"
    result = run_cli("prepare-data", "--data", gsm8k_dir / "train.jsonl", "--model", tiny_model, "--out", out,
                     "--val-size", 2, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert sorted(manifest["splits"]) == ["train", "validation"]
    assert manifest["data"] == str((gsm8k_dir / "train.jsonl").absolute())  # works from any folder later


@pytest.mark.parametrize("command", ["prepare-data", "train"])
def test_a_val_size_that_is_neither_a_count_nor_a_fraction_is_refused(tiny_model, gsm8k_dir, tmp_path, command):
    result = run_cli(command, "--data", gsm8k_dir, "--model", tiny_model, "--out", tmp_path / "out", "--val-size", 1.5)
    assert result.exit_code == 1 and "--val-size 1.5 must be a whole count" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_parquet_and_json_files(tmp_path, gsm8k_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert read_gsm8k(str(tmp_path / "d.parquet")) == read_gsm8k(str(tmp_path / "d.json")) == rows


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "answer": "#### 1"}\n{not json\n', "line 2: not valid JSON"),
    ('{"question": "q"}\n', "line 1: missing 'answer'"),
    ("", "is empty"),
])
def test_bad_files_fail_cleanly(tiny_model, tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "prep"
    result = run_cli("prepare-data", "--data", bad, "--model", tiny_model, "--out", out)
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_bad_paths_and_flags(tiny_model, gsm8k_dir, tmp_path):
    result = run_cli("prepare-data", "--data", tmp_path / "missing.jsonl", "--model", tiny_model, "--out", tmp_path / "p")
    assert result.exit_code == 1 and "does not exist" in result.stderr
    result = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tmp_path / "nomodel", "--out", tmp_path / "p")
    assert result.exit_code == 1 and "nomodel does not exist" in result.stderr
    result = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", tmp_path / "p", "--limit", 0)
    assert result.exit_code == 1 and "--limit 0" in result.stderr
    assert not (tmp_path / "p").exists()


def test_a_bare_name_is_told_what_a_hub_id_looks_like(tiny_model, gsm8k_dir, tmp_path):
    """`--data gsm8k`: neither a path here nor a hub id (owner/name); for --model the example is a model."""
    for command, said in ((["prepare-data", "--data", "gsm8k", "--model", tiny_model], "--data gsm8k does not exist"
                           " here; a hub id looks like owner/name (e.g. openai/gsm8k)"),
                          (["eval", "--model", tiny_model, "--data", "gsm8k"], "(e.g. openai/gsm8k)"),
                          (["eval", "--model", "merged", "--data", gsm8k_dir], "--model merged does not exist here; "
                           "a hub id looks like owner/name (e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0)")):
        result = run_cli(*command, "--out", tmp_path / "out")
        assert result.exit_code == 1 and said in " ".join(result.stderr.split()), result.output
    result = run_cli("prepare-data", "--data", tmp_path / "gsm8k", "--model", tiny_model, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "hub id" not in result.stderr  # a path: no hub id was meant
    assert not (tmp_path / "out").exists()


def test_bad_data_is_named_before_an_existing_out(tiny_model, gsm8k_dir, tmp_path):
    """The input is checked first: a typo in --data is the mistake to fix, not the --out it would fill."""
    out = tmp_path / "prep"
    assert run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", out).exit_code == 0
    result = run_cli("prepare-data", "--data", "nope", "--model", tiny_model, "--out", out)
    assert result.exit_code == 1 and "--data nope does not exist" in result.stderr
    assert "--overwrite" not in result.stderr and (out / "prepare.json").is_file()


def test_refuses_to_overwrite_without_flag(tiny_model, gsm8k_dir, tmp_path):
    out = tmp_path / "prep"
    assert run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", out).exit_code == 0
    again = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", out)
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    assert run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", out,
                   "--overwrite").exit_code == 0


def test_top_level_help_has_examples_and_version_prints():
    import tinymath

    result = run_cli("--help")
    assert result.exit_code == 0
    assert "Examples" in result.output and "tinymath train --data prep --out run" in result.output
    assert "<bool>" not in result.output  # --help and --version are flags: they take no value
    for command in ("prepare-data", "train", "merge-adapters", "eval", "chat"):
        assert command in result.output
        shown = [line for line in run_cli(command, "--help").output.splitlines()
                 if line.startswith(("│ --json ", "│ --help "))]
        assert len(shown) == 2 and not any("<bool>" in line for line in shown)  # on/off flags take no value
    version = run_cli("--version")
    assert version.exit_code == 0 and version.output.strip() == f"tinymath {tinymath.__version__}"


def test_the_prepared_table_shows_every_column_whole(tiny_model, gsm8k_dir, tmp_path):
    """`prepare-data` to a pipe or log: headers and counts are not cut ("exampl…", "1,607,…")."""
    out = tmp_path / "prep"
    shown = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", out, "--val-size", 2).stdout
    manifest = json.loads((out / "prepare.json").read_text())
    assert all(header in shown for header in ("examples", "dropped", "truncated", "tokens", "mean", "p95", "max"))
    assert "…" not in shown
    for split, s in manifest["splits"].items():
        row = next(line.split() for line in shown.splitlines() if line.split()[:1] == [split])
        assert row[1:] == [str(s["examples"]), "0", str(s["truncated"]), f"{s['tokens']:,}", str(s["length"]["mean"]),
                           str(s["length"]["p95"]), str(s["length"]["max"])]
    assert max(len(line.rstrip()) for line in shown.splitlines()) <= 80  # an 80-column terminal shows it whole too


def test_piped_help_is_not_cut_to_80_columns(monkeypatch):
    """`tinymath train --help | less`: rich would wrap every option's help at 80 columns."""
    from typer import rich_utils

    from tinymath.cli import PIPED_WIDTH

    monkeypatch.setattr(rich_utils, "MAX_WIDTH", None)  # as in a fresh process without TERMINAL_WIDTH
    widths = [len(line.rstrip()) for line in run_cli("train", "--help").output.splitlines()]
    assert 80 < max(widths) <= PIPED_WIDTH


def test_out_with_a_tilde_or_through_a_symlink(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    """``--out ~/prep`` is the home folder's prep; an --out that is a link to a folder replaces that
    folder (with --overwrite) and stays a link."""
    monkeypatch.setenv("HOME", str(tmp_path))
    result = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", "~/prep", "--limit", 2)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "prep" / "prepare.json").is_file() and not (tmp_path / "~").exists()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "prep")
    result = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", link, "--limit", 3,
                     "--overwrite")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and json.loads((tmp_path / "prep" / "prepare.json").read_text())["limit"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "prep"]  # nothing left beside them


def test_every_test_problem_is_kept_whatever_its_length(tiny_model, gsm8k_dir, tmp_path):
    """Training rows whose prompt fills --max-length are dropped (nothing to learn); test rows never
    are: an evaluation of the prepared folder asks every question."""
    from transformers import AutoTokenizer

    from tinymath.base.prompts import build_prompt, encode_prompt

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    longest_test = max(len(encode_prompt(tok, build_prompt(tok, r["question"], "chat")))
                       for r in read_gsm8k(str(gsm8k_dir), "test"))
    out = tmp_path / "prep"
    result = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", out,
                     "--max-length", longest_test, "--json")
    assert result.exit_code == 0, result.output
    splits = json.loads(result.stdout)["splits"]
    assert splits["train"]["dropped_too_long"] > 0  # the length does cut training rows here...
    assert len(read_gsm8k(str(out), "test")) == len(read_gsm8k(str(gsm8k_dir), "test"))  # ...and no test row
    shown = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", tmp_path / "shown",
                    "--max-length", longest_test)
    row = next(line.split() for line in shown.stdout.splitlines() if line.split()[:1] == ["train"])
    assert row[3] == str(splits["train"]["dropped_too_long"])  # the table's "dropped" column says so too


def test_out_naming_the_working_folder_is_refused_before_any_work(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", ".")
    assert result.exit_code == 1 and "is the current folder" in result.stderr, result.output
    assert list(here.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_inputs_that_used_to_slip_through_or_crash(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    """JSON strings holding U+2028 are read; --val-size without train data, a tokenizer without an
    end-of-sequence token and an over-long path are one message each; an output name that looks like
    markup is printed as given."""
    import shutil

    row = json.loads((gsm8k_dir / "train.jsonl").read_text().splitlines()[0])
    row["question"] += "\u2028(a line separator)"
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_gsm8k(str(odd))[0]["question"].endswith("\u2028(a line separator)")

    only_test = tmp_path / "only_test"
    only_test.mkdir()
    shutil.copy(gsm8k_dir / "test.jsonl", only_test / "test.jsonl")
    result = run_cli("prepare-data", "--data", only_test, "--model", tiny_model, "--out", tmp_path / "p1",
                     "--val-size", 2)
    assert result.exit_code == 1 and "--val-size holds problems out of the train split" in result.stderr

    no_eos = shutil.copytree(tiny_model, tmp_path / "no_eos")
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    result = run_cli("prepare-data", "--data", gsm8k_dir, "--model", no_eos, "--out", tmp_path / "p2")
    assert result.exit_code == 1 and "no end-of-sequence token" in result.stderr, result.output
    assert not (tmp_path / "p2").exists()

    result = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", "a" * 300)
    assert result.exit_code == 1 and "use a shorter path" in result.stderr and "Traceback" not in result.output

    monkeypatch.chdir(tmp_path)
    result = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", "prep[/x]")
    assert result.exit_code == 0, result.output
    assert "prepared prep[/x]" in result.stdout and (tmp_path / "prep[/x]").is_dir()


def test_hub_rows_are_checked_like_local_ones(monkeypatch):
    """A hub dataset's rows get the same checks as a local file's: one message per bad row."""
    import datasets

    import tinymath.lib.hub as hub
    from tinymath.base.errors import TinymathError

    rows = {"question": ["What is 2 + 2?", None], "answer": ["2 + 2 = 4\n#### 4", "no marker here"]}
    monkeypatch.setattr(hub, "offline_unless_reachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(rows))
    with pytest.raises(TinymathError) as caught:
        read_gsm8k("someone/mathdata", "train")
    assert "--data someone/mathdata (train), row 2: missing 'question'" in str(caught.value)
    assert "row 2: the answer does not end in '#### N'" in str(caught.value)


def test_a_hub_dataset_with_only_a_train_split_is_prepared(tiny_model, tmp_path, monkeypatch):
    import datasets

    import tinymath.lib.hub as hub

    rows = {"question": ["What is 2 + 2?", "What is 3 + 3?"], "answer": ["2 + 2 = 4\n#### 4", "3 + 3 = 6\n#### 6"]}
    monkeypatch.setattr(hub, "offline_unless_reachable", lambda: None)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda *a, **k: ["train"])
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split=None, **k: datasets.Dataset.from_dict(rows))
    result = run_cli("prepare-data", "--data", "someone/mathdata", "--model", tiny_model, "--out", tmp_path / "p",
                     "--json")
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)["splits"]) == ["train"]


def test_sigterm_while_an_output_is_written_leaves_nothing_behind(tmp_path):
    import os
    import signal

    from tinymath.base.files import atomic_output_dir

    with pytest.raises(KeyboardInterrupt), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        os.kill(os.getpid(), signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []


def test_inside_the_training_loop_sigterm_is_the_loops_to_handle(tmp_path):
    """A checkpoint saved while training's own handler holds SIGTERM: the save completes, and the
    loop sees the request (it stops after the step, with its checkpoint)."""
    import os
    import signal

    from tinymath.base.files import atomic_output_dir
    from tinymath.lib.checkpoint import stop_on_signals

    with stop_on_signals() as stop:
        with atomic_output_dir(tmp_path / "checkpoint") as tmp:
            (tmp / "state.json").write_text("{}")
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop["signal"] is not None
    assert (tmp_path / "checkpoint" / "state.json").is_file()


def test_a_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    import os

    from tinymath.base import files

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the earlier output")
    real, calls = os.replace, []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder into place
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OSError), files.atomic_output_dir(out) as tmp:
        (tmp / "new.txt").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").is_file()


def test_a_torn_last_line_is_passed_over_even_with_a_newline_after_it(tmp_path):
    from tinymath.base.files import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"a": 1}\n{"a":\n\n')
    assert read_jsonl(path, skip_torn_last=True) == [{"a": 1}]


def test_a_folders_own_validation_file_is_its_validation_split(tiny_model, gsm8k_dir, tmp_path):
    """validation.jsonl beside train.jsonl: prepare-data and train on raw data both take it (with
    --val-size too it is refused: one or the other), and --eval-every can use it."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(gsm8k_dir, data)
    train = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(train[:-2]) + "\n")
    (data / "validation.jsonl").write_text("\n".join(train[-2:]) + "\n")
    result = run_cli("prepare-data", "--data", data, "--model", tiny_model, "--out", tmp_path / "prep", "--json")
    assert result.exit_code == 0, result.output
    splits = json.loads(result.stdout)["splits"]
    assert (splits["train"]["examples"], splits["validation"]["examples"]) == (len(train) - 2, 2)
    result = run_cli("prepare-data", "--data", data, "--model", tiny_model, "--out", tmp_path / "p2", "--val-size", 1)
    assert result.exit_code == 1 and "has its own validation split" in result.stderr
    run = tmp_path / "run"
    result = run_cli("train", "--data", data, "--model", tiny_model, "--out", run, "--quant", "none", "--max-steps", 1,
                     "--batch-size", 2, "--eval-every", 1, "--eval-limit", 2, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "val_accuracy" in rows[-1]


def test_json_output_with_progress_on_a_terminal(tiny_model, gsm8k_dir, tmp_path):
    """--json keeps stdout one JSON document; a person watching (stderr a terminal) still sees the
    progress bar there, and a script (stderr a pipe) sees none."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    command = [sys.executable, "-m", "tinymath", "prepare-data", "--data", str(gsm8k_dir), "--model", str(tiny_model),
               "--json", "--out"]
    reader, writer = os.openpty()
    with tempfile.TemporaryFile() as stdout:
        watched = subprocess.Popen([*command, str(tmp_path / "a")], stdout=stdout, stderr=writer)
        os.close(writer)
        shown = b""
        while True:  # read the terminal as the command writes to it (a full terminal would block it)
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            shown += chunk
        os.close(reader)
        assert watched.wait(timeout=240) == 0
        stdout.seek(0)
        assert json.loads(stdout.read())["splits"]
    assert b"tokenizing" in shown
    piped = subprocess.run([*command, str(tmp_path / "b")], capture_output=True, timeout=240)
    assert piped.returncode == 0 and json.loads(piped.stdout)["splits"] and b"tokenizing" not in piped.stderr
