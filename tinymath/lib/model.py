"""The one place that resolves a model source and loads it, quantized or not, with its tokenizer.

A source is a hub id (``TinyLlama/TinyLlama-1.1B-Chat-v1.0``), a local Hugging Face folder, or a
``.gguf`` file. A GGUF file is converted once into a cached Hugging Face folder (transformers
cannot quantize while reading GGUF, and dequantizing GGUF on every load is slow); from then on
it loads, and quantizes to NF4, like any other folder.

``trust_remote_code`` is only ever on when the user asks for it.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from tinymath.base.errors import TinymathError
from tinymath.base.config import check_local_source
from tinymath.base.files import MODEL_SUFFIXES
from tinymath.base.quantization import QUANTIZATIONS
from tinymath.base.runs import CONFIG_FILE, RUN_FILE, check_not_prepared_data, recorded_model
from tinymath.lib.distributed import default_device
from tinymath.lib.hub import missing_files_reason, offline_unless_reachable


def cache_dir() -> Path:
    """Where tinymath keeps converted GGUF models (``$TINYMATH_CACHE`` or ``~/.cache/tinymath``)."""
    return Path(os.environ.get("TINYMATH_CACHE", Path.home() / ".cache" / "tinymath"))


STALE_SECONDS = 3600  # a cache entry used this recently may be in use; a hidden one this old, a dead write
GGUF_KEPT = 3  # GGUF conversions kept in the cache (the most recently used); each is the model in fp32


def prune_cache(folder: Path, kept: int, writing: str | None = None, spare_recent: bool = False) -> None:
    """Keep the ``kept`` most recently used entries of one cache folder (an entry's time is that of
    its last use), and with ``spare_recent`` any used in the last hour (another process may be about
    to load it, with no way back if it is gone); remove folders half-written (hidden) by a process
    that died an hour ago or more. Locks and a write in progress (``writing``) stay. Best effort: a
    read-only cache is left as it is."""
    import time

    try:
        entries = [(p, time.time() - p.stat().st_mtime) for p in folder.iterdir()]
    except OSError:
        return
    shown = sorted((e for e in entries if not e[0].name.startswith(".")), key=lambda e: e[1])
    old = [p for p, age in shown[kept:] if age > STALE_SECONDS or not spare_recent]
    dead = [p for p, age in entries if p.name.startswith(".") and p.is_dir() and str(p) != writing
            and age > STALE_SECONDS]
    for path in old + dead:
        shutil.rmtree(path, ignore_errors=True)


def touch(folder: Path) -> None:
    """Mark a cache entry as just used (never creating one; nothing where the cache is read-only)."""
    try:
        os.utime(folder)
    except OSError:
        pass


def _is_run_folder(path: Path) -> bool:
    """A `tinymath train` output, finished (run.json) or not (train_config.json): not a model folder."""
    return ((path / RUN_FILE).exists() or (path / CONFIG_FILE).exists()) and not (path / "config.json").exists()


def _run_given_as_model(source: str, path: Path, flag: str = "--model") -> str:
    """What to say when a `tinymath train` run folder is given where a model belongs."""
    base = recorded_model(path / RUN_FILE) or recorded_model(path / CONFIG_FILE)
    base_hint = f"; its base model is {base}" if base else ""
    return (f"{flag} {source} is a tinymath training run (a LoRA adapter), not a model{base_hint}. eval and chat "
            f"take it as --adapter {source}, train --method grpo as --init-adapter {source}, and merge-adapters "
            "makes it a standalone model")


def check_model_source(source: str, flag: str = "--model") -> None:
    """Refuse ``source`` (named as the option ``flag``) when it cannot be a model, from what is on
    disk alone (no weights read, no network asked): a local path that is not there, a file that is
    not a .gguf, a training run or prepare-data folder, a folder without config.json."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise TinymathError(f"{flag} {source} is a file but not a .gguf; give a .gguf file, a model folder or a "
                                "hub id")
    elif path.is_dir():
        if _is_run_folder(path):
            raise TinymathError(_run_given_as_model(source, path, flag))
        check_not_prepared_data(path, f"{flag} {source}", "a model")
        if not (path / "config.json").exists():
            raise TinymathError(f"{flag} {source} is a folder without config.json, so not a Hugging Face model")
    else:
        check_local_source(flag, source, MODEL_SUFFIXES)


def resolve_source(source: str, flag: str = "--model") -> str:
    """What ``from_pretrained`` should load for ``source``: a hub id or a local folder (a .gguf is
    converted into one), after `check_model_source`."""
    check_model_source(source, flag)
    path = Path(source).expanduser()
    if path.is_file():
        return str(gguf_to_folder(path))
    if path.is_dir():
        return str(path)
    offline_unless_reachable()
    return source  # a hub id


@contextmanager
def _gguf_read_once():
    """transformers parses a GGUF file's header (for a 49k-token vocabulary, ~300k strings in
    pure Python: seconds) once for the config, once for the tokenizer and once for the weights,
    and builds gguf's tensor-name table once per submodule of the model (hundreds of times, the
    same table). Within this block each file is parsed once and its reader (read-only,
    memory-mapped) shared, and each table is built once."""
    import functools

    import gguf

    original, readers = gguf.GGUFReader, {}
    name_map = gguf.get_tensor_name_map

    def shared(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original, name_map


def gguf_to_folder(gguf: Path) -> Path:
    """Convert a .gguf file into a cached Hugging Face folder (fp32 weights + tokenizer), once."""
    digest = _quick_digest(gguf)
    done = _converted(digest)
    if done:  # found without writing anything else: a read-only cache works once it holds the model
        touch(done)
        return done
    with _converting(digest):  # processes started together (accelerate launch): one converts, the others wait
        done = _converted(digest) or _convert(gguf, cache_dir() / "gguf" / f"{gguf.stem}-{digest}")
    prune_cache(cache_dir() / "gguf", GGUF_KEPT, spare_recent=True)
    return done


def _converted(digest: str) -> Path | None:
    """The cached conversion of the GGUF file with this digest (under any file name), if complete."""
    done = [p for p in (cache_dir() / "gguf").glob(f"*-{digest}") if (p / "config.json").exists()]
    return done[0] if done else None


@contextmanager
def _converting(digest: str):
    """An exclusive lock on the cache's conversion of one GGUF file; none where the platform or the
    file system has no ``flock`` (the conversion is still written to a temporary folder and renamed)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    folder = cache_dir() / "gguf"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f".{digest}.lock", "w")
    except OSError as exc:
        raise TinymathError(f"cannot write to tinymath's cache {folder} ({exc.strerror}); "
                            "set TINYMATH_CACHE to a writable folder") from exc
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # some network file systems: no locks
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _no_library_progress_bars():
    """transformers' own bar while it converts a GGUF file ("Converting and de-quantizing GGUF
    tensors...", a plain tqdm that its progress-bar switch does not reach) would land in the middle
    of a command's output."""
    import importlib
    from unittest import mock

    try:
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:  # another transformers: its bar shows, nothing worse
        module = None
    if module is None or not hasattr(module, "tqdm"):
        yield
        return
    with mock.patch.object(module, "tqdm", lambda items, **_: items):
        yield


def _convert(gguf: Path, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinymath.base.files import atomic_output_dir

    import tempfile

    kwargs = dict(gguf_file=gguf.name)
    # the file read alone: beside a merge-adapters output's tokenizer and config files,
    # transformers would take those over the GGUF's own (no EOS, no chat template)
    alone = Path(tempfile.mkdtemp(prefix="tinymath-gguf-"))
    try:
        with _gguf_read_once(), _no_library_progress_bars():
            try:
                (alone / gguf.name).symlink_to(gguf.absolute())
            except OSError:  # no symbolic links here
                shutil.copy(gguf, alone / gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(alone, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(alone, dtype=torch.float32, **kwargs)
    except Exception as exc:  # gguf raises many kinds of errors for a bad file
        detail = str(exc).replace(str(alone / gguf.name), str(gguf)).replace(str(alone), str(gguf.parent))
        raise TinymathError(f"could not read {gguf} as a GGUF model (is it complete, and a model?): {detail}") from exc
    finally:
        shutil.rmtree(alone, ignore_errors=True)
    # Loaded from GGUF, the model carries a "gguf quantizer" that forbids saving; the weights are
    # plain dequantized tensors by now, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


DIGEST_SAMPLES = 256  # 16 KiB pieces spread over a GGUF's middle, hashed with its ends
CONVERSION = 2  # in every cache key: raised when conversions change (2: the GGUF read alone, not with its folder)


def _quick_digest(path: Path) -> str:
    """Size plus a hash of the first and last 4 MiB and of `DIGEST_SAMPLES` pieces spread between
    them: the same file copied elsewhere hits the cache, and a file exported again with other
    weights misses it even when its ends (embeddings, output layer) are the same."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256(f"{CONVERSION}:{size}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(4 << 20))
        for i in range(1, DIGEST_SAMPLES + 1):
            f.seek(size * i // (DIGEST_SAMPLES + 2))
            digest.update(f.read(16 << 10))
        f.seek(max(0, size - (4 << 20)))
        digest.update(f.read())
    return digest.hexdigest()[:16]


def load_tokenizer(source: str, trust_remote_code: bool = False, run: bool = False):
    """The tokenizer of a model source, with a pad token set (generation pads on the left);
    ``run``: ``source`` is a `tinymath train` run folder (given as --adapter), which carries its
    tokenizer. A run folder given as a model is refused."""
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    if not run and _is_run_folder(path):
        raise TinymathError(_run_given_as_model(source, path))
    if run and not (path / "tokenizer_config.json").is_file():
        raise TinymathError(f"the run {source} has no tokenizer_config.json (a run folder carries its tokenizer); "
                            "copy the whole run folder again")
    resolved = str(path) if (path / "tokenizer_config.json").is_file() else resolve_source(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # missing files, unknown architectures, remote code refused
        raise TinymathError(f"could not load the tokenizer of {source}: {missing_files_reason(exc)}") from exc
    if tokenizer.eos_token_id is None:  # training ends every answer with it; decoding stops at it
        raise TinymathError(f"the tokenizer of {source} has no end-of-sequence token: set eos_token in its "
                            "tokenizer_config.json (the token that ends the model's replies)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def compute_dtype(device: str | None = None):
    """bf16 where the hardware has it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    device = device or default_device()
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def get_quantization_config(quant: str, dtype):
    """The transformers quantization config for ``quant`` (`QUANTIZATIONS`), or None for plain weights."""
    if quant not in QUANTIZATIONS:
        raise TinymathError(f"--quant {quant} is not supported; use one of {', '.join(QUANTIZATIONS)}")
    return QUANTIZATIONS[quant](dtype)


def load_base_model(source: str, quant: str = "nf4", dtype=None, device: str | None = None,
                    trust_remote_code: bool = False, flag: str = "--model"):
    """Load a causal LM from ``source``: NF4-quantized (default) or in ``dtype`` (default: `compute_dtype`);
    ``flag``: the option ``source`` came from, for messages."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    dtype = dtype or compute_dtype(device)
    resolved = resolve_source(source, flag)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, device_map={"": device})
    quantization = get_quantization_config(quant, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError) as exc:  # missing files, unknown architectures, remote code refused
        raise TinymathError(f"could not load model {source}: {missing_files_reason(exc)}") from exc
    except SafetensorError as exc:  # a weights file cut short or not safetensors at all
        raise TinymathError(f"could not load model {source}: a weights file is damaged or incomplete ({exc}); "
                            "copy or download the model again") from None
    return model


def model_skeleton(source: str, trust_remote_code: bool = False):
    """The model's layers without their weights (on PyTorch's meta device): its module names and
    shapes from its config alone, for checks that should not wait for a load. None where the
    model's code cannot be built on the meta device (the same checks then run on the loaded model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    resolved = resolve_source(source)
    try:
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # missing files, unknown architectures, remote code refused
        raise TinymathError(f"could not load model {source}: {missing_files_reason(exc)}") from exc
    except Exception:  # e.g. remote code that reads a tensor's value while it is built: not a user mistake
        return None


def model_fingerprint(model) -> dict:
    """Enough of a model's config to tell two base models apart (checked when an adapter is loaded)."""
    cfg = model.config
    return {key: getattr(cfg, key, None) for key in
            ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")}
