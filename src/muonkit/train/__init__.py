"""Built-in training tasks for the demo: byte-level GPT on standard-library text, CNN on 8x8 digits."""

from .corpus import Corpus, CorpusError, builtin_corpus, text_corpus
from .loop import RunResult, run_comparison, run_key, steps_to_reach, train_one
from .model import GPT, SIZES, GPTConfig
from .optimizers import DEFAULT_LR, OPTIMIZERS, make_optimizer
from .tasks import DigitsCNN, DigitsTask, LMTask, Task

__all__ = [
    "DEFAULT_LR",
    "GPT",
    "OPTIMIZERS",
    "SIZES",
    "Corpus",
    "CorpusError",
    "DigitsCNN",
    "DigitsTask",
    "GPTConfig",
    "LMTask",
    "RunResult",
    "Task",
    "builtin_corpus",
    "make_optimizer",
    "run_comparison",
    "run_key",
    "steps_to_reach",
    "text_corpus",
    "train_one",
]
