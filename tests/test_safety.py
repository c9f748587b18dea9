"""What an adversarial user tries: two runs on one folder, --overwrite on the wrong folder, shared run
folders carrying code, NaN settings, damaged files, bad bytes. Each case ends in one clear message
(exit 1), with nothing lost, nothing executed and nothing half-written."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

COMMON = ["--quant", "none", "--batch-size", "2", "--lr", "0.02", "--warmup", "0", "--lora-r", "8"]


def _train(tiny_model, data, out, *extra):
    return run_cli("train", "--data", data, "--model", tiny_model, "--out", out, *COMMON, *extra)


def _clean_error(result, *phrases):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


@pytest.fixture(scope="module")
def finished_run(tiny_model, gsm8k_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert _train(tiny_model, gsm8k_dir, out, "--max-steps", "2").exit_code == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _nan_losses(monkeypatch):
    """Every training loss becomes NaN (as an overflow would); returns a function that undoes it."""
    import tinymath.lib.batching as batching

    build = batching.build_loss_model

    def nan_loss(*args, **kwargs):
        loss_model = build(*args, **kwargs)
        forward = loss_model.forward
        loss_model.forward = lambda **batch: forward(**batch) * float("nan")
        return loss_model

    monkeypatch.setattr(batching, "build_loss_model", nan_loss)
    return lambda: monkeypatch.setattr(batching, "build_loss_model", build)


# ---------------------------------------------------------------- 1. train's output folder


def test_two_runs_started_together_one_is_refused(tiny_model, gsm8k_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tinymath", "train", "--data", str(gsm8k_dir), "--model", str(tiny_model),
           "--out", str(out), *COMMON, "--json"]
    procs = [subprocess.Popen(cmd + ["--max-steps", str(steps)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for steps in (6, 7)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    winner = next(json.loads(stdout) for code, stdout, _ in results if code == 0)
    loser_err = next(stderr for code, _, stderr in results if code == 1)
    assert "another training run" in loser_err or "already exists" in loser_err
    run = json.loads((out / "run.json").read_text())
    config = json.loads((out / "train_config.json").read_text())
    assert run["max_steps"] == config["max_steps"] == winner["steps"]  # one run's files, not a mix


def test_overwrite_keeps_the_old_run_until_the_new_one_succeeds(tiny_model, gsm8k_dir, run_copy, monkeypatch):
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    restore = _nan_losses(monkeypatch)
    result = _train(tiny_model, gsm8k_dir, run_copy, "--max-steps", "3", "--overwrite")
    _clean_error(result, "the loss became nan")
    assert "--resume" not in result.stderr  # nothing to resume: no checkpoint was saved
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == before
    assert not any(p.name.endswith(".partial") for p in run_copy.parent.iterdir())

    restore()
    assert _train(tiny_model, gsm8k_dir, run_copy, "--max-steps", "3", "--overwrite").exit_code == 0
    assert json.loads((run_copy / "run.json").read_text())["max_steps"] == 3
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["run"]  # swapped in, nothing left beside it


def test_overwrite_refuses_folders_that_are_not_runs(tiny_model, gsm8k_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text('{"step": 1}\n')  # a name tinymath uses proves nothing
    (mine / "thesis.tex").write_text("years of work")
    _clean_error(_train(tiny_model, gsm8k_dir, mine, "--max-steps", "1", "--overwrite"), "replaces only those")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_a_foreign_folder_where_the_new_run_would_train(tiny_model, gsm8k_dir, run_copy):
    """A run replacing RUN trains in .RUN.partial beside it; a folder of that name with someone
    else's files in it is one message, and both it and RUN stay as they were."""
    partial = run_copy.with_name(f".{run_copy.name}.partial")
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    before = (run_copy / "run.json").read_text()
    _clean_error(_train(tiny_model, gsm8k_dir, run_copy, "--max-steps", "1", "--overwrite"), "did not write")
    assert (partial / "notes.txt").read_text() == "mine" and (run_copy / "run.json").read_text() == before


def test_overwrite_refuses_the_working_directory(tiny_model, gsm8k_dir, run_copy, monkeypatch):
    before = sorted(p.name for p in run_copy.iterdir())
    monkeypatch.chdir(run_copy)
    _clean_error(_train(tiny_model, gsm8k_dir, ".", "--max-steps", "1", "--overwrite"), "current folder")
    assert sorted(p.name for p in run_copy.iterdir()) == before


def test_a_failed_first_run_leaves_nothing_behind(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    _nan_losses(monkeypatch)
    out = tmp_path / "run"
    _clean_error(_train(tiny_model, gsm8k_dir, out, "--max-steps", "2"), "the loss became nan")
    assert not out.exists()


# ---------------------------------------------------------------- 2. run folders are data


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_a_pickled_payload_in_a_checkpoint_never_runs(tiny_model, gsm8k_dir, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "payload-ran"
    assert _train(tiny_model, gsm8k_dir, out, "--max-steps", "4", "--save-every", "2").exit_code == 0
    (out / "run.json").unlink()
    latest = out / "checkpoints" / "step-000002"
    (latest / "optimizer.pt").write_bytes(pickle.dumps(_Payload(marker)))
    result = run_cli("train", "--resume", out)
    _clean_error(result, "holds more than tensors")
    assert not marker.exists()


def test_remote_code_only_runs_with_the_commands_own_flag(run_copy, tmp_path):
    marker = tmp_path / "remote-code-ran"
    (run_copy / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                      "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    tokenizer_config = json.loads((run_copy / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (run_copy / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    run = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**run, "trust_remote_code": True}))
    for command in (["chat", "--adapter", run_copy, "--question", "1+1?", "--max-new-tokens", "2"],
                    ["eval", "--adapter", run_copy, "--limit", "1", "--max-new-tokens", "2"],
                    ["merge-adapters", run_copy, "--out", tmp_path / "merged"]):
        run_cli(*command)
        assert not marker.exists(), command


# ---------------------------------------------------------------- 3. bad numbers


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--epochs", "nan"),
                                         ("--warmup", "nan"), ("--val-size", "nan"), ("--lora-alpha", "inf")])
def test_non_finite_settings_are_refused(tiny_model, gsm8k_dir, tmp_path, flag, value):
    out = tmp_path / "run"
    _clean_error(_train(tiny_model, gsm8k_dir, out, "--max-steps", "1", flag, value), flag, "finite")
    assert not out.exists()


def test_non_finite_temperature_is_refused(tiny_model, gsm8k_dir, tmp_path):
    result = run_cli("eval", "--model", tiny_model, "--data", gsm8k_dir, "--limit", "1", "--temperature", "nan",
                     "--out", tmp_path / "ev")
    _clean_error(result, "--temperature", "finite")
    assert not (tmp_path / "ev").exists()


def test_merge_refuses_an_adapter_with_nan_weights(run_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(run_copy / "adapter_model.safetensors")
    save_file({k: v * float("nan") for k, v in weights.items()}, run_copy / "adapter_model.safetensors")
    result = run_cli("merge-adapters", run_copy, "--out", tmp_path / "merged", "--json")
    _clean_error(result, "not finite")
    assert result.stdout == "" and not (tmp_path / "merged").exists()


def test_the_merge_check_fires_on_a_wrong_merge(run_copy, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    merge = LoraModel.merge_and_unload

    def broken(self, *args, **kwargs):  # a merge that forgets the adapter of one layer
        merged = merge(self, *args, **kwargs)
        layer = merged.model.layers[0].self_attn.q_proj
        layer.weight.data += 0.5 * layer.weight.data.abs().max()
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", broken)
    _clean_error(run_cli("merge-adapters", run_copy, "--out", tmp_path / "merged"), "merge check failed")
    assert not (tmp_path / "merged").exists()


def test_prepare_data_refuses_answers_without_a_final_answer(tiny_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "What is 2+2?", "answer": "2+2 is four."}) + "\n")
    result = run_cli("prepare-data", "--data", data, "--model", tiny_model, "--out", tmp_path / "prep")
    _clean_error(result, "line 1", "####")
    assert not (tmp_path / "prep").exists()


# ---------------------------------------------------------------- 4. one message, not a traceback


def test_non_utf8_data_and_config(tiny_model, gsm8k_dir, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(json.dumps({"question": "Caf\u00e9 costs 2. Two?", "answer": "4\n#### 4"}).encode("latin-1")
                     .replace(b"\\u00e9", b"\xe9") + b"\n")
    _clean_error(run_cli("prepare-data", "--data", data, "--model", tiny_model, "--out", tmp_path / "p"),
                 "not UTF-8")
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(b'system-prompt = "caf\xe9"\n')
    _clean_error(run_cli("train", "--config", recipe, "--dry-run"), "not UTF-8")


def test_prepare_data_refuses_to_drop_every_example(tiny_model, gsm8k_dir, tmp_path):
    result = run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", tmp_path / "p",
                     "--max-length", "16")
    _clean_error(result, "--max-length 16 leaves no examples")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_adapter_is_one_message(run_copy, tmp_path, damage):
    weights = run_copy / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 10)
    for command in (["merge-adapters", run_copy, "--out", tmp_path / "merged"],
                    ["eval", "--adapter", run_copy, "--limit", "1"],
                    ["chat", "--adapter", run_copy, "--question", "1+1?"]):
        _clean_error(run_cli(*command), "adapter_model.safetensors")


def test_a_run_folder_given_as_a_model_is_refused_everywhere(run_copy, gsm8k_dir, tmp_path):
    """prepare-data used to accept it (the run carries a tokenizer) and train then named an --adapter it has not."""
    base = json.loads((run_copy / "run.json").read_text())["model"]
    for command in (["prepare-data", "--data", gsm8k_dir, "--model", run_copy, "--out", tmp_path / "prep"],
                    ["train", "--data", gsm8k_dir, "--model", run_copy, "--out", tmp_path / "r", "--max-steps", "1"],
                    ["train", "--data", gsm8k_dir, "--model", run_copy, "--out", tmp_path / "r", "--dry-run"],
                    ["eval", "--model", run_copy, "--data", gsm8k_dir, "--limit", "1"]):
        _clean_error(run_cli(*command), "not a model", f"its base model is {base}", f"--init-adapter {run_copy}")
    assert not (tmp_path / "prep").exists() and not (tmp_path / "r").exists()


def test_damaged_model_weights_are_one_message(tiny_model, gsm8k_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    for command in (["eval", "--model", model, "--data", gsm8k_dir, "--limit", "1"],
                    ["chat", "--model", model, "--question", "1+1?"],
                    ["train", "--model", model, "--data", gsm8k_dir, "--out", tmp_path / "run", "--max-steps", "1"]):
        _clean_error(run_cli(*command), f"could not load model {model}: a weights file is damaged or incomplete")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", ["{not json", "{}", '{"model": 3, "quant": "nf4", "format": "chat"}', "[1, 2]"])
def test_damaged_run_json_is_one_message(run_copy, tmp_path, content):
    (run_copy / "run.json").write_text(content)
    for command in (["merge-adapters", run_copy, "--out", tmp_path / "merged"],
                    ["eval", "--adapter", run_copy, "--limit", "1"],
                    ["chat", "--adapter", run_copy, "--question", "1+1?"]):
        _clean_error(run_cli(*command), "run.json")


def test_resume_passes_over_a_damaged_latest_checkpoint(tiny_model, gsm8k_dir, tmp_path):
    out = tmp_path / "run"
    args = ("--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "3")
    assert _train(tiny_model, gsm8k_dir, out, *args).exit_code == 0
    shutil.rmtree(out / "checkpoints" / "step-000004")
    (out / "run.json").unlink()
    (out / "checkpoints" / "step-000004").mkdir()  # damaged: its files cut short
    for name in ("state.json", "adapter_model.safetensors", "optimizer.pt"):
        (out / "checkpoints" / "step-000004" / name).write_text("{" if name == "state.json" else "x")
    (out / "checkpoints" / "step-000004" / "state.json").write_text('{"step": 4}')
    result = run_cli("train", "--resume", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["resumed_from_step"] == 2
    assert "step-000004 is damaged" in result.stderr
    (out / "run.json").unlink()  # now every checkpoint is damaged: the message says how to start again
    for checkpoint in (out / "checkpoints").iterdir():
        (checkpoint / "adapter_model.safetensors").write_text("x")
    result = run_cli("train", "--resume", out)
    assert result.exit_code == 1 and "no intact checkpoint" in result.stderr
    assert f"tinymath train --config {out / 'train_config.json'} --out NEW" in " ".join(result.stderr.split())


def test_unwritable_output_fails_before_the_work(tiny_model, gsm8k_dir, run_copy, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _clean_error(run_cli("merge-adapters", run_copy, "--out", blocker / "merged"),
                 f"--out {blocker / 'merged'}: cannot write there")  # the folder asked for, not its parent
    _clean_error(run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--out", blocker / "run"),
                 f"--out {blocker / 'run'}: cannot write there")
    _clean_error(run_cli("eval", "--adapter", run_copy, "--limit", "1", "--out", blocker / "ev"),
                 "cannot write there")


def test_a_full_disk_is_one_message(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    import errno

    import tinymath.services.prepare as prepare

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "prep"))

    monkeypatch.setattr(prepare, "prepare_data", full)
    _clean_error(run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", tmp_path / "prep"),
                 "No space left on device")


@pytest.mark.parametrize("content", ["", '{"question": "q", "gold": "1", "correct": tr'])
def test_compare_with_an_empty_or_torn_predictions_file(tmp_path, content):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text("{}")
        (tmp_path / name / "predictions.jsonl").write_text(content)
    _clean_error(run_cli("eval", "--compare", tmp_path / "a", tmp_path / "b"), "predictions.jsonl")


def test_piped_chat_survives_bad_bytes_and_huge_lines(tiny_model):
    lines = b"What is 1+1?\n\xff\xfe broken\n" + b"9" * 2_000_000 + b"\nWhat is 2+2?\n"
    proc = subprocess.run([sys.executable, "-m", "tinymath", "chat", "--model", str(tiny_model), "--json",
                           "--max-new-tokens", "4"], input=lines, capture_output=True, timeout=300)
    answered = [json.loads(line)["question"] for line in proc.stdout.decode().splitlines()]
    assert answered == ["What is 1+1?", "What is 2+2?"]
    err = proc.stderr.decode()
    assert "line 2: not UTF-8" in err and "line 3:" in err and "characters" in err and "Traceback" not in err
    assert proc.returncode == 1


def test_outputs_are_readable_by_others_as_the_umask_allows(run_copy, tmp_path):
    """Outputs are written through private temporary files and folders; what lands is not private."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        result = run_cli("merge-adapters", run_copy, "--out", tmp_path / "merged")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    for path in [tmp_path / "merged", *(tmp_path / "merged").iterdir(), *run_copy.iterdir()]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, (path, oct(mode))


def test_a_replacement_resumes_into_its_own_sibling_only(tiny_model, gsm8k_dir, run_copy, tmp_path, monkeypatch):
    """A stopped --overwrite run lives in .run.partial: resumed from anywhere, it replaces the run
    beside it, never a folder of the same name elsewhere; a partial left by a killed start is reused."""
    from tinymath.base.runs import partial_folder, plan_train_output

    partial = partial_folder(run_copy)
    partial.mkdir()
    (partial / ".replaces").write_text("/somewhere/else")  # what the file says is not trusted
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "run").mkdir(parents=True)
    (elsewhere / "run" / "notes.txt").write_text("mine")
    monkeypatch.chdir(elsewhere)
    assert plan_train_output(partial, overwrite=False, resume=True).final == run_copy
    # the killed start left only its marker: the next --overwrite starts afresh instead of failing
    result = _train(tiny_model, gsm8k_dir, run_copy, "--max-steps", "1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (elsewhere / "run" / "notes.txt").read_text() == "mine" and not partial.exists()
    run = json.loads((run_copy / "run.json").read_text())  # where it ended up, not where it trained
    assert Path(run["out"]).resolve() == Path(run["result"]["out"]).resolve() == run_copy.resolve()


def test_compare_with_a_folder_that_does_not_exist(tmp_path):
    (tmp_path / "a").mkdir()
    _clean_error(run_cli("eval", "--compare", tmp_path / "missing", tmp_path / "a"), "missing does not exist")
    _clean_error(run_cli("eval", "--compare", tmp_path / "a", tmp_path / "b"), "not a `tinymath eval --out` folder")


def test_a_checkpoint_with_adapter_tensors_of_another_shape_is_passed_over(tiny_model, gsm8k_dir, tmp_path):
    """Tensors of another shape (another LoRA rank, say) in the newest checkpoint: it is passed over
    for the older one with a word, not a traceback."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    assert _train(tiny_model, gsm8k_dir, out, "--max-steps", "6", "--save-every", "2",
                  "--keep-checkpoints", "3").exit_code == 0
    (out / "run.json").unlink()
    adapter = out / "checkpoints" / "step-000004" / "adapter_model.safetensors"
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in load_file(adapter).items()}, adapter)
    result = run_cli("train", "--resume", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["resumed_from_step"] == 2
    assert "step-000004 is damaged" in result.stderr
