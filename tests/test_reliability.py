"""Runs a user can trust with an afternoon: exact resume, Ctrl-C, NaN, the lock, config files,
--dry-run, accuracy while training and the curves; a GGUF converted once by processes started
together."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

from tinymath.base.runs import CONFIG_FILE, run_lock

COMMON = ["--quant", "none", "--batch-size", "2", "--lr", "0.02", "--warmup", "0", "--lora-r", "8"]


def _wait_for_steps(run: Path, steps: int, timeout: float) -> None:
    """Until the run training in ``run`` has logged ``steps`` steps (or ``timeout`` seconds pass)."""
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.02)


def _train(tiny_model, gsm8k_dir, out, *extra):
    return run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--out", out, *COMMON, *extra)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ctrl_c_saves_and_resume_matches_uninterrupted(tiny_model, gsm8k_dir, tmp_path):
    """With LoRA dropout on, so the resumed steps match only if the random-number state is restored too."""
    steps = "80"
    whole = tmp_path / "whole"
    assert _train(tiny_model, gsm8k_dir, whole, "--max-steps", steps, "--lora-dropout", "0.1").exit_code == 0

    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "tinymath", "train", "--data", str(gsm8k_dir), "--model", str(tiny_model),
           "--out", str(cut), *COMMON, "--max-steps", steps, "--lora-dropout", "0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(cut, 3, timeout=120)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130  # 128 + SIGINT, as shells expect of a Ctrl-C
    assert "tinymath train --resume" in stderr
    assert "stopping after this step" in stderr  # said at once, not only when the step ends
    stopped_at = len(_losses(cut))
    assert stopped_at < int(steps), "the run finished before the signal arrived"
    assert list((cut / "checkpoints").glob("step-*/adapter_model.safetensors"))
    assert not (cut / "run.json").exists()  # an interrupted run does not look complete

    result = run_cli("train", "--resume", cut, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from_step"] == stopped_at
    assert _losses(cut) == pytest.approx(_losses(whole), rel=1e-5)
    assert (cut / "run.json").exists()


def _signal_after_step(monkeypatch, step: int, resumed: bool = False):
    """Ctrl-C arrives during ``step`` of a run (``resumed``: of a resumed run): the signal
    handler's flag is set before the step's end."""
    from tinymath.lib import trainer

    after_step = trainer.Trainer.after_step

    def signalled(self, done, *args):
        if done == step and self.resume == resumed:
            self.stop["signal"] = "SIGINT"
        return after_step(self, done, *args)

    monkeypatch.setattr(trainer.Trainer, "after_step", signalled)


def test_ctrl_c_during_the_last_step_finishes_the_run(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    """Stopping there would leave a checkpoint at the run's end, which --resume cannot continue: the
    run is finished instead, and complete."""
    _signal_after_step(monkeypatch, 3)
    out = tmp_path / "run"
    result = _train(tiny_model, gsm8k_dir, out, "--max-steps", "3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["result"]["steps"] == 3
    assert len(_losses(out)) == 3


def test_a_checkpoint_saved_after_a_damaged_newer_one_is_the_one_kept(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    """Resumed from step 2 because step 4's checkpoint is damaged, then stopped at step 3 keeping one
    checkpoint: step 3's is kept (step 4's belongs to steps being run again), so the run resumes."""
    out = tmp_path / "run"
    assert _train(tiny_model, gsm8k_dir, out, "--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "3",
                  "--lora-dropout", "0.1").exit_code == 0
    whole = _losses(out)
    (out / "run.json").unlink()
    (out / "checkpoints" / "step-000004" / "adapter_model.safetensors").write_text("cut short")
    _signal_after_step(monkeypatch, 3, resumed=True)
    stopped = run_cli("train", "--resume", out, "--keep-checkpoints", "1")
    assert stopped.exit_code == 130, stopped.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]
    monkeypatch.undo()
    result = run_cli("train", "--resume", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["resumed_from_step"] == 3
    assert _losses(out) == pytest.approx(whole, rel=1e-5)


def test_sigterm_while_the_run_sets_up_leaves_nothing_behind(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's stop, `kill`) while the model loads: the command ends as interrupted
    (exit 143, as shells expect) and the run folder it created is gone, not left holding a lock and nothing to resume."""
    from tinymath.lib import trainer

    load = trainer.Trainer._load_model

    def terminated_while_loading(self):
        load(self)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer.Trainer, "_load_model", terminated_while_loading)
    out = tmp_path / "run"
    result = _train(tiny_model, gsm8k_dir, out, "--max-steps", "3")
    assert result.exit_code == 143 and "stopped by SIGTERM" in result.stderr, result.output  # 128 + SIGTERM
    assert not out.exists()


def test_a_nan_validation_loss_does_not_cost_the_run(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    from tinymath.lib import trainer

    monkeypatch.setattr(trainer.Trainer, "validation_loss", lambda self, rows: float("nan"))
    out = tmp_path / "run"
    result = _train(tiny_model, gsm8k_dir, out, "--max-steps", "2", "--val-size", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["result"]["val_loss"] is None
    assert "validation loss came out nan" in result.stderr


def test_nan_loss_stops_cleanly_and_keeps_the_last_checkpoint(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    import tinymath.lib.batching as train_module

    build = train_module.build_loss_model

    def poisoned(*args, **kwargs):  # the third forward pass returns NaN, as an overflow would
        loss_model = build(*args, **kwargs)
        forward, calls = loss_model.forward, []

        def nan_on_third(**batch):
            calls.append(1)
            loss = forward(**batch)
            return loss * float("nan") if len(calls) >= 3 else loss

        loss_model.forward = nan_on_third
        return loss_model

    monkeypatch.setattr(train_module, "build_loss_model", poisoned)
    out = tmp_path / "run"
    result = _train(tiny_model, gsm8k_dir, out, "--max-steps", "5", "--save-every", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "the loss became nan" in result.stderr and "last good checkpoint" in result.stderr
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert last.name == "step-000002"
    from safetensors.torch import load_file

    assert all(t.isfinite().all() for t in load_file(last / "adapter_model.safetensors").values())


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_a_run_starting_while_another_command_probes_its_folder_is_not_refused(tmp_path):
    """`check_not_locked` (any command's look at a run folder) holds the shared lock for an instant;
    a run starting then waits it out instead of naming the prober as a run writing there."""
    import fcntl
    import threading

    from tinymath.base.runs import run_lock

    out = tmp_path / "run"
    out.mkdir()
    probe = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(0.3, os.close, (probe,)).start()  # the probe's instant, drawn out
    with run_lock(out):
        assert (out / ".lock").read_text() == str(os.getpid())


def test_a_run_folder_removed_as_the_run_starts_is_said_not_a_traceback(tmp_path, monkeypatch):
    """Another command's clean-up can remove the folder between its creation and the lock: one message."""
    import tinymath.base.runs as runs
    from tinymath import TinymathError

    out, real_open = tmp_path / "run", os.open

    def removed_first(path, *args, **kwargs):
        if str(path) == str(out / ".lock"):  # the lock file's open, just after run_lock made the folder
            shutil.rmtree(out)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runs.os, "open", removed_first)
    with pytest.raises(TinymathError, match="was removed while this run was starting in it; start it again"):
        with runs.run_lock(out):
            pass


def test_closed_output_streams_do_not_break_the_command():
    """`tinymath --version 2>&-` (stderr closed) and errors with stdout closed: answered as usual."""
    version = subprocess.run(["sh", "-c", f"'{sys.executable}' -m tinymath --version 2>&-"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("tinymath ")
    error = subprocess.run(["sh", "-c", f"'{sys.executable}' -m tinymath eval --compare nowhere-a nowhere-b 1>&-"],
                           capture_output=True, text=True)
    assert error.returncode == 1 and error.stderr.strip() == "error: --compare nowhere-a does not exist", error.stderr


def test_lock_refuses_a_second_run(tiny_model, gsm8k_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        result = _train(tiny_model, gsm8k_dir, out, "--max-steps", "1")
        assert result.exit_code == 1 and f"pid {other.pid}" in result.stderr
        assert not (out / "train_config.json").exists()  # refused before anything was written
    finally:
        other.kill()
        other.wait()
    # a lock left by a process that died (kill -9 included) does not block, and goes with the run's end
    assert (out / ".lock").exists()
    assert _train(tiny_model, gsm8k_dir, out, "--max-steps", "1").exit_code == 0
    assert not (out / ".lock").exists()


def test_a_folder_another_run_is_writing_to_is_named_so_first(tiny_model, gsm8k_dir, tmp_path):
    """A run training in --out (its lock held, its first files written): a second train there is
    told that, not to pass --overwrite (which would only meet the lock), with or without --overwrite,
    --resume or --dry-run."""
    out = tmp_path / "run"
    with run_lock(out):
        config = {"data": str(gsm8k_dir), "model": str(tiny_model), "lora_r": 8, "lr": 0.02}
        (out / CONFIG_FILE).write_text(json.dumps(config))  # what a run writes first
        (out / "checkpoints").mkdir()
        for extra in ((), ("--overwrite",), ("--dry-run",)):
            result = _train(tiny_model, gsm8k_dir, out, "--max-steps", "1", *extra)
            assert result.exit_code == 1 and f"another training run (pid {os.getpid()}) is writing to {out}" \
                in result.stderr.replace("\n", ""), result.stderr
            assert "--overwrite" not in result.stderr and "--resume" not in result.stderr, result.stderr
        result = run_cli("train", "--resume", out)
        assert result.exit_code == 1 and "another training run" in result.stderr, result.stderr
    assert json.loads((out / CONFIG_FILE).read_text()) == config and (out / "checkpoints").is_dir()


def test_a_run_folder_keeps_no_lock_file_once_the_command_ends(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    """Finished, stopped by Ctrl-C (its checkpoint kept to resume) or failed after a checkpoint: the
    folder holds the run, not the lock."""
    done = tmp_path / "done"
    assert _train(tiny_model, gsm8k_dir, done, "--max-steps", "2").exit_code == 0
    assert (done / "run.json").is_file() and not (done / ".lock").exists()
    _signal_after_step(monkeypatch, 1)
    stopped = tmp_path / "stopped"
    assert _train(tiny_model, gsm8k_dir, stopped, "--max-steps", "3").exit_code == 130
    assert list((stopped / "checkpoints").iterdir()) and not (stopped / ".lock").exists()
    monkeypatch.undo()
    from tinymath.base.errors import TinymathError
    from tinymath.lib import trainer

    after_step = trainer.Trainer.after_step

    def fails_at_step_2(self, done, *args):
        if done == 2:
            raise TinymathError("the data went away")
        return after_step(self, done, *args)

    monkeypatch.setattr(trainer.Trainer, "after_step", fails_at_step_2)
    failed = tmp_path / "failed"
    result = _train(tiny_model, gsm8k_dir, failed, "--max-steps", "3", "--save-every", "1")
    assert result.exit_code == 1 and "the data went away" in result.stderr, result.output
    assert list((failed / "checkpoints").iterdir()) and not (failed / ".lock").exists()


def test_a_lock_file_removed_by_its_holder_meanwhile_is_not_taken_for_the_lock(tmp_path, monkeypatch):
    """A run that opened the lock file just as the run holding it ended (and removed it) locks the
    file that is there now, not the removed one, so a third run is still kept out."""
    import fcntl

    from tinymath.base.errors import TinymathError
    from tinymath.base.runs import check_not_locked

    out = tmp_path / "run"
    first = run_lock(out)
    first.__enter__()
    flock = fcntl.flock

    def first_ends_meanwhile(fd, operation):
        nonlocal first
        if first is not None:  # between the second run's opening of the lock file and its locking of it
            first.__exit__(None, None, None)
            first = None
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", first_ends_meanwhile)
    with run_lock(out):
        assert (out / ".lock").read_text() == str(os.getpid())
        with pytest.raises(TinymathError, match="another training run"):
            check_not_locked(out)
    assert first is None and not (out / ".lock").exists()


def test_config_file_precedence_and_dry_run(tiny_model, gsm8k_dir, tmp_path):
    toml = tmp_path / "recipe.toml"
    toml.write_text(f'data = "{gsm8k_dir}"\nmodel = "{tiny_model}"\nlr = 0.001\nlora-r = 4\nmax_steps = 2\n')
    result = run_cli("train", "--config", toml, "--lr", "0.002", "--out", tmp_path / "run", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["lr"] == 0.002 and report["config"]["lora_r"] == 4 and report["total_steps"] == 2
    assert report["data"]["train"]["examples"] == 8 and report["data"]["train"]["tokens"] > 0
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_run_json_repeats_a_run(tiny_model, gsm8k_dir, tmp_path):
    first = tmp_path / "first"
    assert _train(tiny_model, gsm8k_dir, first, "--max-steps", "2").exit_code == 0
    result = run_cli("train", "--config", first / "run.json", "--out", tmp_path / "second", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    repeated = json.loads(result.stdout)["config"]
    saved = json.loads((first / "run.json").read_text())
    assert all(repeated[k] == saved[k] for k in ("lr", "lora_r", "batch_size", "max_steps", "seed", "model"))
    assert json.loads(result.stdout)["out_refused"] is None
    again = run_cli("train", "--config", first / "run.json", "--dry-run", "--json")  # its own --out: taken
    assert again.exit_code == 1 and "the run itself would stop here" in again.stderr and "already exists" in again.stderr
    assert json.loads(again.stdout)["out_refused"]  # the report is still printed, for scripts to read


@pytest.mark.parametrize("content, message", [
    ("lora_rank = 4\n", "unknown setting 'lora_rank'; did you mean 'lora-r'?"),
    ('lr = "fast"\n', "lr should be float"),
    ('lora-r = "eight"\n', "lora-r should be int"),  # named as the file spells it
    ("lr = = 1\n", "line 1"),
])
def test_bad_config_files(tmp_path, content, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(content)
    result = run_cli("train", "--config", toml, "--dry-run")
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output


def test_a_config_file_s_problems_are_all_named_with_the_file(gsm8k_dir, tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('lora_rank = 4\nlora-alpha = "x"\n')
    result = run_cli("train", "--config", toml, "--dry-run")
    assert result.exit_code == 1 and "'lora_rank'" in result.stderr and "lora-alpha should be float" in result.stderr
    toml.write_text(f'data = "{gsm8k_dir}"\nlr = "fast"\nbatch-size = -3\nlora_rank = 4\n')  # a wrong type, a bad
    result = run_cli("train", "--config", toml, "--dry-run")  # value and a misspelling: all three in one message
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert all(m in result.stderr for m in ("lr should be float", "--batch-size -3 must be positive", "'lora_rank'"))
    assert f"(batch-size: set in --config {toml})" in result.stderr.replace("\n", "")
    toml.write_text(f'data = "{gsm8k_dir}"\nlr = -1\nepochs = 0\n')
    result = run_cli("train", "--config", toml, "--lr", "1", "--dry-run")  # --lr given as a flag: not the file's
    assert result.exit_code == 1 and "--epochs 0.0 must be positive" in result.stderr and "--lr" not in result.stderr
    assert f"(epochs: set in --config {toml})" in result.stderr.replace("\n", "")
    toml.write_text(f'data = "{gsm8k_dir}"\nval-size = 0\n')  # as run.json records it; named only when the
    result = run_cli("train", "--config", toml, "--eval-every", "5", "--dry-run")  # problem is about it
    assert result.exit_code == 1 and "--eval-every needs a validation split: --val-size N" in result.stderr
    assert "set in --config" not in result.stderr


def test_another_commands_record_as_config_says_what_it_is(tiny_model, gsm8k_dir, tmp_path):
    """A prepare-data manifest or an eval summary given as --config is named for what it is, with
    what to give instead, not a list of its keys as unknown settings with far-fetched suggestions."""
    prep, run, evaluated = tmp_path / "prep", tmp_path / "run", tmp_path / "eval"
    assert run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", prep).exit_code == 0
    result = run_cli("train", "--config", prep / "prepare.json", "--dry-run")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (f"--config {prep / 'prepare.json'} is a prepare-data record, not a settings file; give its folder as "
            f"--data {prep}") in result.stderr.replace("\n", ""), result.stderr
    assert _train(tiny_model, prep, run, "--max-steps", "1").exit_code == 0
    assert run_cli("eval", "--adapter", run, "--data", gsm8k_dir, "--split", "test", "--limit", "2",
                   "--max-new-tokens", "4", "--out", evaluated).exit_code == 0
    result = run_cli("train", "--config", evaluated / "summary.json", "--dry-run")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (f"--config {evaluated / 'summary.json'} is an eval summary, not a settings file" in
            result.stderr.replace("\n", "")), result.stderr
    assert f"to repeat the run it evaluated, give --config {run / 'run.json'}" in result.stderr.replace("\n", "")
    foreign = tmp_path / "other.json"  # names merely like a setting get no suggestion; a typo still does
    foreign.write_text(json.dumps({"splits": {}, "eos_token": "</s>", "lora_rr": 8, "num_epochs": 2}))
    result = run_cli("train", "--config", foreign, "--dry-run")
    said = result.stderr.replace("\n", " ")
    assert result.exit_code == 1 and "unknown setting 'splits'" in said and "unknown setting 'eos_token'" in said, said
    assert "unknown setting 'lora_rr'; did you mean 'lora-r'?" in said
    assert "unknown setting 'num_epochs'; did you mean 'epochs'?" in said
    assert said.count("did you mean") == 2, said


def test_a_run_folder_as_config_points_at_its_run_json(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    result = run_cli("train", "--config", tmp_path / "run", "--dry-run")
    assert result.exit_code == 1 and f"give {tmp_path / 'run' / 'run.json'} to repeat that run" in result.stderr


def test_resume_refusals(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _train(tiny_model, gsm8k_dir, out, "--max-steps", "2").exit_code == 0
    result = run_cli("train", "--resume", out)
    assert result.exit_code == 1 and "kept no checkpoint to continue from" in result.stderr
    monkeypatch.chdir(tmp_path)  # the saved data path given again, relative this time: the same setting
    result = run_cli("train", "--resume", out, "--data", os.path.relpath(gsm8k_dir))
    assert result.exit_code == 1 and "kept no checkpoint to continue from" in result.stderr
    result = run_cli("train", "--resume", out, "--lr", "0.5")
    assert result.exit_code == 1 and "--lr would change the saved run" in result.stderr and "--max-steps" in result.stderr
    result = run_cli("train", "--resume", tmp_path / "nothing")
    assert result.exit_code == 1 and "nothing does not exist" in result.stderr
    (tmp_path / "plain").mkdir()
    result = run_cli("train", "--resume", tmp_path / "plain")
    assert result.exit_code == 1 and "not a tinymath run folder" in result.stderr
    result = run_cli("train", "--resume", out, "--out", tmp_path / "elsewhere")  # it would be ignored
    assert result.exit_code == 1 and "drop --out" in result.stderr and not (tmp_path / "elsewhere").exists()
    result = run_cli("train", "--resume", out, "--out", "run")  # the same folder, relative: no conflict
    assert result.exit_code == 1 and "kept no checkpoint to continue from" in result.stderr
    killed = tmp_path / "killed"  # killed (kill -9) before its first checkpoint: its settings, nothing more
    killed.mkdir()
    shutil.copy(out / CONFIG_FILE, killed / CONFIG_FILE)
    result = run_cli("train", "--resume", killed)
    again = f"tinymath train --config {killed / CONFIG_FILE} --out {killed} --overwrite"
    assert result.exit_code == 1 and "no checkpoint to resume from" in result.stderr
    assert again in result.stderr.replace("\n", ""), result.stderr
    with run_lock(killed):  # not killed but still training: the advice would be wrong, the lock is named
        result = run_cli("train", "--resume", killed)
    assert result.exit_code == 1 and "another training run" in result.stderr and "--overwrite" not in result.stderr
    assert run_cli(*again.split()[1:]).exit_code == 0 and (killed / "run.json").is_file()
    result = run_cli("train", "--resume", out, "--dry-run")  # the dry run says the run would refuse
    assert result.exit_code == 1 and "kept no checkpoint to continue from" in result.stderr


def test_accuracy_while_training_keep_best_and_curves(tiny_model, gsm8k_dir, tmp_path):
    out = tmp_path / "run"
    result = _train(tiny_model, gsm8k_dir, out, "--max-steps", "4", "--val-size", "2", "--eval-every", "2",
                    "--eval-limit", "2", "--keep", "best", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    assert (out / "best" / "adapter_model.safetensors").exists()
    assert not (out / "best" / "README.md").exists()  # one model card, the run folder's: no blank template
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(result.stdout)
    assert summary["best_step"] in (2, 4) and summary["adapter_step"] == summary["best_step"]
    plain = _train(tiny_model, gsm8k_dir, tmp_path / "plain", "--max-steps", "2", "--json")
    assert json.loads(plain.stdout)["adapter_step"] == 2  # without --keep best: the last step's


def test_resume_puts_back_the_best_adapter_of_its_checkpoint(tiny_model, gsm8k_dir, tmp_path):
    """A best/ written after the checkpoint belongs to steps that run again: resuming restores the
    checkpoint's own copy, so --keep best never ships an adapter from a lost future."""
    out = tmp_path / "run"
    args = ("--max-steps", "4", "--save-every", "2", "--val-size", "2", "--eval-every", "1", "--eval-limit", "2",
            "--keep", "best", "--keep-checkpoints", "5")
    assert _train(tiny_model, gsm8k_dir, out, *args).exit_code == 0
    checkpoint = out / "checkpoints" / "step-000002"
    assert (checkpoint / "best" / "adapter_model.safetensors").is_file()
    (out / "best" / "from_a_lost_future").write_text("written after the checkpoint")
    (out / "run.json").unlink()  # as if stopped before the end: a finished run is not resumed
    result = run_cli("train", "--resume", out, "--json")
    assert result.exit_code == 0, result.output
    assert not (out / "best" / "from_a_lost_future").exists()
    summary = json.loads(result.stdout)
    assert summary["resumed_from_step"] == 2
    final = (out / "adapter_model.safetensors").read_bytes()
    assert final == (out / "best" / "adapter_model.safetensors").read_bytes()
    # a random model scores 0 at every step, so the first evaluation stays the best: the checkpoint's best is shipped
    assert summary["best_step"] == 1
    assert final == (checkpoint / "best" / "adapter_model.safetensors").read_bytes()

    # a checkpoint from before best/ was kept in checkpoints says nothing of it: best/ stays as it is
    state_file = checkpoint / "state.json"
    state = json.loads(state_file.read_text())
    del state["best_saved"]
    state_file.write_text(json.dumps(state))
    shutil.rmtree(checkpoint / "best")
    kept = (out / "best" / "adapter_model.safetensors").read_bytes()
    (out / "run.json").unlink()
    assert run_cli("train", "--resume", out, "--json").exit_code == 0
    assert (out / "best" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "run.json").read_text())["result"]["best_step"] == 1
    assert (out / "best" / "adapter_model.safetensors").read_bytes() == kept


_CONVERT = """
import json, sys, time
from pathlib import Path
from tinymath.lib import model

def slow_convert(gguf, target):  # stands in for the real conversion: slow, and counted
    with open(sys.argv[2], "a") as log:
        log.write("converted\\n")
    time.sleep(3)
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return target

model._convert = slow_convert
with open(sys.argv[3], "a") as ready:  # both processes ask at the same moment
    ready.write("ready\\n")
deadline = time.time() + 60
while open(sys.argv[3]).read().count("ready") < 2 and time.time() < deadline:
    time.sleep(0.01)
print(model.gguf_to_folder(Path(sys.argv[1])))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_processes_started_together_convert_a_gguf_once(tmp_path):
    """`accelerate launch` starts every process at once: one converts the GGUF, the others wait for
    it and use its folder (none may read a folder being written)."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    log = tmp_path / "conversions.txt"
    env = {**os.environ, "TINYMATH_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, "-c", _CONVERT, str(gguf), str(log), str(tmp_path / "ready.txt")]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    folders = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert folders[0] == folders[1] and (Path(folders[0]) / "config.json").is_file()
    assert log.read_text().count("converted") == 1


def test_a_converted_gguf_loads_from_a_read_only_cache(tmp_path, monkeypatch):
    """Once the cache holds the conversion, finding it writes nothing (no lock file either)."""
    from tinymath.lib import model

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.setenv("TINYMATH_CACHE", str(tmp_path / "cache"))
    done = tmp_path / "cache" / "gguf" / f"other-name-{model._quick_digest(gguf)}"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    monkeypatch.setattr(model, "_converting", None)  # taking the lock would fail
    assert model.gguf_to_folder(gguf) == done


def test_an_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch):
    from tinymath.base.errors import TinymathError
    from tinymath.lib.model import gguf_to_folder

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TINYMATH_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be created
    with pytest.raises(TinymathError, match="TINYMATH_CACHE"):
        gguf_to_folder(gguf)


def test_an_unreachable_hub_fails_at_once_with_one_message(tmp_path):
    """Offline, a hub id that is not cached (a typo, say) ends with one message naming the cause,
    instead of the libraries retrying the network for most of a minute; nothing is written."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="https://hub.invalid", HF_HOME=str(tmp_path / "hf"))  # .invalid never resolves
    for args in (["eval", "--model", "nobody/no-such-model", "--data", str(Path(__file__).parent / "fixtures" / "gsm8k"),
                  "--out", str(tmp_path / "ev")],
                 ["prepare-data", "--data", "nobody/no-such-data", "--out", str(tmp_path / "prep")]):
        done = subprocess.run([sys.executable, "-m", "tinymath", *args], capture_output=True, text=True, env=env,
                              timeout=300, check=False)
        assert done.returncode == 1, done.stderr[-2000:]
        assert "hub.invalid cannot be reached from this machine" in done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "ev").exists() and not (tmp_path / "prep").exists()


def test_the_hub_probe_respects_the_users_choices(monkeypatch):
    """HF_HUB_OFFLINE set, or a proxy in the way: no probe, no change; unreachable: offline mode on,
    in the environment and in huggingface_hub's already imported setting."""
    import huggingface_hub.constants

    from tinymath.lib import hub

    monkeypatch.setattr(hub, "_OFFLINE_BY_US", [])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub.offline_unless_reachable()  # the user's own setting: nothing probed
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert not hub.offline_unless_reachable() and "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.delenv("HTTPS_PROXY")
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert hub.offline_unless_reachable()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert "hub.invalid cannot be reached" in hub.unreachable_hint()


def test_a_gguf_exported_again_with_other_weights_is_converted_again(tmp_path):
    """The converted-GGUF cache is keyed by the file's size, its ends and pieces of its middle: a file
    whose first and last 4 MiB did not change (embeddings, output layer) but whose layers did is
    not mistaken for the one converted before; a copy of the same file is."""
    from tinymath.lib.model import _quick_digest

    ends = os.urandom(4 << 20)
    one, other, copy = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    one.write_bytes(ends + os.urandom(4 << 20) + ends)
    other.write_bytes(ends + os.urandom(4 << 20) + ends)
    shutil.copy(one, copy)
    assert _quick_digest(one) != _quick_digest(other)
    assert _quick_digest(one) == _quick_digest(copy)


def test_a_resume_with_more_steps_follows_the_longer_schedule(tiny_model, gsm8k_dir, tmp_path):
    """Resumed with a larger --max-steps, the steps after the checkpoint take the longer run's
    learning rates from the first one on (not one more at the old schedule's rate)."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert _train(tiny_model, gsm8k_dir, straight, "--max-steps", "8").exit_code == 0
    assert _train(tiny_model, gsm8k_dir, cut, "--max-steps", "4", "--save-every", "2").exit_code == 0
    result = run_cli("train", "--resume", cut, "--max-steps", "8")
    assert result.exit_code == 0, result.output
    assert "finished at step 4; its last checkpoint is at step 2, so steps 3-4 run again" in result.stderr
    before = {p.name: p.read_bytes() for p in cut.iterdir() if p.is_file()}
    again = run_cli("train", "--resume", cut)  # finished, and nothing asks for more steps: refused, untouched
    assert again.exit_code == 1 and "has finished its 8 steps" in again.stderr, again.output
    assert {p.name: p.read_bytes() for p in cut.iterdir() if p.is_file()} == before

    def rates(out):
        return [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert rates(cut)[2:] == pytest.approx(rates(straight)[2:], rel=1e-9)


def test_settings_that_would_be_ignored_are_refused_or_followed(tiny_model, gsm8k_dir, tmp_path):
    """--val-size on already-prepared data (it would hold nothing out) is refused; --epochs on the
    resume of a run that had a step count is followed."""
    from tinymath.base.config import resolve_train_config

    prep = tmp_path / "prep"
    assert run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", prep).exit_code == 0
    result = _train(tiny_model, prep, tmp_path / "run", "--val-size", "2", "--eval-every", "1")
    assert result.exit_code == 1 and "already prepared" in result.stderr, result.output
    run = tmp_path / "saved"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"data": str(gsm8k_dir), "model": str(tiny_model),
                                                      "method": "grpo", "max_steps": 80, "epochs": 3.0}))
    assert resolve_train_config({"epochs": 20.0}, resume=str(run)).max_steps is None
    assert resolve_train_config({}, resume=str(run)).max_steps == 80


def test_a_damaged_gguf_is_named_as_given(tmp_path, monkeypatch):
    """A file that is not GGUF, or one cut short, is one message naming the user's file (not the
    folder it is read from), and the cache gets no folder for it."""
    monkeypatch.setenv("TINYMATH_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    result = run_cli("chat", "--model", fake, "--question", "hi")
    assert result.exit_code == 1 and f"could not read {fake} as a GGUF model" in result.stderr
    assert "tinymath-gguf-" not in result.stderr and f"{fake} does not start with the GGUF magic" in result.stderr
    assert not list((tmp_path / "cache" / "gguf").glob("fake-*"))


def test_the_cache_keeps_the_most_recently_used_gguf_conversions(tmp_path, monkeypatch):
    """Each conversion is the model in fp32 (0.5 GB for SmolLM2, 4 GB for TinyLlama): a new one
    leaves the GGUF_KEPT most recently used (using one counts as recent; one used within the hour is
    spared, another process may be loading it), and clears a conversion that died half-written."""
    import json

    from tinymath.lib import model

    monkeypatch.setenv("TINYMATH_CACHE", str(tmp_path / "cache"))

    def fake_convert(gguf, target):
        target.mkdir(parents=True)
        (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
        return target

    monkeypatch.setattr(model, "_convert", fake_convert)
    files = []
    for i in range(model.GGUF_KEPT + 1):
        gguf = tmp_path / f"m{i}.gguf"
        gguf.write_bytes(b"GGUF" + bytes([i]) * 4096)
        files.append(gguf)
    folders = []
    for i, gguf in enumerate(files[:model.GGUF_KEPT]):
        folders.append(model.gguf_to_folder(gguf))
        os.utime(folders[-1], (1_000_000 + i, 1_000_000 + i))  # converted in this order, long ago
    assert model.gguf_to_folder(files[0]) == folders[0]  # used again: now the most recent
    dead = tmp_path / "cache" / "gguf" / ".m9-0123.abcd.partial"  # a conversion killed long ago
    dead.mkdir()
    os.utime(dead, (1_000_000, 1_000_000))
    newest = model.gguf_to_folder(files[-1])
    left = {p for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.startswith(".")}
    assert left == {folders[0], *folders[2:], newest} and len(left) == model.GGUF_KEPT
    assert not dead.exists() and list((tmp_path / "cache" / "gguf").glob(".*.lock"))  # locks stay
    os.utime(folders[2], None)  # in use a moment ago: spared though beyond the kept count
    extra = tmp_path / "m-extra.gguf"
    extra.write_bytes(b"GGUF" + b"x" * 4096)
    model.gguf_to_folder(extra)
    assert folders[2].exists()


def test_ctrl_c_under_two_processes_is_reported_once_with_the_launch_that_resumes(tiny_model, gsm8k_dir, tmp_path):
    """Ctrl-C reaches every process of a launch: the stop is said once (the first process's), and
    the command it gives to continue is the two-process launch a resume needs."""
    import os

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tinymath",
           "train", "--data", str(gsm8k_dir), "--model", str(tiny_model), "--out", str(out), *COMMON,
           "--max-steps", "200", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for_steps(out, 2, timeout=180)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the launcher and both processes
    _, stderr = proc.communicate(timeout=120)
    ours = stderr.split("Traceback")[0]  # the launcher's own report of the signal follows
    assert ours.count("stopped by SIGINT after step") == 1, stderr[-3000:]
    assert f"Continue with: accelerate launch --multi_gpu --num_processes 2 -m tinymath train --resume {out}" in \
        " ".join(ours.split())
    assert "interrupted" not in ours
    assert list((out / "checkpoints").glob("step-*/adapter_model.safetensors"))
