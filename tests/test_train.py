"""train: the loss falls, packing computes the same losses as padding, the run folder is complete,
bad flags are refused."""

import json
from pathlib import Path

import pytest
from conftest import run_cli

from tinymath import train
from tinymath.base.config import TrainConfig


def _config(tiny_model, gsm8k_dir, out, **kw):
    base = dict(data=str(gsm8k_dir), model=str(tiny_model), out=str(out), quant="none", batch_size=4,
                lr=1e-2, warmup=0, lora_r=8, lora_alpha=16, lora_dropout=0.0, max_steps=20)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_when_overfitting(tiny_model, gsm8k_dir, tmp_path):
    train(_config(tiny_model, gsm8k_dir, tmp_path / "run", max_steps=30))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_packed_losses_equal_padded_losses(tiny_model, gsm8k_dir, tmp_path):
    """The fast path (padding-free packing) computes the same thing as the plain padded path:
    the first 20 losses agree to 1e-4 relative (fp32 on CPU; only summation order differs)."""
    train(_config(tiny_model, gsm8k_dir, tmp_path / "packed", packing=True, batch_size=2, grad_accum=2))
    train(_config(tiny_model, gsm8k_dir, tmp_path / "padded", packing=False, batch_size=2, grad_accum=2))
    packed, padded = _losses(tmp_path / "packed"), _losses(tmp_path / "padded")
    assert len(packed) == len(padded) == 20
    for a, b in zip(packed, padded):
        assert a == pytest.approx(b, rel=1e-4)


def test_compiled_layers_compute_the_same_losses(tiny_model, gsm8k_dir, tmp_path):
    """--compile (the default on a GPU) changes speed, not math: the same losses as the plain padded
    path, fp32 on CPU, 1e-4 relative."""
    import torch._dynamo

    torch._dynamo.utils.counters.clear()
    summary = train(_config(tiny_model, gsm8k_dir, tmp_path / "compiled", compile=True, max_steps=6))
    assert summary["compiled"] is True
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the layers really went through Dynamo
    train(_config(tiny_model, gsm8k_dir, tmp_path / "padded", packing=False, max_steps=6))
    compiled, padded = _losses(tmp_path / "compiled"), _losses(tmp_path / "padded")
    assert len(compiled) == 6
    for a, b in zip(compiled, padded):
        assert a == pytest.approx(b, rel=1e-4)
    run = json.loads((tmp_path / "compiled" / "run.json").read_text())
    assert run["result"]["compiled"] is True
    # where the time went: compiling is counted apart (and only in the run that compiled)
    assert 0 < run["result"]["compile_seconds"] <= run["result"]["train_seconds"]
    assert json.loads((tmp_path / "padded" / "run.json").read_text())["result"]["compile_seconds"] == 0
    # and set-up by phase: loading the model is one of them, and the phases add up to the whole
    phases = run["result"]["setup_phases"]
    assert phases["model"] > 0 and {"data", "plan", "prepare"} <= set(phases)
    assert sum(phases.values()) == pytest.approx(run["result"]["setup_seconds"], abs=0.05 * len(phases))
    assert run["result"]["process_start_to_setup_seconds"] > 0  # imports and checks, before set-up


def test_run_folder_is_enough_for_later_commands(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    import os

    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # paths given relative to where train runs ...
    result = run_cli("train", "--data", os.path.relpath(gsm8k_dir), "--model", os.path.relpath(tiny_model),
                     "--out", "run", "--max-steps", 2, "--batch-size", 2, "--quant", "nf4", "--format", "instruction",
                     "--system-prompt", "Solve it.", "--val-size", 2, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "run.json"):
        assert (out / name).exists(), name
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == str(tiny_model) and run["quant"] == "nf4"
    assert run["out"] == summary["out"] == str(out)  # "run" as given, recorded absolute
    card = (out / "README.md").read_text()  # a model card saying what this is, not PEFT's blanks
    assert "More Information Needed" not in card and str(tiny_model) in card
    assert "base_model:" not in card  # a local base: the hub would refuse a card naming a path there
    assert "2 steps" in card and "tinymath eval --adapter RUN" in card
    assert run["format"] == "instruction" and run["system_prompt"] == "Solve it."
    defaults = TrainConfig()  # unset options are recorded with their defaults
    assert run["lora_r"] == defaults.lora_r and run["lr"] == defaults.lr and run["target_modules"] == "all-linear"
    assert run["calc_annotations"] == "keep"
    assert "torch" in run["versions"]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "tokens_per_s", "val_loss"} <= set(last)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # ... are saved absolute: the run folder works from any folder
    result = run_cli("chat", "--adapter", out, "--question", "What is 2 + 2?", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("flag, value, message", [
    ("--lora-r", "0", "--lora-r 0"),
    ("--lr", "-1", "--lr -1"),
    ("--max-steps", "0", "--max-steps 0"),
    ("--micro-batch-tokens", "8", "is smaller than the longest training example"),  # could not keep to it
    # PEFT would quietly skip the misspelt name and train q_proj alone
    ("--target-modules", "q_proj,v_prj", "the model has no layer named v_prj; its layers with weight matrices are "
                                         "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, "
                                         "v_proj"),
])
def test_bad_flags(tiny_model, gsm8k_dir, tmp_path, flag, value, message):
    out = tmp_path / "run"
    for dry_run in ((), ("--dry-run",)):  # a dry run refuses what the run would
        result = run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--out", out, flag, value, *dry_run)
        assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output
        assert not out.exists()


def test_a_missing_data_path_is_named_before_the_model_is_looked_for(tmp_path):
    """A mistyped local --data is the message, also with a hub model that is not cached (looking for
    it would come first, and offline it would be the error instead); --dry-run says the same."""
    out = tmp_path / "run"
    for extra in ((), ("--dry-run",)):
        result = run_cli("train", "--data", tmp_path / "gsm8k", "--model", "nobody/not-cached-model", "--out", out,
                         *extra)
        assert result.exit_code == 1 and f"--data {tmp_path / 'gsm8k'} does not exist" in result.stderr
        assert not out.exists()
        (tmp_path / "empty.jsonl").write_text("")  # there, but nothing to train on: also said first
        result = run_cli("train", "--data", tmp_path / "empty.jsonl", "--model", "nobody/not-cached-model", "--out",
                         out, *extra)
        assert result.exit_code == 1 and f"--data {tmp_path / 'empty.jsonl'} is empty" in result.stderr
        assert not out.exists()


def test_a_dry_run_refuses_a_tracker_that_is_not_installed(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    import tinymath.base.config

    monkeypatch.setitem(tinymath.base.config.REPORTERS, "tensorboard", "no_such_tracker_module")
    result = run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--out", tmp_path / "run",
                     "--report-to", "tensorboard", "--dry-run")
    assert result.exit_code == 1 and "no_such_tracker_module is not installed" in result.stderr


def test_prepared_data_brings_its_model_unless_one_is_given(tiny_model, gsm8k_dir, tmp_path):
    """Data tokenized for one model trains no other, so --model defaults to the one prepare-data used
    (a hub default that is not cached here would fail); a --model given still wins."""
    prep = tmp_path / "prep"
    assert run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", prep).exit_code == 0
    result = run_cli("train", "--data", prep, "--out", tmp_path / "run", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["model"] == str(Path(tiny_model).absolute())
    result = run_cli("train", "--data", prep, "--model", tmp_path / "other", "--out", tmp_path / "run", "--dry-run")
    assert result.exit_code == 1 and "other does not exist" in result.stderr
    manifest = json.loads((prep / "prepare.json").read_text())
    (prep / "prepare.json").write_text(json.dumps({**manifest, "model": str(tmp_path / "moved")}))
    result = run_cli("train", "--data", prep, "--out", tmp_path / "run", "--dry-run")  # its model moved away
    assert result.exit_code == 1 and f"was prepared for {tmp_path / 'moved'}, which is no longer there" in result.stderr


def test_existing_out_is_not_destroyed(tiny_model, gsm8k_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--out", out, "--max-steps", 1,
                     "--overwrite")
    assert result.exit_code == 1 and "replaces only those" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_processes_get_shares_even_in_tokens():
    """Several processes split a step's examples so that none waits long for another at the gradient
    exchange: every example in exactly one share, in the step's order, token sums within one example."""
    import random

    from tinymath.lib.batching import process_examples

    rng = random.Random(0)
    examples = [{"input_ids": [0] * rng.randint(60, 400), "n": i} for i in range(64)]
    assert process_examples(examples, 0, 1) is examples
    for processes in (2, 3, 8):
        shares = [process_examples(examples, p, processes) for p in range(processes)]
        assert sorted(ex["n"] for share in shares for ex in share) == list(range(64))
        assert all([ex["n"] for ex in share] == sorted(ex["n"] for ex in share) for share in shares)
        sums = [sum(len(ex["input_ids"]) for ex in share) for share in shares]
        assert max(sums) - min(sums) <= 400
        # never more examples than an even split: the CUDA graphs hold that many
        assert max(len(share) for share in shares) == -(-64 // processes)
    # interleaving (every 2nd example) would leave these two shares 3,000 tokens apart
    skewed = [{"input_ids": [0] * (1000 if i % 2 == 0 else 100)} for i in range(8)]
    assert [sum(len(ex["input_ids"]) for ex in process_examples(skewed, p, 2)) for p in (0, 1)] == [2200, 2200]
    # one long example and many short ones: the short ones do not all pile onto one share
    lopsided = [{"input_ids": [0] * n} for n in (100, 100, 100, 480, 100, 100, 100, 100)]
    assert [len(process_examples(lopsided, p, 2)) for p in (0, 1)] == [4, 4]


def test_gpu_check_counts_this_machines_processes_only():
    """Two machines of 2 GPUs each run 4 processes in all, 2 here: accepted; 3 here: refused."""
    from tinymath import TinymathError
    from tinymath.lib.distributed import check_gpus

    check_gpus(local_processes=2, gpus=2)
    with pytest.raises(TinymathError, match="3 processes on this machine"):
        check_gpus(local_processes=3, gpus=2)


def test_two_processes_train_like_one_with_the_same_global_batch(tiny_model, gsm8k_dir, tmp_path):
    """Data parallel under torch.distributed (two CPU processes, gloo): the same losses step for step
    as one process taking both shares, one run folder, one report."""
    import os
    import subprocess
    import sys

    common = ["train", "--data", str(gsm8k_dir), "--model", str(tiny_model), "--quant", "none", "--lr", "0.02",
              "--warmup", "0", "--lora-r", "8", "--max-steps", "3", "--json"]
    one = run_cli(*common, "--batch-size", "4", "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "tinymath", *common, "--batch-size", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count('"steps"') == 1  # one report, from rank 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").open()] for d in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["num_processes"] == 2


def _launch(node: int, nodes: int, port: int, *args):
    """``torch.distributed.run`` for one "machine" of a run on localhost (one CPU process, gloo)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node),
           "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "tinymath", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_train_like_one_process(tiny_model, gsm8k_dir, tmp_path):
    """A launch over two machines (two launcher invocations, --nnodes 2, each with one process) is
    not refused, writes one run folder and one report, and takes the same steps as one process."""
    common = ["train", "--data", str(gsm8k_dir), "--model", str(tiny_model), "--quant", "none", "--lr", "0.02",
              "--warmup", "0", "--lora-r", "8", "--max-steps", "3", "--json"]
    one = run_cli(*common, "--batch-size", "4", "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    port = _free_port()
    nodes = [_launch(n, 2, port, *common, "--batch-size", "2", "--out", str(tmp_path / "two")) for n in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert [out.count('"steps"') for out, _ in outputs] == [1, 0]  # one report, from the first machine
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").open()] for d in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["num_processes"] == 2


def test_two_processes_resume_exactly_and_only_as_two(tiny_model, gsm8k_dir, tmp_path):
    """Each process's random numbers are saved and put back (LoRA dropout differs per process), so a
    two-process run resumed from its step-2 checkpoint retakes steps 3-4 exactly; resuming it with
    one process is refused (the global batch and the data position depend on the count)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tinymath"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*launch, "train", "--data", str(gsm8k_dir), "--model", str(tiny_model), "--quant", "none",
                            "--lr", "0.02", "--warmup", "0", "--lora-r", "8", "--lora-dropout", "0.1", "--batch-size",
                            "2", "--max-steps", "4", "--save-every", "2", "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    whole = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]
    assert sorted(p.name for p in (out / "checkpoints" / "step-000002").glob("rng*.pt")) == ["rng-rank1.pt",
                                                                                                 "rng.pt"]
    (out / "run.json").unlink()  # as if stopped before the end: a finished run is not resumed
    logged = (out / "metrics.jsonl").read_text()
    alone = run_cli("train", "--resume", out)
    assert alone.exit_code == 1 and "trained with 2 process(es)" in alone.stderr, alone.output
    assert (out / "metrics.jsonl").read_text() == logged  # the refusal changed nothing
    again = subprocess.run([*launch, "train", "--resume", str(out)], capture_output=True, text=True, env=env,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()] == pytest.approx(whole, rel=1e-5)


def test_fewer_examples_than_processes_is_refused_not_a_hang(tiny_model, gsm8k_dir, tmp_path):
    """One training example, two processes: one of them would have nothing to train on and wait on
    the other's gradients forever. Refused at once, nothing written."""
    import os
    import subprocess
    import sys

    data = tmp_path / "one"
    data.mkdir()
    (data / "train.jsonl").write_text((gsm8k_dir / "train.jsonl").read_text().splitlines()[0] + "\n")
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tinymath"]
    done = subprocess.run([*launch, "train", "--data", str(data), "--model", str(tiny_model), "--quant", "none",
                           "--max-steps", "2", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode != 0
    assert "1 training example(s), fewer than the 2 processes launched" in done.stderr, done.stderr[-2000:]
    assert not out.exists()


def test_when_the_first_machine_cannot_claim_the_folder_every_machine_says_so(tiny_model, gsm8k_dir, tmp_path):
    """The run folder is locked by another run: both machines (sharing the folder here) refuse at
    their first check, naming the lock, instead of a traceback or a wait on the first. (A lock taken
    between the check and the claim is the main process's refusal, which the other learns.)"""
    from tinymath.base.runs import run_lock

    out = tmp_path / "run"
    args = ["train", "--data", str(gsm8k_dir), "--model", str(tiny_model), "--quant", "none", "--max-steps", "2",
            "--batch-size", "2", "--out", str(out)]
    with run_lock(out):
        port = _free_port()
        nodes = [_launch(n, 2, port, *args) for n in (0, 1)]
        errors = [node.communicate(timeout=240)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [1, 1], errors
    assert "error: another training run" in errors[0]
    assert "error: another training run" in errors[1], errors[1][-2000:]
    ours = [err.split("torch/distributed/elastic")[0] for err in errors]  # before the launcher's own report
    assert not any("Traceback" in err for err in ours), ours


def _claim_refused_on_rank_0(rank: int, port: int, said) -> None:
    """One of two gloo processes: the main one could not claim the run folder (a lock taken between
    the check and the claim), the other could have; what each is told."""
    import os

    from tinymath import TinymathError
    from tinymath.lib.distributed import process_state
    from tinymath.services.train import _agree_on_claim

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    refusal = TinymathError("another training run (pid 1) is writing to run") if rank == 0 else None
    state = process_state()
    try:
        _agree_on_claim(state, refusal)
    except TinymathError as exc:
        said.put((rank, str(exc)))
    else:
        said.put((rank, None))
    finally:  # closed before the interpreter exits: gloo's threads left running abort it at times
        state.destroy_process_group()


def test_a_claim_the_main_process_lost_stops_every_process_with_its_reason():
    """The lock can be taken between the check every process makes and the main process's claim:
    then the main process says why, and the other stops naming it, instead of training alone."""
    import torch.multiprocessing as mp

    said = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_claim_refused_on_rank_0, args=(_free_port(), said), nprocs=2, start_method="spawn")
    told = dict(said.get() for _ in range(2))
    assert told[0] == "another training run (pid 1) is writing to run"
    assert told[1] == "the run's main process could not start it: another training run (pid 1) is writing to run"


def test_a_folder_one_machine_lacks_stops_both_machines_with_its_reason(tiny_model, gsm8k_dir, tmp_path):
    """Every process joins the launch before it checks its files: a machine without the data says
    so, and the other stops at once naming that reason, instead of waiting to meet it (train, and
    eval likewise)."""
    missing = tmp_path / "not-on-this-machine"
    for lacking in (1, 0):
        for command in (["train", "--model", str(tiny_model), "--quant", "none", "--max-steps", "2", "--batch-size",
                         "2", "--out", str(tmp_path / f"run{lacking}")],
                        ["eval", "--model", str(tiny_model), "--limit", "2", "--max-new-tokens", "4"]):
            port = _free_port()
            nodes = [_launch(n, 2, port, *command, "--data", str(missing if n == lacking else gsm8k_dir))
                     for n in (0, 1)]
            errors = [node.communicate(timeout=240)[1] for node in nodes]
            assert [node.returncode for node in nodes] == [1, 1], errors
            said = f"--data {missing} does not exist"
            assert said in errors[lacking]
            assert f"process {lacking} of this launch refused to start ({said}" in errors[1 - lacking], errors
            ours = [err.split("torch/distributed/elastic")[0] for err in errors]
            assert not any("Traceback" in err for err in ours), ours
        assert not (tmp_path / f"run{lacking}").exists()


def test_machines_that_read_different_problems_stop_before_evaluating(tiny_model, gsm8k_dir, tmp_path):
    """The same --data path holding other GSM8K lines on another machine (or a default data folder
    one machine lacks): each machine would score its share of other problems; both stop, saying so."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(gsm8k_dir, other)
    lines = (other / "test.jsonl").read_text().splitlines()
    (other / "test.jsonl").write_text("\n".join(reversed(lines)) + "\n")  # the same count, another order
    port = _free_port()
    nodes = [_launch(n, 2, port, "eval", "--model", str(tiny_model), "--limit", "2", "--max-new-tokens", "4",
                     "--out", str(tmp_path / "ev"), "--data", str(other if n == 1 else gsm8k_dir)) for n in (0, 1)]
    errors = [node.communicate(timeout=240)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [1, 1], errors
    assert all("read different problems" in " ".join(err.split()) for err in errors), errors
    assert not (tmp_path / "ev").exists()


def test_a_config_file_or_dry_run_data_one_machine_lacks_stops_both_machines(tiny_model, gsm8k_dir, tmp_path):
    """The settings file (and a run's run.json for --resume) is read after every process joins, and
    so is what a dry run reads: a machine without it says so, and the other stops naming it."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'model = "{tiny_model}"\nquant = "none"\nmax_steps = 2\nbatch_size = 2\n')
    missing = tmp_path / "not-on-this-machine"
    cases = [(lambda n: ["train", "--data", str(gsm8k_dir), "--out", str(tmp_path / "run"),
                         "--config", str(missing if n == 1 else recipe)], f"--config {missing} does not exist"),
             (lambda n: ["train", "--model", str(tiny_model), "--out", str(tmp_path / "dry"), "--dry-run",
                         "--data", str(missing if n == 1 else gsm8k_dir)], f"--data {missing} does not exist")]
    for command, said in cases:
        port = _free_port()
        nodes = [_launch(n, 2, port, *command(n)) for n in (0, 1)]
        outputs = [node.communicate(timeout=240) for node in nodes]
        errors = [err for _, err in outputs]
        assert [node.returncode for node in nodes] == [1, 1], errors
        assert said in errors[1], errors[1][-2000:]
        assert f"process 1 of this launch refused to start ({said}" in errors[0], errors[0][-2000:]
        assert not any("Traceback" in err.split("torch/distributed/elastic")[0] for err in errors), errors
        assert outputs[0][0].strip() == "", outputs[0][0]  # no dry-run report from the machine that could read
    assert not (tmp_path / "run").exists() and not (tmp_path / "dry").exists()


def test_a_setting_every_process_refuses_is_said_once(tiny_model, gsm8k_dir, tmp_path):
    """Two processes on one machine refusing the same setting: one message, not one a process."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tinymath", "train", "--data", str(gsm8k_dir), "--model", str(tiny_model),
                           "--lr", "-1", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert done.returncode != 0
    assert done.stderr.count("--lr -1.0 must be positive") == 1, done.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_launch_that_started_one_process_of_several_is_refused(tiny_model, gsm8k_dir, tmp_path):
    """``accelerate launch --num_processes 2`` without --multi_gpu, on a machine with fewer than two
    GPUs, runs one plain process (it sets the rendezvous address, no WORLD_SIZE): refused, with
    the flag that launches them all, instead of a quiet one-process run; also where a job script
    had set MASTER_ADDR itself (SLURM's habit), and with --cpu, whose fix is another. A one-process
    launch from such a script is no one-of-several launch: it runs."""
    import os
    import subprocess
    import sys

    import torch

    args = ["-m", "tinymath", "train", "--data", str(gsm8k_dir), "--model", str(tiny_model), "--out",
            str(tmp_path / "run"), "--dry-run", "--json"]

    def launch(*options, script_address=False):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if script_address:
            env["MASTER_ADDR"] = "127.0.0.1"
        return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *options, *args],
                              capture_output=True, text=True, timeout=240, env=env)

    if torch.cuda.device_count() < 2:  # with two GPUs accelerate starts both by itself
        for launched in (launch("--num_processes", "2"), launch("--num_processes", "2", script_address=True),
                         launch("--num-processes=2", script_address=True)):  # accelerate takes either spelling
            assert launched.returncode != 0 and "add --multi_gpu to the launch" in launched.stderr, \
                launched.stderr[-2000:]
        on_cpu = launch("--cpu", "--num_processes", "2")
        assert on_cpu.returncode != 0 and "--cpu starts one process whatever --num_processes says; for several " \
            "CPU processes use torchrun" in on_cpu.stderr, on_cpu.stderr[-2000:]
        assert not (tmp_path / "run").exists()
    alone = launch("--num_processes", "1", script_address=True)
    assert alone.returncode == 0, alone.stderr[-2000:]


def test_a_dry_run_under_two_processes_counts_both_and_reports_once(tiny_model, gsm8k_dir, tmp_path):
    import os
    import subprocess
    import sys

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tinymath"]
    done = subprocess.run([*launch, "train", "--data", str(gsm8k_dir), "--model", str(tiny_model), "--batch-size", "2",
                           "--out", str(tmp_path / "run"), "--dry-run", "--json"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["examples_per_step"] == 4


def test_a_process_that_dies_ends_the_others_promptly_with_one_message(tiny_model, gsm8k_dir, tmp_path):
    """Killing the process of one machine mid-run: the other machine's process exits within seconds
    with one tinymath message (not a traceback), instead of waiting on a collective."""
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    args = ["train", "--data", str(gsm8k_dir), "--model", str(tiny_model), "--quant", "none", "--max-steps", "100000",
            "--batch-size", "2", "--log-every", "1", "--out", str(out)]
    port = _free_port()
    nodes = [_launch(n, 2, port, *args) for n in (0, 1)]
    started = time.time()
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):  # training has begun
        assert time.time() - started < 240 and nodes[0].poll() is None, "the run did not start"
        time.sleep(0.2)
    worker = int(subprocess.run(["pgrep", "-P", str(nodes[1].pid)], capture_output=True, text=True,
                                check=True).stdout.split()[0])
    os.kill(worker, signal.SIGKILL)
    killed = time.time()
    _, err = nodes[0].communicate(timeout=120)
    nodes[1].communicate(timeout=120)
    assert nodes[0].returncode != 0 and time.time() - killed < 30
    tinymath_lines = [line for line in err.splitlines() if "rank0" in line or line.startswith("error:")]
    assert any(line.startswith("error: another process of this run stopped") for line in tinymath_lines), err[-3000:]
    assert not any("Traceback" in line for line in tinymath_lines)  # the launcher's own report may follow


def test_reported_tokens_per_second_is_the_steps_rate(tiny_model, gsm8k_dir, tmp_path):
    """The summary's tokens/s is the rate the progress bar and metrics show over the steps, not
    diluted by the end-of-run validation pass."""
    result = run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--out", tmp_path / "run", "--quant", "none",
                     "--batch-size", "2", "--max-steps", "3", "--val-size", "2", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    rate = sum(r["tokens"] for r in rows) / sum(r["tokens"] / r["tokens_per_s"] for r in rows)
    assert json.loads(result.stdout)["real_tokens_per_s"] == pytest.approx(rate, rel=0.01)
    assert json.loads(result.stdout)["val_loss"] == rows[-1]["val_loss"] > 0  # the held-out loss is reported


def test_the_done_line_reports_the_held_out_loss(tiny_model, gsm8k_dir, tmp_path):
    result = run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--out", tmp_path / "run", "--quant", "none",
                     "--batch-size", "2", "--max-steps", "2", "--val-size", "2")
    assert result.exit_code == 0, result.output
    val_loss = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    assert f"validation loss {val_loss:.4f}" in result.stdout


def test_the_done_line_counts_one_step_as_one(tiny_model, gsm8k_dir, tmp_path):
    result = run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--out", tmp_path / "run", "--quant", "none",
                     "--batch-size", "2", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert "done: 1 step, final loss" in result.stdout


def test_only_a_lost_process_is_reported_as_one():
    """A collective that failed because a peer's connection closed becomes the one message; any
    other error (a local bug, a mismatch every process hits) keeps its own type and traceback."""
    from tinymath import TinymathError
    from tinymath.lib.distributed import peers_lost_as_error

    with pytest.raises(TinymathError, match="another process of this run stopped.*resume"):
        with peers_lost_as_error(2, lambda: "resume with ..."):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    for processes, message in ((2, "ProcessGroupGloo: size mismatch in allreduce"), (2, "Triton kernel timed out"),
                               (1, "Connection reset by peer")):
        with pytest.raises(RuntimeError, match=message.split()[0]):
            with peers_lost_as_error(processes):
                raise RuntimeError(message)


def test_a_model_with_soft_capped_logits_is_refused_for_packing(tiny_model, gsm8k_dir, tmp_path):
    """Packed training computes plain logits and attention: a model that soft-caps them (Gemma 2)
    would learn another objective, so packing is refused with the fix (--no-packing)."""
    import shutil

    capped = tmp_path / "capped"
    shutil.copytree(tiny_model, capped)
    config = json.loads((capped / "config.json").read_text())
    config["final_logit_softcapping"] = 30.0
    (capped / "config.json").write_text(json.dumps(config))
    args = ["train", "--data", gsm8k_dir, "--model", capped, "--quant", "none", "--max-steps", "1", "--batch-size", "2"]
    result = run_cli(*args, "--out", tmp_path / "packed")
    assert result.exit_code == 1 and "--no-packing" in result.stderr and not (tmp_path / "packed").exists()


def test_target_modules_are_checked_as_peft_matches_them():
    """Any layer PEFT would find passes (an embedding; GPT-2's Conv1D projections), by its name or a
    dotted tail of it; a name no layer has is refused with the names there are."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from tinymath.base.errors import TinymathError
    from tinymath.lib.lora import check_target_modules

    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    check_target_modules(llama, ["embed_tokens", "self_attn.q_proj", "v_proj"])
    check_target_modules(gpt2, ["c_attn", "c_proj"])
    check_target_modules(gpt2, "all-linear")
    with pytest.raises(TinymathError, match="no layer named q_proj; its layers with weight matrices are .*c_attn"):
        check_target_modules(gpt2, ["c_attn", "q_proj"])


@pytest.mark.skipif(not __import__("bitsandbytes.functional").functional.has_avx512bf16(),
                    reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
def test_training_after_an_eval_mode_call_gets_the_same_gradients(tiny_model):
    """Validation runs the training model in eval mode. On a CPU with AVX512-BF16, bitsandbytes
    would then repack the 4-bit weights for a bf16 kernel without gradients and keep them so, and
    the training steps after it would get wrong gradients: the layers keep their trainable layout."""
    import torch

    from tinymath.lib.lora import attach_lora, get_lora_config
    from tinymath.lib.model import load_base_model

    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])

    def gradients(validate_first: bool) -> dict:
        torch.manual_seed(0)
        model = attach_lora(load_base_model(str(tiny_model), "nf4", dtype=torch.float32, device="cpu"),
                            get_lora_config(8, 16, 0.0, "all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        if validate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, after = gradients(False), gradients(True)
    assert plain.keys() == after.keys() and plain
    assert all(torch.allclose(plain[k], after[k], atol=1e-6) for k in plain), \
        max((plain[k] - after[k]).abs().max().item() for k in plain)
