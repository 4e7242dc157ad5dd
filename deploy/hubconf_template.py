"""torch.hub entry points of an exportline bundle (copied into the bundle as hubconf.py).

    torch.hub.load("path/to/bundle", "model", source="local")

Each entry point loads from the folder this file is in, so the bundle's own weights are used.
"""

import os

dependencies = ["torch", "transformers"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def model(**kwargs):
    """The causal language model of this bundle with its weights (AutoModelForCausalLM)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_HERE, **kwargs)


def tokenizer(**kwargs):
    """The tokenizer of this bundle (AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_HERE, **kwargs)
