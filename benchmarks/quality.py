"""Quality on real weights (SmolLM2-135M-Instruct): the recipe search and the full pipeline, on GPUs.

Stage ``search`` picks the default recipe on a held-out slice of the TRAIN split (never test): two
prepare-data folders (calculator annotations stripped / kept) each holding out the same seeded 500 (``--val-size``)
train problems as ``validation``; each candidate recipe trains on the rest and is scored there
(greedy, and with ``--calculator`` when annotations are kept). The recipes run side by side, several
per GPU (a 135M model leaves a GPU mostly idle).

Stage ``final`` is the pipeline with a recipe (by default tinymath's defaults, which the search
chose; or the search's best, or a named one): base model on the full test set (greedy, and
``--protocol lm-eval-gsm8k``), training on the full train set, the tuned model on the full test set
(greedy, ``--calculator``, maj@8, lm-eval protocol), and the paired comparisons. Every step is a `tinymath` command; results go to $OUT/results.jsonl.

    OUT=/tmp/out python benchmarks/quality.py search --model SmolLM2.gguf --data gsm8k_dir --gpus 1
    OUT=/tmp/out python benchmarks/quality.py final --model SmolLM2.gguf --data gsm8k_dir --gpus 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, log, run_jobs  # noqa: E402

# name: (train flags, annotations). lora_alpha = 2 x rank throughout.
RECIPES = {
    "r16_lr3e-4_e3_strip": ("--lora-r 16 --lora-alpha 32 --lr 3e-4 --epochs 3", "strip"),
    "r16_lr3e-4_e3_keep": ("--lora-r 16 --lora-alpha 32 --lr 3e-4 --epochs 3", "keep"),
    "r32_lr5e-4_e3_b32_strip": ("--lora-r 32 --lora-alpha 64 --lr 5e-4 --epochs 3 --batch-size 32", "strip"),
    "r32_lr5e-4_e3_b32_keep": ("--lora-r 32 --lora-alpha 64 --lr 5e-4 --epochs 3 --batch-size 32", "keep"),
    "r16_lr1e-3_e3_keep": ("--lora-r 16 --lora-alpha 32 --lr 1e-3 --epochs 3", "keep"),
    "r64_lr3e-4_e3_keep": ("--lora-r 64 --lora-alpha 128 --lr 3e-4 --epochs 3", "keep"),
    "r32_lr5e-4_e2_keep": ("--lora-r 32 --lora-alpha 64 --lr 5e-4 --epochs 2", "keep"),
    "r32_lr1e-3_e3_b32_keep": ("--lora-r 32 --lora-alpha 64 --lr 1e-3 --epochs 3 --batch-size 32", "keep"),
    # the second search (``--recipes second``): around the first search's best, which sat at its edge
    # (its highest learning rate, most epochs): more steps, a higher rate, a larger rank
    "r32_lr2e-3_e3_b32_keep": ("--lora-r 32 --lora-alpha 64 --lr 2e-3 --epochs 3 --batch-size 32", "keep"),
    "r32_lr1e-3_e5_b32_keep": ("--lora-r 32 --lora-alpha 64 --lr 1e-3 --epochs 5 --batch-size 32", "keep"),
    "r64_lr1e-3_e3_b32_keep": ("--lora-r 64 --lora-alpha 128 --lr 1e-3 --epochs 3 --batch-size 32", "keep"),
    "r128_lr1e-3_e3_b32_keep": ("--lora-r 128 --lora-alpha 256 --lr 1e-3 --epochs 3 --batch-size 32", "keep"),
    "r128_lr5e-4_e3_b32_keep": ("--lora-r 128 --lora-alpha 256 --lr 5e-4 --epochs 3 --batch-size 32", "keep"),
    "r32_lr1e-3_e3_b16_keep": ("--lora-r 32 --lora-alpha 64 --lr 1e-3 --epochs 3 --batch-size 16", "keep"),
    # the third (``--recipes third``): past the second's best (lr 2e-3), and two of its recipes again
    # with another seed, to see how far apart two runs of one recipe land
    "r32_lr2e-3_e3_b32_s7_keep": ("--lora-r 32 --lora-alpha 64 --lr 2e-3 --epochs 3 --batch-size 32 --seed 7", "keep"),
    "r32_lr1e-3_e3_b32_s7_keep": ("--lora-r 32 --lora-alpha 64 --lr 1e-3 --epochs 3 --batch-size 32 --seed 7", "keep"),
    "r32_lr3e-3_e3_b32_keep": ("--lora-r 32 --lora-alpha 64 --lr 3e-3 --epochs 3 --batch-size 32", "keep"),
    "r32_lr4e-3_e3_b32_keep": ("--lora-r 32 --lora-alpha 64 --lr 4e-3 --epochs 3 --batch-size 32", "keep"),
    "r64_lr2e-3_e3_b32_keep": ("--lora-r 64 --lora-alpha 128 --lr 2e-3 --epochs 3 --batch-size 32", "keep"),
    "r128_lr2e-3_e3_b32_keep": ("--lora-r 128 --lora-alpha 256 --lr 2e-3 --epochs 3 --batch-size 32", "keep"),
    "r32_lr3e-3_e3_b32_s7_keep": ("--lora-r 32 --lora-alpha 64 --lr 3e-3 --epochs 3 --batch-size 32 --seed 7", "keep"),
}
FIRST = list(RECIPES)[:8]  # the first search (2026-11-28)
SECOND = ["r32_lr1e-3_e3_b32_keep"] + list(RECIPES)[8:14]  # the defaults it chose, and six around them
THIRD = list(RECIPES)[14:]


SMOKE: dict = {}  # --smoke N (a CPU check of this script): tiny data, N steps, short answers


def tm(*args) -> str:
    args = list(args)
    if SMOKE and "--compare" not in args:
        args += {"prepare-data": ["--limit", 40], "train": ["--max-steps", SMOKE["steps"], "--batch-size", 4],
                 "eval": ["--limit", 6, "--max-new-tokens", 24]}.get(args[0], [])
    return " ".join([sys.executable, "-m", "tinymath", *map(shlex.quote, map(str, args))])


def read_summary(folder: Path) -> dict | None:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def search(args, work: Path) -> None:
    names = {"first": FIRST, "second": SECOND, "third": THIRD}.get(args.recipes) or args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"--recipes: unknown {unknown}; use first, second or names from: {', '.join(RECIPES)}")
    recipes = {n: RECIPES[n] for n in (names[:2] if SMOKE else names)}
    prep = {mode: work / f"prep_{mode}" for mode in ("strip", "keep") if any(m == mode for _, m in recipes.values())}
    for mode, folder in prep.items():  # sequential: the first one also converts the GGUF once
        if not (folder / "prepare.json").exists():
            code = run_jobs([{"name": f"prepare_{mode}", "cmd": tm(
                "prepare-data", "--data", args.data, "--model", args.model, "--out", folder,
                "--calc-annotations", mode, "--val-size", 8 if SMOKE else args.val_size, "--overwrite")}], 1)
            if code[f"prepare_{mode}"]:
                raise SystemExit(f"prepare-data {mode} failed: see $OUT/jobs.log")
    jobs = []
    for name, (flags, mode) in recipes.items():
        run, data = work / "runs" / name, prep[mode]
        jobs.append({"name": f"train_{name}", "cmd": tm("train", "--data", data, "--model", args.model, "--out", run,
                                                         "--max-memory", args.max_memory, "--overwrite", "--json")
                     + " " + flags})
        evals = [("greedy", [])] + ([("calculator", ["--calculator"])] if mode == "keep" and args.calculator else [])
        for kind, extra in evals:
            jobs.append({"name": f"eval_{name}_{kind}", "after": [f"train_{name}"], "cmd": tm(
                "eval", "--adapter", run, "--data", data, "--split", "validation", "--batch-size", 512,
                "--out", work / "val" / f"{name}_{kind}", "--overwrite", "--json", *extra)})
    run_jobs(jobs, args.gpus, args.per_gpu, deadline=time.time() + args.budget)
    table = []
    for name, (flags, mode) in recipes.items():
        greedy = read_summary(work / "val" / f"{name}_greedy")
        calc = read_summary(work / "val" / f"{name}_calculator") if mode == "keep" and args.calculator else greedy
        if greedy is None or calc is None:
            continue
        row = {"recipe": name, "flags": flags, "annotations": mode, "n": greedy["n"],
               "greedy_strict": greedy["accuracy_strict"], "greedy_flexible": greedy["accuracy"],
               "calculator_strict": calc["accuracy_strict"],
               "score": (greedy["accuracy_strict"] + calc["accuracy_strict"]) / 2}
        table.append(row)
        log(event="search", **row)
    if table:  # the rule, fixed before looking: mean of greedy and calculator strict accuracy (greedy alone
        # with --no-calculator)
        best = max(table, key=lambda r: r["score"])
        (work / "best_recipe.json").write_text(json.dumps(best))
        log(event="search_best", **best)


def final(args, work: Path) -> None:
    best = work / "best_recipe.json"
    if args.recipe == "best":
        if not best.exists():
            raise SystemExit(f"--recipe best: no {best}; run the search stage first (same --work)")
        recipe = json.loads(best.read_text())
        flags, mode = recipe["flags"], recipe["annotations"]
    elif args.recipe in RECIPES:
        flags, mode = RECIPES[args.recipe]
    elif args.recipe == "defaults":
        flags, mode = "", None
    else:
        raise SystemExit(f"--recipe {args.recipe}: use defaults, best, or one of {', '.join(RECIPES)}")
    log(event="final_recipe", flags=flags, annotations=mode or "default")
    ev, run = work / "test", work / "runs" / "final"
    data_flags = f" --calc-annotations {mode}" if mode else ""
    test = ("--data", args.data, "--split", "test", "--overwrite", "--json")
    jobs = [
        {"name": "base_greedy", "cmd": tm("eval", "--model", args.model, *test, "--out", ev / "base")},
        {"name": "base_lm_eval", "cmd": tm("eval", "--model", args.model, *test, "--protocol", "lm-eval-gsm8k",
                                           "--out", ev / "base_lm_eval")},
        {"name": "train_final", "cmd": tm("train", "--data", args.data, "--model", args.model, "--out", run,
                                          "--max-memory", args.max_memory, "--overwrite", "--json")
                                       + " " + flags + data_flags},
        {"name": "tuned_greedy", "after": ["train_final"], "cmd": tm("eval", "--adapter", run, *test,
                                                                     "--out", ev / "tuned")},
        {"name": "tuned_calculator", "after": ["train_final"], "cmd": tm("eval", "--adapter", run, *test,
                                                                         "--calculator", "--out", ev / "tuned_calc")},
        {"name": "tuned_maj8", "after": ["train_final"], "cmd": tm("eval", "--adapter", run, *test, "--samples", 8,
                                                                   "--temperature", 0.7, "--out", ev / "tuned_maj8")},
        {"name": "tuned_lm_eval", "after": ["train_final"], "cmd": tm("eval", "--adapter", run, *test, "--protocol",
                                                                      "lm-eval-gsm8k", "--out", ev / "tuned_lm_eval")},
    ]
    run_jobs(jobs, args.gpus, args.per_gpu, deadline=time.time() + args.budget)
    for name in ("base", "base_lm_eval", "tuned", "tuned_calc", "tuned_maj8", "tuned_lm_eval"):
        summary = read_summary(ev / name)
        if summary:
            log(event="test", name=name, **{k: v for k, v in summary.items() if k != "settings"})
    train_summary = run / "run.json"
    if train_summary.exists():
        log(event="train", **json.loads(train_summary.read_text()).get("result", {}))
    for a, b in (("base", "tuned"), ("tuned", "tuned_calc"), ("base", "tuned_calc")):
        if read_summary(ev / a) and read_summary(ev / b):
            code = run_jobs([{"name": f"compare_{a}_{b}", "cmd": tm("eval", "--compare", ev / a, ev / b, "--json")
                              + f" > {work}/compare_{a}_{b}.json"}], 1)
            if code[f"compare_{a}_{b}"] == 0:
                result = json.loads((work / f"compare_{a}_{b}.json").read_text())
                log(event="compare", a=a, b=b, **{k: result[k] for k in (
                    "n", "accuracy_a", "accuracy_b", "difference", "difference_ci95", "mcnemar_p")},
                    flipped_to_b=len(result["only_b_correct"]), flipped_to_a=len(result["only_a_correct"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["search", "final"])
    parser.add_argument("--model", required=True, help="SmolLM2-135M-Instruct .gguf")
    parser.add_argument("--data", required=True, help="GSM8K folder (train.jsonl, test.jsonl)")
    parser.add_argument("--work", default="/tmp/tm_quality")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--per-gpu", type=int, default=None,
                        help="jobs at a time per GPU (search 8: a 135M model leaves an H200 mostly idle; final 1)")
    parser.add_argument("--max-memory", default="14GB", help="each training run's memory cap (GPUs are shared; the cap changes no result)")
    parser.add_argument("--recipe", default="defaults",
                        help="final: 'defaults' (tinymath's, chosen by the search), 'best' (the search's), or a recipe name")
    parser.add_argument("--budget", type=float, default=3600,
                        help="seconds after which no new training or base eval starts")
    parser.add_argument("--val-size", type=int, default=500, help="search: TRAIN problems held out (validation)")
    parser.add_argument("--recipes", default="first",
                        help="search: 'first' (the 2026-11-28 search), 'second' (around its best), 'third' (past the second's) or comma-separated names")
    parser.add_argument("--calculator", action=argparse.BooleanOptionalAction, default=True,
                        help="search: also score the annotated recipes with --calculator (the rule averages both)")
    parser.add_argument("--smoke", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        SMOKE["steps"] = args.smoke
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.per_gpu is None:
        args.per_gpu = 8 if args.stage == "search" else 1
    (search if args.stage == "search" else final)(args, work)


if __name__ == "__main__":
    main()
