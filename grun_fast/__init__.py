"""grun_fast: fast GRUN unlearning for Hugging Face causal language models."""
from grun_fast.version import __version__

__all__ = ["__version__"]
