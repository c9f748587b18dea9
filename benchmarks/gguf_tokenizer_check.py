"""Does llama.cpp read the tokenizer tinymath writes into a GGUF the way transformers tokenizes?
For a SentencePiece-style tokenizer (BPE with byte fallback, as TinyLlama's and Llama 2's), whose
merge order tinymath writes as token scores: a small random Llama with that tokenizer is exported
(`tinymath.lib.gguf_export.write_gguf`, f16) and every GSM8K test problem (question and answer) is
tokenized by transformers, by transformers' GGUF reader and by llama.cpp (llama-cpp-python).

    pip install llama-cpp-python
    python benchmarks/gguf_tokenizer_check.py --tokenizer tests/fixtures/sp_tokenizer --data gsm8k/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer folder")
    parser.add_argument("--data", required=True, help="GSM8K test.jsonl")
    args = parser.parse_args()

    import llama_cpp
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tinymath.base.files import read_jsonl
    from tinymath.lib.gguf_export import check_exportable, write_gguf

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    rows = read_jsonl(args.data)
    texts = [r["question"] + "\n" + r["answer"] for r in rows]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        tokenizer.save_pretrained(folder)
        check_exportable(model, tokenizer)
        path = write_gguf(model, tokenizer, folder, folder / "model-f16.gguf", "f16", "tokenizer check")
        reader = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        expected = [tokenizer(t).input_ids for t in texts]
        same_reader = sum(reader(t).input_ids == e for t, e in zip(texts, expected))
        same_cpp = sum(llm.tokenize(t.encode(), add_bos=True, special=False) == e for t, e in zip(texts, expected))
        # llama.cpp's raw detokenizer keeps the space SentencePiece prefixes to the first word
        decoded = sum(llm.detokenize(e[1:]).decode(errors="replace").removeprefix(" ") == t
                      for t, e in zip(texts, expected))
    print(json.dumps({"llama_cpp": llama_cpp.__version__, "texts": len(texts),
                      "tokens": sum(len(e) for e in expected), "transformers_gguf_identical": same_reader,
                      "llama_cpp_identical": same_cpp, "llama_cpp_detokenized_identical_but_leading_space": decoded}))


if __name__ == "__main__":
    main()
