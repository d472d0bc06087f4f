"""Byte-level text corpora: a built-in one read from the running interpreter, or a user's file.

The built-in corpus is the source of a fixed list of Python standard-library modules, read from
this interpreter's stdlib directory: nothing is downloaded and nothing is shipped. Its exact bytes
depend on the Python version (3.11.7 here gives 910,913 bytes); within one interpreter it is fixed.
"""

from __future__ import annotations

import codecs
import glob
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["STDLIB_FILES", "Corpus", "CorpusError", "builtin_corpus", "sample_batch", "text_corpus", "text_files"]

STDLIB_FILES = (
    "textwrap.py", "string.py", "difflib.py", "argparse.py", "fractions.py", "heapq.py", "bisect.py",
    "functools.py", "statistics.py", "json/decoder.py", "json/encoder.py", "calendar.py", "random.py",
    "shlex.py", "contextlib.py", "dataclasses.py", "enum.py", "inspect.py", "pathlib.py", "typing.py",
)  # fmt: skip
VOCAB_SIZE = 256  # bytes


class CorpusError(ValueError):
    """The text cannot be used for training; the message says why in one line."""


@dataclass
class Corpus:
    """Token ids (bytes, stored as uint8) split into train and validation parts."""

    train: Tensor
    val: Tensor
    sources: tuple[str, ...]
    vocab_size: int = VOCAB_SIZE

    @property
    def n_tokens(self) -> int:
        return self.train.numel() + self.val.numel()


def _split(texts: list[bytes], val_fraction: float) -> tuple[Tensor, Tensor]:
    """Each text contributes its first (1 - f) to train and its last f to validation; ids as uint8 (bytes)."""
    train, val = [], []
    for data in texts:
        cut = int(len(data) * (1 - val_fraction))
        train.append(data[:cut])
        val.append(data[cut:])
    as_ids = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return as_ids(train), as_ids(val)


def builtin_corpus(files: tuple[str, ...] = STDLIB_FILES, val_fraction: float = 0.1) -> Corpus:
    """The standard-library corpus (see ``STDLIB_FILES``)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise CorpusError(f"standard-library files not found under {root}: {', '.join(missing)}")
    train, val = _split([(root / f).read_bytes() for f in files], val_fraction)
    return Corpus(train, val, tuple(str(root / f) for f in files))


def text_files(spec: str | Path) -> list[Path]:
    """The files ``--data`` names: one file, every regular file under a directory (hidden ones left out), or
    the files a glob pattern matches (``**`` crosses directories); sorted, so the corpus is the same each time."""
    text = str(spec)
    if any(c in text for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not found:
            raise CorpusError(f"{text}: the pattern matches no file")
        return found
    p = Path(spec)
    if p.is_dir():
        found = sorted(
            f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not found:
            raise CorpusError(f"{p}: the directory holds no file")
        return found
    return [p]


def text_corpus(path: str | Path, val_fraction: float = 0.1, min_tokens: int = 4096) -> Corpus:
    """A user's UTF-8 text as a corpus: a file, a directory or a glob pattern (``text_files``); each file gives its
    first ``1 - val_fraction`` to training and the rest to validation. ``CorpusError`` with a one-line reason
    naming the file if one is unusable (missing, binary, not UTF-8) or the whole is too short."""
    files = text_files(path)
    if len(files) == 1:
        return _one_file(files[0], val_fraction, min_tokens)
    train, val = bytearray(), bytearray()  # one growing copy of each split; each file's own bytes are freed in turn
    for f in files:
        data = memoryview(_read_text(f))
        cut = int(len(data) * (1 - val_fraction))
        train += data[:cut]
        val += data[cut:]
    if len(train) + len(val) < min_tokens:
        raise CorpusError(
            f"{path}: too short ({len(train) + len(val)} bytes in {len(files)} files); need at least {min_tokens}"
        )
    as_ids = lambda b: torch.frombuffer(b, dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)
    return Corpus(as_ids(train), as_ids(val), tuple(str(f) for f in files))


def _one_file(p: Path, val_fraction: float, min_tokens: int) -> Corpus:
    data = _read_text(p)
    if not data:
        raise CorpusError(f"{p}: the file is empty")
    if len(data) < min_tokens:
        raise CorpusError(f"{p}: too short ({len(data)} bytes); need at least {min_tokens} bytes of text")
    ids = torch.frombuffer(data, dtype=torch.uint8)
    cut = int(len(data) * (1 - val_fraction))
    return Corpus(ids[:cut], ids[cut:], (str(p),))


def _read_text(p: Path) -> bytearray:
    """The bytes of UTF-8 text file ``p`` (empty for an empty or all-whitespace file); ``CorpusError`` otherwise."""
    if not p.exists():
        raise CorpusError(f"{p}: no such file")
    if not p.is_file():
        raise CorpusError(f"{p}: not a regular file")
    size = p.stat().st_size
    data = bytearray(size)  # the file's one copy in memory: train and validation are views of it (uint8)
    with p.open("rb") as f:
        got = f.readinto(data)
    del data[got:]
    if not data or data.isspace():
        return bytearray()
    if b"\x00" in data[:65536]:
        raise CorpusError(
            f"{p}: looks binary (contains NUL bytes); give UTF-8 text files (a glob such as 'DIR/**/*.txt')"
        )
    _check_utf8(p, data)
    return data


def _check_utf8(p: Path, data: bytearray, chunk: int = 1 << 24) -> None:
    """``CorpusError`` unless ``data`` is UTF-8, decoded 16 MB at a time (a whole decoded copy of a large file
    would take up to four times its size)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    for start in range(0, len(data), chunk):
        try:
            decoder.decode(view[start : start + chunk], final=start + chunk >= len(data))
        except UnicodeDecodeError as err:
            raise CorpusError(f"{p}: not valid UTF-8 text (byte {start + err.start})") from None


def sample_batch(data: Tensor, batch_size: int, ctx: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows of ``ctx + 1`` tokens: inputs and next-token targets, shape (batch, ctx)."""
    starts = torch.randint(0, data.numel() - ctx - 1, (batch_size,), generator=generator)
    windows = torch.stack([data[s : s + ctx + 1] for s in starts.tolist()]).long()  # ids are stored as uint8
    return windows[:, :-1], windows[:, 1:]
