"""GGUF out: a merged model written as one ``.gguf`` file for llama.cpp and Ollama, with its
tokenizer, chat template and the stop token training taught, plus an Ollama ``Modelfile``.

Written with the ``gguf`` package's writer (the llama.cpp project's own Python library), the way
llama.cpp's ``convert_hf_to_gguf.py`` writes a Llama: tensor names from ``gguf``'s name map, the
query and key projections (and their biases) permuted into llama.cpp's rotary layout, norms in F32,
the rest in the chosen type (`GGUF_TYPES`), the token list padded to the embedding rows.
Llama-architecture models with a byte-level BPE tokenizer (SmolLM2, GPT-2 style) or a
SentencePiece-style one (TinyLlama, Llama 2); anything else is refused with a clear message rather
than written wrong.
"""

from __future__ import annotations

from pathlib import Path

from tinymath.base.errors import TinymathError


def _f16(array):
    import numpy as np

    return array.astype(np.float16), None


def _q8_0(array):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


# --gguf name -> how a weight matrix is stored (norms and 1-D tensors stay F32)
GGUF_TYPES = {"f16": _f16, "q8_0": _q8_0}
FILE_TYPES = {"f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def _permute(weights, heads: int):
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), as convert_hf_to_gguf.py does."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _check_architecture(model) -> None:
    config = model.config
    if config.model_type != "llama":
        raise TinymathError(f"--gguf writes Llama-architecture models (TinyLlama, SmolLM2); this model is "
                            f"{config.model_type!r}. Convert it with llama.cpp's convert_hf_to_gguf.py instead")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise TinymathError("--gguf: this model uses RoPE scaling, which tinymath does not write; use llama.cpp's "
                            "convert_hf_to_gguf.py")


def _tokenizer_json(tokenizer) -> dict:
    import json

    return json.loads(tokenizer.backend_tokenizer.to_str())


def _pre_tokenizer(spec: dict) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, or None when it has none for it."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = [p.get("type") for p in pre.get("pretokenizers", [])] if pre.get("type") == "Sequence" else []
    if parts == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits"):
        return "smollm"
    return None


def _add_vocab(writer, tokenizer, folder: Path, vocab_size: int) -> None:
    """The tokenizer, its token list padded with unused ``[PADn]`` tokens up to the model's
    ``vocab_size`` embedding rows (llama.cpp checks that they match), as convert_hf_to_gguf.py does."""
    from gguf import TokenType

    if len(tokenizer) > vocab_size:
        raise TinymathError(f"--gguf: the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} "
                            "embedding rows")
    padding = [f"[PAD{i}]" for i in range(len(tokenizer), vocab_size)]
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in spec.get("added_tokens", [])}
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        pre = _pre_tokenizer(spec)
        if pre is None:
            raise TinymathError(f"--gguf: llama.cpp has no pre-tokenizer matching this tokenizer's "
                                f"({spec.get('pre_tokenizer')}); use llama.cpp's convert_hf_to_gguf.py")
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens + padding)
        writer.add_token_types([TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added
                                else TokenType.NORMAL for i in range(len(tokens))] + [TokenType.UNUSED] * len(padding))
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    elif model.get("type") == "BPE":  # SentencePiece-style BPE with byte fallback (Llama 2, TinyLlama)
        from gguf.vocab import LlamaHfVocab

        vocab = LlamaHfVocab(folder)
        texts, _, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(texts) + padding)
        # llama.cpp merges by score; tokenizer.json has no scores (gguf gives every token -1000), and
        # a SentencePiece BPE model's pieces score in id order: -id keeps the merge priority
        writer.add_token_scores([-float(i) if t == TokenType.NORMAL else 0.0 for i, t in enumerate(types)]
                                + [0.0] * len(padding))
        writer.add_token_types(list(types) + [TokenType.UNUSED] * len(padding))
    else:
        raise TinymathError(f"--gguf: tokenizers of type {model.get('type')!r} are not written; use llama.cpp's "
                            "convert_hf_to_gguf.py")
    for name, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                        ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(value)
    adds_bos = bool(tokenizer("1").input_ids[:1] == [tokenizer.bos_token_id]) if tokenizer.bos_token_id is not None \
        else False
    writer.add_add_bos_token(adds_bos)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def check_exportable(model, tokenizer) -> None:
    """Refuse, before any work, what `write_gguf` cannot write."""
    _check_architecture(model)
    spec = _tokenizer_json(tokenizer).get("model", {})
    if spec.get("type") != "BPE" or not spec.get("byte_fallback") and _pre_tokenizer(_tokenizer_json(tokenizer)) is None:
        raise TinymathError("--gguf: llama.cpp has no tokenizer matching this model's; use llama.cpp's "
                            "convert_hf_to_gguf.py")


def _add_hyperparameters(writer, config, gguf_type: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[gguf_type])


def _tensors(model, gguf_type: str):
    """(gguf name, array, type) for every weight, in llama.cpp's layout."""
    import gguf
    import torch

    config = model.config
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses the embeddings
    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TinymathError(f"--gguf: no llama.cpp name for the tensor {hf_name}")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):  # a bias is laid out like its rows
            array = _permute(array, heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            array = _permute(array, kv_heads)
        if array.ndim == 1:
            yield name, array, None
        else:
            data, kind = GGUF_TYPES[gguf_type](array)
            yield name, data, kind


def write_gguf(model, tokenizer, folder: Path, path: Path, gguf_type: str, title: str) -> Path:
    """Write ``model`` (a merged Llama; its tokenizer files in ``folder``) to ``path``."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise TinymathError(f"--gguf {gguf_type}: use one of {', '.join(GGUF_TYPES)}")
    _check_architecture(model)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(title)
    _add_hyperparameters(writer, model.config, gguf_type)
    _add_vocab(writer, tokenizer, folder, model.config.vocab_size)
    for name, data, kind in _tensors(model, gguf_type):
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _template_and_system(tokenizer, fmt: str, system_prompt: str | None) -> tuple[str, str | None]:
    """The Modelfile's prompt template, with the system text as ``{{ .System }}`` where the format
    has one, and the SYSTEM it defaults to: the run's system prompt, else the text the chat template
    puts there by itself (SmolLM2's "You are a helpful AI assistant ..."), so the prompt is the one
    trained on and ``ollama run`` can still replace the system text."""
    from tinymath.base.prompts import build_prompt

    if system_prompt:
        return build_prompt(tokenizer, "{{ .Prompt }}", fmt, "{{ .System }}"), system_prompt
    plain = build_prompt(tokenizer, "{{ .Prompt }}", fmt, None)
    mark = "\x00tinymath-system\x00"
    marked = build_prompt(tokenizer, "{{ .Prompt }}", fmt, mark)
    if marked.count(mark) == 1:
        before, after = marked.split(mark)
        default = plain[len(before):len(plain) - len(after)] if plain.startswith(before) and plain.endswith(after) \
            and len(plain) > len(before) + len(after) else None
        if default:  # the template's own system text sits exactly where a system prompt goes
            return f"{before}{{{{ .System }}}}{after}", default
    return plain, None


def modelfile(gguf_name: str, tokenizer, fmt: str, system_prompt: str | None) -> str:
    """An Ollama Modelfile: the weights, the prompt format as a template, the stop tokens and the
    system text (`_template_and_system`)."""
    template, system_prompt = _template_and_system(tokenizer, fmt, system_prompt)
    stops = [tokenizer.eos_token] + (["### Instruction:"] if fmt == "instruction" else [])
    for what, text, fix in (("the system prompt", system_prompt, "or use a system prompt without it"),
                            ("the model's chat template", template, "then convert the merged folder with "
                                                                     "llama.cpp's convert_hf_to_gguf.py")):
        if text and '"""' in text:  # Ollama's parser ends a """-quoted value at the first """ it meets
            raise TinymathError(f'--gguf: {what} contains """, which an Ollama Modelfile cannot quote; '
                                f"merge without --gguf, {fix}")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stops if stop]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n"
