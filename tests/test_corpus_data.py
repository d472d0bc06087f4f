"""--data as a file, a directory or a glob; --tokens; the warning when a run would repeat its text."""

import json

import pytest

from muonkit.cli import main
from muonkit.train import builtin_corpus, text_corpus
from muonkit.train.corpus import CorpusError, text_files


@pytest.fixture(scope="module")
def texts():
    data = bytes(builtin_corpus().train[:40_000].tolist())
    return data[:20_000], data[20_000:]


@pytest.fixture
def folder(tmp_path, texts):
    root = tmp_path / "books"
    (root / "part").mkdir(parents=True)
    (root / "a.txt").write_bytes(texts[0])
    (root / "part" / "b.txt").write_bytes(texts[1])
    (root / ".hidden.txt").write_bytes(b"\x00\x01")  # hidden: left out
    return root


def test_a_directory_and_a_glob_give_every_file_split_alike(folder, texts):
    by_dir = text_corpus(folder)
    by_glob = text_corpus(str(folder / "**" / "*.txt"))
    assert [p.rsplit("/", 1)[-1] for p in by_dir.sources] == ["a.txt", "b.txt"]
    assert by_dir.sources == by_glob.sources
    assert bytes(by_dir.train.tolist()) == texts[0][:18_000] + texts[1][:18_000]  # each file: first 90% to train
    assert bytes(by_dir.val.tolist()) == texts[0][18_000:] + texts[1][18_000:]


@pytest.mark.parametrize(
    "make, words",
    [(lambda root: root / "nothing*.txt", "matches no file"),
     (lambda root: (root / "part" / "c.bin").write_bytes(b"\x00" * 10) and root, "c.bin: looks binary"),
     (lambda root: (root / "part" / "d.txt").write_bytes(b"\xff\xfe abc") and root, "d.txt: not valid UTF-8")],
    ids=["empty pattern", "binary file", "not utf-8"],
)  # fmt: skip
def test_an_unusable_file_is_named(folder, make, words):
    with pytest.raises(CorpusError, match=words):
        text_corpus(make(folder))


def test_an_empty_directory_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no file"):
        text_files(tmp_path / "empty")


def test_tokens_set_the_steps_and_a_run_that_repeats_its_text_is_warned(folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", str(folder), "--size", "tiny", "--tokens", "1000", "--batch-size", "4",
            "--optimizers", "adamw", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["steps"] == 4  # ceil(1000 / (4 x 64))
    text = capsys.readouterr().out
    assert "(2 files)" in text and "warning" not in text
    argv[argv.index("--tokens") + 1] = "100000"
    assert main([*argv, "--overwrite"]) == 0
    assert "warning: each optimizer trains on 100,096 tokens" in capsys.readouterr().out


def test_tokens_and_steps_together_are_refused(folder, tmp_path, capsys):
    argv = ["train", "--data", str(folder), "--tokens", "1000", "--steps", "5", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "not both" in capsys.readouterr().err
