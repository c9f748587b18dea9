"""A `merge-adapters --gguf` file run by llama.cpp itself (llama-cpp-python), against tinymath's own
greedy answers from the merged safetensors: identical texts, and does llama.cpp stop at the end of
the answer? Uses the chat template stored in the GGUF.

    pip install llama-cpp-python            # builds llama.cpp from source (cmake, a C++ compiler)
    tinymath merge-adapters run --out merged --dtype fp16 --gguf f16
    tinymath eval --model merged --data gsm8k --split test --limit 20 --out ev
    python benchmarks/llama_cpp_check.py --gguf merged/model-f16.gguf --data gsm8k/test.jsonl --eval ev
"""

from __future__ import annotations

import argparse
import json
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--data", required=True, help="GSM8K test.jsonl")
    parser.add_argument("--eval", required=True, help="a `tinymath eval --out` folder of the same problems")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    import llama_cpp

    ours = [json.loads(line) for line in open(f"{args.eval}/predictions.jsonl")]
    rows = [json.loads(line) for _, line in zip(range(len(ours)), open(args.data))]
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=2048, verbose=False)
    started, identical, stopped, tokens = time.time(), 0, 0, 0
    for row, mine in zip(rows, ours):
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": row["question"]}], temperature=0,
                                           max_tokens=args.max_tokens)
        choice = reply["choices"][0]
        identical += choice["message"]["content"].strip() == mine["completion"].strip()
        stopped += choice["finish_reason"] == "stop"
        tokens += reply["usage"]["completion_tokens"]
    print(json.dumps({"llama_cpp": llama_cpp.__version__, "problems": len(rows), "identical_texts": identical,
                      "stopped_at_eos": stopped, "completion_tokens": tokens,
                      "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
