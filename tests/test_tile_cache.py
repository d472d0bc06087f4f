"""The tile choices' disk cache (``muonkit.accel.tile_cache``): what one process timed, the next one reads; a file
that is missing, foreign, corrupt or unwritable never stops anything."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import stand_in_timing
from muonkit.accel import kernels, tile_cache

CONFIGS = ((128, 64, 8, 3), (128, 64, 4, 3))
KEY = (4, 768, 3072, False, torch.bfloat16, False, True, "NVIDIA H200")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(tile_cache.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_choices_round_trip_through_one_file_per_software_version(cache_dir):
    assert tile_cache.load(CONFIGS) == {}  # nothing yet
    assert tile_cache.save(CONFIGS, {KEY: (128, 64, 4, 3)})
    (file,) = cache_dir.iterdir()
    assert file == tile_cache.path(CONFIGS) and torch.__version__.split("+")[0] in file.name
    assert tile_cache.load(CONFIGS) == {KEY: (128, 64, 4, 3)}  # the dtype comes back as a torch.dtype
    other = (*KEY[:-1], "NVIDIA H100 80GB HBM3")
    assert tile_cache.save(CONFIGS, {other: (128, 64, 8, 3)})  # merged with what the file holds
    assert tile_cache.load(CONFIGS) == {KEY: (128, 64, 4, 3), other: (128, 64, 8, 3)}
    assert tile_cache.path(CONFIGS[:1]) != file and tile_cache.load(CONFIGS[:1]) == {}  # other candidates


def test_foreign_corrupt_or_unknown_entries_are_ignored_and_replaced(cache_dir):
    tile_cache.save(CONFIGS, {KEY: (128, 64, 4, 3)})
    file = tile_cache.path(CONFIGS)
    data = json.loads(file.read_text())
    data["versions"]["torch"] = "0.1"
    file.write_text(json.dumps(data))
    assert tile_cache.load(CONFIGS) == {}  # written by other software
    for text in ("{not json", "[]", '{"versions": 1}', ""):
        file.write_text(text)
        assert tile_cache.load(CONFIGS) == {}
    data["versions"] = tile_cache._versions(CONFIGS)
    stale = [tile_cache._encode((*KEY[:-1], "x")), [64, 64, 2, 2]]  # a configuration no longer a candidate
    data["choices"].append(stale)
    file.write_text(json.dumps(data))
    assert tile_cache.load(CONFIGS) == {KEY: (128, 64, 4, 3)}
    assert tile_cache.save(CONFIGS, {KEY: (128, 64, 8, 3)}) and tile_cache.load(CONFIGS) == {KEY: (128, 64, 8, 3)}
    assert [p.name for p in cache_dir.iterdir()] == [file.name]  # no temporary file left behind


@pytest.mark.parametrize("value", ["off", "0", "", "FALSE"])
def test_off_keeps_choices_in_memory_only(monkeypatch, tmp_path, value):
    monkeypatch.setenv(tile_cache.ENV, value)
    monkeypatch.chdir(tmp_path)
    assert tile_cache.path(CONFIGS) is None and not tile_cache.save(CONFIGS, {KEY: CONFIGS[0]})
    assert tile_cache.load(CONFIGS) == {} and not list(tmp_path.iterdir())


def test_default_location_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(tile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tile_cache.directory() == tmp_path / "muonkit"


def test_an_unwritable_place_is_not_an_error(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(tile_cache.ENV, str(blocker / "cache"))  # a directory cannot be made under a file
    assert not tile_cache.save(CONFIGS, {KEY: CONFIGS[0]})
    assert tile_cache.load(CONFIGS) == {}


def test_the_tuner_reads_what_an_earlier_process_timed(monkeypatch, cache_dir):
    """First process: the shape is timed and written. A new process (empty memory, file not yet read) takes the
    written choice without timing anything."""
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "CONFIGS", CONFIGS)
    monkeypatch.setattr(kernels._Disk, "loaded", False)
    ms = {(128, 64, 8, 3): 2.0, (128, 64, 4, 3): 1.0}
    last: list = []
    stand_in_timing(monkeypatch, lambda: ms[last[-1]])
    key = (*KEY[:5], True, False, "gpu")  # not upper storage: every configuration is a candidate
    assert kernels._tune(last.append, key) == (128, 64, 4, 3) and last
    assert tile_cache.load(CONFIGS) == {key: (128, 64, 4, 3)}
    monkeypatch.setattr(kernels, "_best", {})  # a new process
    monkeypatch.setattr(kernels._Disk, "loaded", False)

    def must_not_run(cfg):
        raise AssertionError("timed again")

    assert kernels._tune(must_not_run, key) == (128, 64, 4, 3)
