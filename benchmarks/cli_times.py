"""Whole-command wall times of the installed CLI, as a user sees them: each run is a fresh process,
timed from its start to its exit. ``--runs N`` repeats the command: the first run can be made cold
(``--cold``: an empty tinymath cache, so nothing compiled or converted before is found), the later
ones find what the first left (warm). Logs the wall time and the command's own breakdown (its
``--json`` timing fields) for each run.

    OUT=/tmp/out python benchmarks/cli_times.py --label eval_smollm2 --cold --runs 2 -- \
        eval --adapter /tmp/rl/sft --data gsm8k --split test --out /tmp/e --overwrite
    OUT=/tmp/out python benchmarks/cli_times.py --label train_2gpu --launch "accelerate launch --num_processes 2" \
        --clean /tmp/r -- train --data prep --out /tmp/r
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import log  # noqa: E402

TIMING_KEYS = ("load_seconds", "generation_seconds", "process_start_to_setup_seconds", "setup_seconds",
               "setup_phases", "first_step_seconds", "train_seconds", "real_tokens_per_s", "steps",
               "accuracy_strict", "compiled", "cuda_graphs", "tokens_per_s", "compile_seconds",
               "graph_capture_seconds", "decoding")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="the first run starts from an empty tinymath cache")
    parser.add_argument("--cache", help="the tinymath cache to use (default: a new folder under /tmp); with "
                                        "--cold it must not exist yet")
    parser.add_argument("--clean", action="append", default=[], help="a path to delete before each run")
    parser.add_argument("--launch", help='start the command under a launcher, e.g. "accelerate launch '
                                         '--num_processes 2" (it then runs as `-m tinymath`)')
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the tinymath command and its flags")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.cold and args.cache and Path(args.cache).exists():
        raise SystemExit(f"--cold: {args.cache} exists; name a new folder (nothing is deleted)")
    cache = Path(args.cache or tempfile.mkdtemp(prefix="tinymath_cache_"))
    env = {**os.environ, "TINYMATH_CACHE": str(cache)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    tinymath = [shutil.which("tinymath")] if shutil.which("tinymath") else [sys.executable, "-m", "tinymath"]
    if args.launch:
        tinymath = [*args.launch.split(), "-m", "tinymath"]
    for run in range(args.runs):
        for path in args.clean:
            shutil.rmtree(path, ignore_errors=True)
        started = time.time()
        proc = subprocess.run([*tinymath, *command, "--json"], capture_output=True, text=True, env=env,
                              check=False)
        wall = round(time.time() - started, 2)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{args.label}: run {run + 1} failed ({proc.returncode})")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result = {**result, **result.get("result", {})}
        log(event="cli_time", label=args.label, launch=args.launch, run=run + 1, cache="cold" if args.cold and run == 0 else "warm",
            wall_s=wall, command="tinymath " + " ".join(command),
            **{k: result[k] for k in TIMING_KEYS if k in result})


if __name__ == "__main__":
    main()
