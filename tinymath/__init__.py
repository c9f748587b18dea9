"""tinymath: fine-tune small chat LLMs to solve grade-school math step by step.

The public Python API. Every CLI command is one of these service functions; importing this
package is cheap (torch and transformers are imported by the functions that need them).

    from tinymath import extract_answer, is_correct
    extract_answer("... so she pays 18 dollars.\\n#### 18")   # -> "18"
"""

__version__ = "0.1.0"

from tinymath.errors import TinymathError
from tinymath.prompts import extract_answer, is_correct


def prepare_data(*args, **kwargs):
    """Read GSM8K, format, tokenize and mask it, save it to disk. See `tinymath.data.prepare_data`."""
    from tinymath.data import prepare_data as _prepare_data

    return _prepare_data(*args, **kwargs)


def train(*args, **kwargs):
    """QLoRA fine-tuning into a run folder. See `tinymath.train.train`."""
    from tinymath.train import train as _train

    return _train(*args, **kwargs)


def merge_adapters(*args, **kwargs):
    """Merge a run's adapter into a standalone model. See `tinymath.merge.merge_adapters`."""
    from tinymath.merge import merge_adapters as _merge

    return _merge(*args, **kwargs)


def evaluate(*args, **kwargs):
    """GSM8K accuracy of a model or run. See `tinymath.evaluate.evaluate`."""
    from tinymath.evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = [
    "__version__",
    "TinymathError",
    "extract_answer",
    "is_correct",
    "prepare_data",
    "train",
    "merge_adapters",
    "evaluate",
]
