"""Shared set-up for the GPU benchmarks: the TinyLlama-1.1B architecture with random weights (speed
does not depend on weight values), a tokenizer, real GSM8K, and result logging to $OUT."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

OUT = Path(os.environ.get("OUT", "/tmp/bench"))
WORK = Path("/tmp/tm_bench")  # random-weight models and prepared data, built once per machine
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def log(**record):
    """Print one result line and append it to $OUT/results.jsonl."""
    record["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    print(json.dumps(record), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def random_model(path: Path, arch: dict, tokenizer_dir: str) -> Path:
    """Save a random-weight Llama of ``arch`` (bf16) with the given tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**arch)).to(torch.bfloat16)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    del model
    return path


def smollm2_with_data(tokenizer_dir: str, data_dir: Path) -> tuple[Path, Path]:
    """The SmolLM2-135M architecture with random weights, and the GSM8K folder ``data_dir``
    prepared for it (both kept in WORK): (model folder, prepared-data folder)."""
    from tinymath.services.prepare import prepare_data

    WORK.mkdir(exist_ok=True)
    smol = random_model(WORK / "smollm2_rand", SMOLLM2, tokenizer_dir)
    prep = WORK / "prep"
    if not prep.exists():
        prepare_data(data=str(data_dir), model=str(smol), out=prep)
    return smol, prep


def remap_prepared(src: Path, dst: Path, vocab: int) -> Path:
    """A copy of a prepare-data folder with token ids folded into ``vocab`` (for a smaller-vocab
    architecture measured with another tokenizer: lengths stay real GSM8K lengths)."""
    import shutil

    import datasets

    if dst.exists():
        return dst
    ds = datasets.load_from_disk(str(src))
    fold = lambda row: {"input_ids": [t % vocab for t in row["input_ids"]],
                        "labels": [t if t == -100 else t % vocab for t in row["labels"]]}
    ds.map(fold).save_to_disk(str(dst))
    shutil.copy(src / "prepare.json", dst / "prepare.json")
    return dst


def run_jobs(jobs: list[dict], gpus: int, per_gpu: int = 1, deadline: float | None = None) -> dict[str, int]:
    """Run shell jobs ``{"name", "cmd", "after": [names]}`` as subprocesses, at most ``per_gpu`` at a
    time on each GPU (CUDA_VISIBLE_DEVICES), each once the jobs it needs have succeeded. A job's output
    goes to /tmp/tm_jobs/<name>.log and its last lines to $OUT/jobs.log; jobs that need no other job
    and have not started by ``deadline`` (a time.time()) are skipped. Returns the exit codes (-1: skipped)."""
    import subprocess

    logs = Path("/tmp/tm_jobs")
    logs.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    names = {job["name"] for job in jobs}
    unknown = {n for job in jobs for n in job.get("after", [])} - names
    if unknown:
        raise ValueError(f"jobs wait for jobs that are not in the list: {sorted(unknown)}")
    pending, running, codes = list(jobs), {}, {}
    slots = [g for _ in range(per_gpu) for g in range(gpus)]
    while pending or running:
        for name, (proc, slot, started, logfile) in list(running.items()):
            if proc.poll() is not None:
                logfile.close()
                codes[name] = proc.returncode
                slots.append(slot)
                del running[name]
                log(event="job", name=name, rc=proc.returncode, seconds=round(time.time() - started, 1))
                tail = (logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                with open(OUT / "jobs.log", "a") as f:
                    f.write(f"== {name} (rc {proc.returncode})\n" + "\n".join(tail) + "\n")
        for job in list(pending):
            needs = job.get("after", [])
            # the deadline holds back new work only: a job that follows finished ones still runs
            if any(codes.get(n, 0) != 0 for n in needs) or (not needs and deadline and time.time() > deadline):
                pending.remove(job)
                codes[job["name"]] = -1
                log(event="job", name=job["name"], skipped=True)
            elif slots and all(codes.get(n) == 0 for n in needs):
                pending.remove(job)
                slot = slots.pop(0)
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(slot)}
                logfile = open(logs / f"{job['name']}.log", "w")
                proc = subprocess.Popen(job["cmd"], shell=True, env=env, stdout=logfile, stderr=subprocess.STDOUT)
                running[job["name"]] = (proc, slot, time.time(), logfile)
        time.sleep(1)
    return codes
