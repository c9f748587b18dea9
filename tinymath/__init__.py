"""tinymath: fine-tune small chat LLMs to solve grade-school math step by step.

The public Python API. Every CLI command is one of these service functions; importing this
package is cheap (torch and transformers are imported by the functions that need them). The
services live in `tinymath.services` (one module per command), on the libraries of
`tinymath.lib`, on the base of `tinymath.base`.

    from tinymath import extract_answer, is_correct
    extract_answer("... so she pays 18 dollars.\\n#### 18")   # -> "18"
"""

__version__ = "0.1.0"

from tinymath.base.errors import TinymathError
from tinymath.base.prompts import extract_answer, is_correct


def prepare_data(*args, **kwargs):
    """Read GSM8K, format, tokenize and mask it, save it to disk. See `tinymath.services.prepare.prepare_data`."""
    from tinymath.services.prepare import prepare_data as run

    return run(*args, **kwargs)


def train(*args, **kwargs):
    """QLoRA fine-tuning into a run folder. See `tinymath.services.train.train`."""
    from tinymath.services.train import train as run

    return run(*args, **kwargs)


def merge_adapters(*args, **kwargs):
    """Merge a run's adapter into a standalone model. See `tinymath.services.merge.merge_adapters`."""
    from tinymath.services.merge import merge_adapters as run

    return run(*args, **kwargs)


def evaluate(*args, **kwargs):
    """GSM8K accuracy of a model or run. See `tinymath.services.evaluate.evaluate`."""
    from tinymath.services.evaluate import evaluate as run

    return run(*args, **kwargs)


def compare(*args, **kwargs):
    """Paired comparison of two eval folders. See `tinymath.services.evaluate.compare`."""
    from tinymath.services.evaluate import compare as run

    return run(*args, **kwargs)


def evaluate_retention(*args, **kwargs):
    """Drift of a tuned model from its base. See `tinymath.services.retention.evaluate_retention`."""
    from tinymath.services.retention import evaluate_retention as run

    return run(*args, **kwargs)


__all__ = [
    "__version__",
    "TinymathError",
    "extract_answer",
    "is_correct",
    "prepare_data",
    "train",
    "merge_adapters",
    "evaluate",
    "compare",
    "evaluate_retention",
]
