"""Built-in training tasks for the demo: byte-level GPT on standard-library text."""

from .corpus import Corpus, CorpusError, builtin_corpus, text_corpus
from .loop import OPTIMIZERS, RunResult, make_optimizer, steps_to_reach, train_lm
from .model import GPT, SIZES, GPTConfig

__all__ = [
    "GPT",
    "OPTIMIZERS",
    "SIZES",
    "Corpus",
    "CorpusError",
    "GPTConfig",
    "RunResult",
    "builtin_corpus",
    "make_optimizer",
    "steps_to_reach",
    "text_corpus",
    "train_lm",
]
