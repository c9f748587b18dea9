"""Generation for eval and chat: loading a model for inference, length-sorted batched greedy or
sampled generation, and token streaming.

Evaluations and GRPO sampling on a GPU decode with `tinymath.lib.decode` (a static KV cache,
steps replayed from a CUDA graph), the calculator writing its results into the rows as they
decode (`CalculatorTool`); stop strings, and the calculator where that loop does not run, go
through transformers' ``generate`` (the calculator in rounds). Inference never needs the 4-bit base: a run's adapter is merged into 16-bit weights in memory
(`tinymath.lora.load_merged_model`) before generating, which is both faster and exact; decode steps
use `tinymath.attention`'s grouped-query SDPA (no copy of the KV cache per query head).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from tinymath.base.errors import TinymathError, raise_if_problems
from tinymath.base.runs import MERGE_MARKER
from tinymath.lib.decode import decode
from tinymath.lib.decode import supported as decode_supported


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int | None = None  # None: as large as memory allows (`auto_batch_size`)
    static_cache: bool | None = None  # None: on CUDA for MIN_STATIC_PROMPTS or more prompts (see generate_ids)
    compile_steps: bool = False  # tinymath's decode loop with each step compiled (`tinymath.lib.decode`)
    min_width: int = 0  # compiled steps: prompts padded to at least this width, bucketed (one shape for every batch)
    stop: tuple[str, ...] = ()  # stop strings (cut from the text)
    calculator: bool = False  # complete <<expr= annotations with tinymath.calculator

    def validate(self) -> None:
        import math

        problems = [f"--{name.replace('_', '-')} {value} must be a finite number"
                    for name, value in (("temperature", self.temperature), ("top_p", self.top_p))
                    if not math.isfinite(value)]
        raise_if_problems(problems)
        if self.max_new_tokens <= 0:
            problems.append(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            problems.append(f"--temperature {self.temperature} must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p {self.top_p} must be in (0, 1]")
        if self.batch_size is not None and self.batch_size <= 0:
            problems.append(f"--batch-size {self.batch_size} must be at least 1")
        if self.compile_steps and self.static_cache is False:
            problems.append("--compile-steps compiles the steps of fast decoding, which --no-compile turns off "
                            "(drop one of them)")
        if self.compile_steps and self.stop:
            problems.append("--compile-steps compiles tinymath's decode loop, but stop strings (--protocol "
                            "lm-eval-gsm8k) decode with transformers' generate, which compiles its own steps "
                            "(drop --compile-steps)")
        raise_if_problems(problems)

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class InferenceModel:
    """A model ready to answer: weights, tokenizer, the prompt format it expects, and whether it
    was trained to answer with the calculator (a GRPO run with ``--calculator``)."""

    model: object
    tokenizer: object
    format: str
    system_prompt: str | None
    source: dict
    calculator: bool = False

    def uses_calculator(self, asked: bool | None) -> bool:
        """``--calculator``/``--no-calculator`` if given, else as the model was trained."""
        return self.calculator if asked is None else asked


def check_model_choice(model: str | None, adapter: str | None) -> None:
    """Exactly one of ``--model`` and ``--adapter``, and a ``--model`` that can be a model (from what
    is on disk: checked before any data is fetched or weights are read)."""
    from tinymath.lib.model import check_model_source

    if (model is None) == (adapter is None):
        raise TinymathError("give exactly one of --model (a model) or --adapter (a `tinymath train` run folder)")
    if model is not None:
        check_model_source(model)


def load_for_inference(model: str | None = None, adapter: str | None = None, quant: str = "none",
                       fmt: str | None = None, system_prompt: str | None = None,
                       merge_base: str = "dequantized", trust_remote_code: bool = False) -> InferenceModel:
    """Load ``--model`` or a run's ``--adapter`` (merged in memory) with the right prompt format.

    A run's own format and system prompt are used unless given explicitly; for a plain model
    the default format is ``chat``, or ``instruction`` when its tokenizer has no chat template.
    """
    from tinymath.base.runs import load_run
    from tinymath.lib.attention import use_decode_attention
    from tinymath.lib.lora import load_merged_model
    from tinymath.lib.model import load_base_model, load_tokenizer

    check_model_choice(model, adapter)
    if adapter is not None:
        run = load_run(adapter)
        tokenizer = load_tokenizer(str(run.path), trust_remote_code, run=True)
        weights = load_merged_model(run, merge_base=merge_base, trust_remote_code=trust_remote_code)
        use_decode_attention(weights)
        return InferenceModel(weights, tokenizer, fmt or run.prompt_format,
                              system_prompt if system_prompt is not None else run.system_prompt,
                              {"adapter": str(adapter), "base_model": run.base_model, "merge_base": merge_base},
                              bool(run.config.get("calculator", False)))
    tokenizer = load_tokenizer(model, trust_remote_code)
    weights = load_base_model(model, quant=quant, trust_remote_code=trust_remote_code).eval()
    use_decode_attention(weights)
    saved = _merged_prompt_settings(model)  # a merge-adapters output remembers its run's format
    plain = "chat" if getattr(tokenizer, "chat_template", None) else "instruction"  # a base model: no template
    return InferenceModel(weights, tokenizer, fmt or saved.get("format", plain),
                          system_prompt if system_prompt is not None else saved.get("system_prompt"),
                          {"model": model, "quant": quant}, bool(saved.get("calculator", False)))


def _merged_prompt_settings(model: str) -> dict:
    from pathlib import Path

    from tinymath.base.files import read_json_object

    marker = Path(model).expanduser() / MERGE_MARKER
    return read_json_object(marker, "a merged model's settings") if marker.is_file() else {}


def generated_ids(ids: list[int], eos: int, pad: int) -> list[int]:
    """The tokens a row of ``generate`` really generated: up to and including EOS; a row that
    stopped early is padded, and padding is not generated."""
    if eos in ids:
        return ids[:ids.index(eos) + 1]
    while ids and ids[-1] == pad and pad != eos:
        ids = ids[:-1]
    return ids


def _decode_new(tokenizer, new_ids) -> tuple[str, int]:
    """Text of generated ids up to (not including) EOS, and how many tokens were generated."""
    ids = generated_ids(new_ids.tolist(), tokenizer.eos_token_id, tokenizer.pad_token_id)
    text_ids = ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids
    return tokenizer.decode(text_ids, skip_special_tokens=True), len(ids)


def auto_batch_size(model, prompts: list[list[int]], max_new_tokens: int, min_width: int = 0) -> int:
    """How many rows to generate together: 16 on CPU; on a GPU as many as half the free memory
    holds in KV cache (every row padded to the longest prompt plus the answer), at most the
    prompts' count rounded up to `ROW_BUCKET` (the rows compiled decoding pads a batch to)."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return 16
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()
    # the logits of one step ([rows, vocab] in fp32) come on top of the cache
    width = max(max(len(p) for p in prompts), min_width)  # rows padded to `min_width` hold that much cache
    per_row = per_token * (width + max_new_tokens) + 8 * cfg.vocab_size
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(_bucket(len(prompts), ROW_BUCKET), int(free * 0.5 / per_row)))


def generate_batch(inference: InferenceModel, prompts: list[list[int]], settings: GenerationSettings,
                   update=lambda advance=1: None) -> list[tuple[str, int]]:
    """Complete many tokenized prompts: (text, generated token count) per prompt, in input order.

    Prompts are sorted by length so each batch pads little; rows stop at EOS (or a stop string).
    With ``settings.calculator``, ``<<expr=`` annotations are completed by `tinymath.calculator`.
    """
    tokenizer = inference.tokenizer
    if settings.calculator and not decodes_own(inference.model, settings, len(prompts)):
        return [_cut_at_stop((tokenizer.decode(ids, skip_special_tokens=True), len(ids)), settings.stop)
                for ids in calculator_rounds(inference, prompts, settings, update)]
    return [_cut_at_stop(_decode_new(tokenizer, ids), settings.stop)
            for ids in generate_ids(inference, prompts, settings, update)]


def generate_across_processes(inference: InferenceModel, prompts: list[list[int]], settings: GenerationSettings,
                              update=lambda advance=1: None) -> list[tuple[str, int]]:
    """`generate_batch` shared by the processes of `accelerate launch`: each generates every
    num_processes-th prompt, and every process gets all results in input order. One process: plain."""
    from tinymath.lib.distributed import gather_in_order, process_share

    mine = process_share(len(prompts))
    return gather_in_order(mine, generate_batch(inference, [prompts[i] for i in mine], settings, update), len(prompts))


def _cut_at_stop(decoded: tuple[str, int], stop: tuple[str, ...]) -> tuple[str, int]:
    text, n = decoded
    for s in stop:
        if s in text:
            text = text[:text.index(s)]
    return text, n


def generate_ids(inference: InferenceModel, prompts: list[list[int]], settings: GenerationSettings,
                  update=lambda advance=1: None, stopping=None) -> list:
    """Generated token ids (a tensor row per prompt, after the prompt) in input order."""
    import torch

    if not prompts:  # e.g. a process of `accelerate launch` with no share of a tiny eval
        return []
    model, tokenizer = inference.model, inference.tokenizer
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list = [None] * len(prompts)
    kwargs = settings.generate_kwargs(tokenizer)
    static = use_static_cache(settings, device.type, len(prompts))
    compiled = static and compiles(model, settings, stopping)
    own = static and not compiled
    if settings.calculator and not own:
        raise ValueError("the calculator needs tinymath's decode loop here (generate_batch decodes it in rounds)")
    steps_compiled = own and settings.compile_steps
    bucketed = compiled or steps_compiled  # few shapes: each is a compile
    if compiled:
        from tinymath.lib.speed import use_compile_cache

        use_compile_cache()
        kwargs["cache_implementation"] = "static"
    if settings.stop:
        kwargs.update(stop_strings=list(settings.stop), tokenizer=tokenizer)
    if stopping is not None:
        kwargs["stopping_criteria"] = stopping
    batch_size = settings.batch_size or auto_batch_size(model, prompts, settings.max_new_tokens,
                                                        _bucket(settings.min_width, WIDTH_BUCKET))
    if bucketed and not settings.batch_size and batch_size > ROW_BUCKET:  # a memory-bound size varies from
        batch_size -= batch_size % ROW_BUCKET  # call to call: a multiple of the bucket keeps the shapes few
    sample = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.temperature > 0 else None
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows = _batch_shape(chunk, prompts, batch_size, ROW_BUCKET if compiled else STEP_ROW_BUCKET if bucketed else 0)
        width = max(len(prompts[i]) for i in chunk)
        if bucketed:  # bucketed shapes: the compiled decoder is reused by the next batch, step or process
            width = _bucket(max(width, settings.min_width), WIDTH_BUCKET)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):  # left padding: every row's answer starts at the same column
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        with torch.no_grad():
            if own:
                out = decode(model, ids.to(device), mask.to(device), settings.max_new_tokens,
                             tokenizer.eos_token_id, tokenizer.pad_token_id, sample, compiled=steps_compiled,
                             live=len(chunk), tool=CalculatorTool(tokenizer) if settings.calculator else None)
            else:
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row, i in enumerate(chunk):  # rows beyond the chunk were filler
            results[i] = out[row, width:].cpu()
        update(len(chunk))
    return results


WIDTH_BUCKET = 64  # compiled decoding: prompt widths are padded to a multiple of this
ROW_BUCKET = 64  # ... and a batch's rows to a multiple of this (or to the batch size)
STEP_ROW_BUCKET = 8  # compiled decode steps: finer (filler rows are work every step, the shapes are few anyway)


def _bucket(n: int, size: int) -> int:
    return -(-n // size) * size


def _batch_shape(chunk: list[int], prompts: list[list[int]], batch_size: int, bucket: int) -> list[int]:
    """The prompt index of each row of a batch: the chunk's own, then, for compiled decoding, copies
    of its shortest prompt up to a row count rounded up to ``bucket`` (0: as it is), never more than
    ``batch_size`` (every full batch's size, so the last batch of an evaluation reuses the others'
    compiled decoder). Filler rows' outputs are dropped."""
    if not bucket:
        return chunk
    target = batch_size if len(prompts) > batch_size else min(_bucket(len(chunk), bucket), batch_size)
    return chunk + [chunk[-1]] * (target - len(chunk))


def compiles(model, settings: GenerationSettings, stopping=None) -> bool:
    """With a static cache, whether decoding goes through transformers' ``generate``, which
    compiles the model (stop strings, stopping criteria such as the calculator rounds', or what
    `tinymath.lib.decode` does not do), rather than tinymath's own graph-replayed loop."""
    return bool(settings.stop) or stopping is not None or not decode_supported(model)


def decodes_own(model, settings: GenerationSettings, prompts: int) -> bool:
    """Whether ``prompts`` prompts decode with tinymath's loop (`tinymath.lib.decode`)."""
    device = next(model.parameters()).device
    return use_static_cache(settings, device.type, prompts) and not compiles(model, settings)


class CalculatorTool:
    """The calculator as a `tinymath.lib.decode` tool: after a token with ``=`` in it, a row whose
    text ends inside ``<<expr=`` gets the tokens of ``result>>`` (as `calculator_rounds`
    appends them between rounds), at most `MAX_CALCULATOR_CALLS` times; an expression the calculator
    refuses gets nothing, and the model goes on by itself."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.triggers = _equals_tokens(tokenizer)
        self.calls: dict[int, int] = {}

    def __call__(self, row: int, ids: list[int]) -> list[int]:
        from tinymath.base.calculator import calculate, pending_call

        expression = pending_call(self.tokenizer.decode(ids, skip_special_tokens=True))
        if expression is None or self.calls.get(row, 0) >= MAX_CALCULATOR_CALLS:
            return []
        self.calls[row] = self.calls.get(row, 0) + 1
        result = calculate(expression)
        return [] if result is None else result_tokens(self.tokenizer, result)


def result_tokens(tokenizer, result: str) -> list[int]:
    """The tokens of ``result>>`` as they follow ``<<expr=`` in a text: encoded after an anchor, since
    a SentencePiece tokenizer starts a text of its own with a space piece (``▁24>>``)."""
    anchor = tokenizer("<<1=", add_special_tokens=False).input_ids
    ids = tokenizer(f"<<1={result}>>", add_special_tokens=False).input_ids
    if ids[:len(anchor)] == anchor:
        return ids[len(anchor):]
    return tokenizer(f"{result}>>", add_special_tokens=False).input_ids  # "=" merged with the result


_EQUALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> `_equals_tokens`


def _equals_tokens(tokenizer) -> frozenset[int]:
    """The ids of the tokens whose text has an ``=`` (the only ones that can end ``<<expr=``; a
    byte-fallback vocabulary writes the byte as ``<0x3D>``): a scan of the vocabulary (about 30 ms),
    once per tokenizer, not once per batch or GRPO step."""
    if tokenizer not in _EQUALS:
        _EQUALS[tokenizer] = frozenset(i for token, i in tokenizer.get_vocab().items()
                                       if "=" in token or token == "<0x3D>")
    return _EQUALS[tokenizer]


def check_compile_steps(settings: GenerationSettings, model, source: str) -> None:
    """--compile-steps where the decode loop will not run, known once the model is loaded: a model
    the loop cannot decode (its attention or its generation config needs transformers' generate).
    One message, not a flag silently ignored."""
    if not settings.compile_steps:
        return
    if not decode_supported(model):
        raise TinymathError(f"--compile-steps compiles tinymath's decode loop, which cannot decode {source} (its "
                            "attention or generation config needs transformers' generate): drop --compile-steps")


MIN_STATIC_PROMPTS = 64  # below this, setting up fast decoding costs more than it saves


def use_static_cache(settings: GenerationSettings, device_type: str, prompts: int) -> bool:
    """Decode with a static KV cache (tinymath's graph-replayed loop, or transformers' compiled
    ``generate`` where that loop cannot serve): on a GPU, when there is enough work to pay for the
    set-up (an evaluation, not a chat answer or a 4-problem check)."""
    if settings.static_cache is not None:
        return settings.static_cache
    if settings.compile_steps:  # asked for: the steps it compiles are the static-cache loop's
        return True
    return device_type == "cuda" and prompts >= MIN_STATIC_PROMPTS


CALL_WINDOW = 96


def _calculator_stop(tokenizer):
    """A per-row stopping criterion: stop a row when its text ends inside ``<<expr=``, read in the
    last `CALL_WINDOW` tokens: room for a long expression written a token per digit (as SmolLM2
    writes numbers); the decode loop's tool reads the whole row."""
    import torch
    from transformers import StoppingCriteria

    from tinymath.base.calculator import pending_call

    class CalculatorStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            tails = tokenizer.batch_decode(input_ids[:, -CALL_WINDOW:], skip_special_tokens=True)
            return torch.tensor([pending_call(t) is not None for t in tails], device=input_ids.device)

    return CalculatorStop()


MAX_CALCULATOR_CALLS = 32


def calculator_rounds(inference: InferenceModel, prompts: list[list[int]], settings: GenerationSettings,
                      update=lambda advance=1: None) -> list[list[int]]:
    """Each prompt's answer as token ids, generated in rounds: rows that stop at ``<<expr=`` get
    the tokens of ``result>>`` (when the expression is computable; they count in the row's
    ``max_new_tokens``, as in the decode loop, which writes them in itself) and continue in the next
    round; the others are done, with EOS at the end where the model wrote it (not where EOS is
    padding, as after a stop in a batch whose pad token is EOS, like SmolLM2's). A round continues
    from the row's own tokens, not from its text encoded again (which a SentencePiece tokenizer,
    TinyLlama's, would start with a space piece), so its tokens are the decode loop's."""
    from dataclasses import replace

    from transformers import StoppingCriteriaList

    from tinymath.base.calculator import calculate, pending_call

    tokenizer, limit = inference.tokenizer, settings.max_new_tokens
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    made, ended, calls = [[] for _ in prompts], [False] * len(prompts), [0] * len(prompts)
    active = list(range(len(prompts)))
    stopping = StoppingCriteriaList([_calculator_stop(tokenizer)])
    while active:
        outs = generate_ids(inference, [prompts[i] + made[i] for i in active],
                            replace(settings, max_new_tokens=max(limit - len(made[i]) for i in active),
                                    calculator=False), stopping=stopping)
        still = []
        for i, ids in zip(active, outs):  # the round ran to the longest budget: each row keeps its own
            new = generated_ids(ids[:limit - len(made[i])].tolist(), eos, pad)
            own = new[:-1] if new and new[-1] == eos else new
            made[i] += own
            text = tokenizer.decode(made[i], skip_special_tokens=True)
            # a row that stopped inside "<<expr=" waits for its result (judged by the text: a row that
            # stopped early is padded, and the pad token may be EOS); a stop string ends the row
            stop_hit = any(s in text for s in settings.stop)
            expression = None if not own or stop_hit else pending_call(text)
            ended[i] = own != new and not stop_hit and expression is None
            if expression is None or len(made[i]) >= limit or calls[i] >= MAX_CALCULATOR_CALLS:
                continue
            calls[i] += 1
            result = calculate(expression)
            if result is not None:  # as much of it as the budget holds, as in the decode loop
                made[i] += result_tokens(tokenizer, result)[:limit - len(made[i])]
            if len(made[i]) < limit:
                still.append(i)
        active = still
    update(len(prompts))
    return [ids + [eos] * done for ids, done in zip(made, ended)]


def stream_generate(inference: InferenceModel, prompt_ids: list[int], settings: GenerationSettings):
    """Yield the reply's text piece by piece as tokens are generated (for chat)."""
    import threading

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    model, tokenizer = inference.model, inference.tokenizer
    device = next(model.parameters()).device
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancelled = threading.Event()  # set when the reader stops early (Ctrl-C): generation stops too

    class Cancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancelled.is_set(), device=input_ids.device)

    ids = torch.tensor([prompt_ids], device=device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                  stopping_criteria=StoppingCriteriaList([Cancel()]), **settings.generate_kwargs(tokenizer))
    errors = []

    def run():
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except Exception as exc:  # surfaced in the caller's thread below
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        cancelled.set()
        thread.join()
    if errors:
        raise errors[0]
