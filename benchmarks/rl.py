"""GRPO after SFT on the real SmolLM2-135M-Instruct, through the installed CLI as a user runs it.

Phases (each skipped when its output exists, so a long run can continue in a later process):
prepare-data with 200 problems (`--val-size`) held out of the TRAIN split (validation) -> SFT with the defaults ->
GRPO from the SFT run (validation accuracy on the held-out problems picks the kept adapter) ->
the full test set, greedy, for both -> the paired comparison (`tinymath eval --compare`); with
`--calculator`, the same again answered with the calculator. Prints
each phase's wall time and the figures, and appends them to $OUT/results.jsonl.

    OUT=/tmp/out python benchmarks/rl.py --model SmolLM2-135M-Instruct.Q4_1.gguf --data gsm8k --work /tmp/rl \
        --rl-args "--max-steps 60 --eval-every 20"

With `--variant NAME=FLAGS` (repeatable) several GRPO runs start from the same SFT run at once (one GPU
holds them all), each with `--rl-args` plus its own flags; the one with the best validation accuracy
is picked before the test set is touched, and only it is evaluated on the test set.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import log  # noqa: E402


def start(*args: str) -> subprocess.Popen:
    """One `tinymath ... --json` command started in a fresh process (see `finish`)."""
    proc = subprocess.Popen([sys.executable, "-m", "tinymath", *args, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.args_text, proc.started = " ".join(args), time.time()
    return proc


def finish(proc: subprocess.Popen) -> dict:
    """Wait for a started command: its JSON result and wall seconds (exits on failure)."""
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        print(stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"tinymath {proc.args_text} failed ({proc.returncode})")
    return {"result": json.loads(stdout.strip().splitlines()[-1]), "wall_s": round(time.time() - proc.started, 1)}


def tinymath(*args: str) -> dict:
    """One `tinymath ... --json` command in a fresh process: its JSON result and wall seconds."""
    return finish(start(*args))


def grpo_summary(run: Path, r: dict, name: str) -> None:
    """Log the figures of one finished GRPO run."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in records if "reward" in x]  # steps (not the step-0 validation line)
    log(event="rl_bench", phase="grpo", variant=name, wall_s=r["wall_s"], steps=r["result"]["steps"],
        best_val_accuracy=r["result"]["best_val_accuracy"], best_step=r["result"]["best_step"],
        generation_s=round(sum(x.get("generation_s", 0) for x in rows), 1),
        update_s=round(sum(x.get("update_s", 0) for x in rows), 1),
        reward_first=[x["reward"] for x in rows[:5]], reward_last=[x["reward"] for x in rows[-5:]],
        val_accuracy=[(x["step"], x["val_accuracy"]) for x in records if "val_accuracy" in x])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="SmolLM2-135M-Instruct GGUF (or any model)")
    parser.add_argument("--data", required=True, help="GSM8K folder with train.jsonl and test.jsonl")
    parser.add_argument("--work", default="/tmp/rl")
    parser.add_argument("--val-size", default="200", help="TRAIN problems held out for validation")
    parser.add_argument("--sft-args", default="", help="extra `tinymath train` flags of the SFT run (default: none)")
    parser.add_argument("--rl-args", default="", help="extra `tinymath train --method grpo` flags")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="a GRPO run of its own (extra flags after --rl-args); several run at once")
    parser.add_argument("--only", default="prepare,sft,rl,eval", help="phases to run")
    parser.add_argument("--sft", help="an existing SFT (or GRPO) run to start GRPO from and compare with, instead of "
                                      "WORK/sft (its prepared data too; prepare and sft are skipped)")
    parser.add_argument("--calculator", action="store_true",
                        help="also evaluate both runs with `eval --calculator`, and compare them so")
    args = parser.parse_args()
    work, which = Path(args.work), set(args.only.split(","))
    work.mkdir(parents=True, exist_ok=True)
    prep, sft, rl = work / "prep", work / "sft", work / "rl"
    if args.sft:
        sft = Path(args.sft)
        prep = Path(json.loads((sft / "run.json").read_text())["data"])
        which -= {"prepare", "sft"}

    if "prepare" in which and not prep.exists():
        r = tinymath("prepare-data", "--data", args.data, "--model", args.model, "--out", str(prep),
                     "--val-size", args.val_size)
        log(event="rl_bench", phase="prepare", wall_s=r["wall_s"])
    if "sft" in which and not (sft / "run.json").exists():
        r = tinymath("train", "--data", str(prep), "--model", args.model, "--out", str(sft), *shlex.split(args.sft_args))
        log(event="rl_bench", phase="sft", wall_s=r["wall_s"], steps=r["result"]["steps"],
            final_loss=r["result"]["final_loss"])
    variants = dict(v.split("=", 1) for v in args.variant) or {"": ""}
    runs = {name: work / (f"rl_{name}" if name else "rl") for name in variants}
    if "rl" in which:
        started = {}
        for name, extra in variants.items():
            run = runs[name]
            if (run / "run.json").exists():
                continue
            resume = ["--resume", str(run)] if (run / "checkpoints").is_dir() else []
            started[name] = start("train", *(resume or [
                "--method", "grpo", "--init-adapter", str(sft), "--data", str(prep), "--out", str(run),
                *shlex.split(args.rl_args), *shlex.split(extra)]))
        for name, proc in started.items():
            grpo_summary(runs[name], finish(proc), name)
    if len(runs) > 1:  # the pick, on validation only
        best = {name: json.loads((run / "run.json").read_text()).get("result", {}).get("best_val_accuracy")
                for name, run in runs.items() if (run / "run.json").exists()}
        best = {name: value for name, value in best.items() if value is not None}
        if best:
            pick = max(best, key=best.get)
            log(event="rl_bench", phase="pick", best_val_accuracy=best, picked=pick)
            rl = runs[pick]
    if "eval" in which:
        modes = {"": ()} | ({"_calc": ("--calculator",)} if args.calculator else {})
        for suffix, extra in modes.items():
            evaluate_both(work, args.data, {"sft": sft, "rl": rl}, suffix, extra)


def evaluate_both(work: Path, data: str, runs: dict, suffix: str, extra: tuple) -> None:
    """The full test set for the SFT run and the GRPO run (both at once), then the paired comparison."""
    outs = {name: work / f"test_{name}{suffix}" for name in runs}
    started = {name: start("eval", "--adapter", str(run), "--data", data, "--split", "test", "--out", str(outs[name]),
                           *extra)
               for name, run in runs.items() if not outs[name].exists() and (run / "run.json").exists()}
    for name, proc in started.items():  # both at once
        r = finish(proc)
        log(event="rl_bench", phase=f"eval_{name}{suffix}", run=str(runs[name]), wall_s=r["wall_s"],
            accuracy=r["result"]["accuracy"], accuracy_strict=r["result"]["accuracy_strict"], n=r["result"]["n"])
    if outs["sft"].exists() and outs["rl"].exists():
        c = tinymath("eval", "--compare", str(outs["sft"]), str(outs["rl"]))["result"]
        log(event="rl_bench", phase=f"compare{suffix}", sft=c["accuracy_a"], grpo=c["accuracy_b"],
            difference=c["difference"], ci95=c["difference_ci95"], mcnemar_p=c["mcnemar_p"],
            ratio=round(c["accuracy_b"] / c["accuracy_a"], 3) if c["accuracy_a"] else None)


if __name__ == "__main__":
    main()
