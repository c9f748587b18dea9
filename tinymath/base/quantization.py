"""How a base model's weights are held in memory: the one list of quantizations.

`QUANTIZATIONS` maps each ``--quant`` name to the function that builds its transformers
quantization config (None: the weights stay in 16/32-bit). The CLI's choices and the config's
validation both read it; adding a quantization is one entry here.
"""

from __future__ import annotations


def nf4_config(dtype):
    """bitsandbytes NF4 with double quantization (QLoRA), computing and storing in ``dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def no_quantization(dtype):
    """Plain weights in ``dtype``."""
    return None


QUANTIZATIONS = {"nf4": nf4_config, "none": no_quantization}
