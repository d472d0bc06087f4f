import math

import pytest

from muonkit import coefficients as C


def test_builtin_presets_have_provenance():
    expected = {"bernstein", "fixed_point_cubic", "fixed_point_quintic", "jordan", "you", "polar_express"}
    assert expected <= set(C.list_presets())
    for name in C.list_presets():
        p = C.get(name)
        assert p.name == name
        assert p.source and p.design
        assert p.degree >= 3 and p.degree % 2 == 1
        assert p.degree == 2 * len(p.rows[0]) - 1


def test_published_numbers():
    assert C.get("jordan").rows == ((3.4445, -4.7750, 2.0315),)
    assert C.get("bernstein").rows == ((1.5, -0.5),)
    assert C.get("fixed_point_cubic").rows == ((1.99, -0.99),)
    assert C.get("fixed_point_quintic").rows == ((3.25, -3.51, 1.26),)
    you = C.get("you")
    assert len(you.rows) == 5 and you.rows[0] == (4.0848, -6.8946, 2.9270) and you.rows[-1] == (2.8366, -3.0525, 1.2012)


def test_fixed_point_presets_fix_one():
    # f(1) = a + b + c = 1 for the fixed-point designs (the tuned 'jordan' deliberately gives 0.701).
    for name in ("bernstein", "fixed_point_cubic", "fixed_point_quintic"):
        assert math.isclose(sum(C.get(name).rows[0]), 1.0, abs_tol=1e-12)
    assert math.isclose(sum(C.get("jordan").rows[0]), 0.701, abs_tol=1e-12)


def test_polar_express_safety_scaling():
    pe = C.get("polar_express")
    assert len(pe.rows) == 8 and pe.default_steps == 5 and pe.norm_scale == 1.01
    # First published raw row, divided by 1.01, 1.01^3, 1.01^5; the last row (the limit) untouched.
    a, b, c = pe.rows[0]
    assert math.isclose(a * 1.01, 8.28721201814563, rel_tol=1e-14)
    assert math.isclose(b * 1.01**3, -23.595886519098837, rel_tol=1e-14)
    assert math.isclose(c * 1.01**5, 17.300387312530933, rel_tol=1e-14)
    assert pe.rows[-1] == (1.875, -1.25, 0.375)


def test_schedule_repeats_last_row():
    you = C.get("you")
    sched = you.schedule(7)
    assert sched[:5] == you.rows and sched[5] == sched[6] == you.rows[-1]
    assert you.schedule(2) == you.rows[:2]
    assert C.get("jordan").schedule() == C.get("jordan").rows * 5
    assert C.schedule("jordan", 0) == ()


def test_plain_rows_accepted():
    single = C.as_preset((3.4445, -4.7750, 2.0315))
    assert single.rows == ((3.4445, -4.7750, 2.0315),) and single.default_steps == 5
    multi = C.as_preset([[3.0, -3.2, 1.2], [2.0, -1.5, 0.5], [1.875, -1.25, 0.375]])
    assert multi.default_steps == 3 and multi.degree == 5
    seventh = C.as_preset([(3.0, -4.0, 2.5, -0.5)])
    assert seventh.degree == 7
    assert C.as_preset(C.get("you")) is C.get("you")


@pytest.mark.parametrize(
    "bad, exc",
    [
        ("nope", ValueError),
        ([], ValueError),
        ([(1.0,)], ValueError),  # degree 1
        ([(1.5, -0.5), (3.0, -3.0, 1.0)], ValueError),  # mixed degrees
        ([(float("nan"), 1.0)], ValueError),
        (42, TypeError),
        ([("a", "b")], TypeError),
    ],
)
def test_bad_coefficients(bad, exc):
    with pytest.raises(exc):
        C.as_preset(bad)


def test_register_refuses_silent_overwrite():
    p = C.Preset(name="jordan", rows=((1.5, -0.5),), source="x", design="x", default_steps=5)
    with pytest.raises(ValueError, match="exists already"):
        C.register(p)
    assert C.get("jordan").rows == ((3.4445, -4.7750, 2.0315),)


def test_saved_preset_is_read_once_per_file_version(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    path.write_text(C.get("you").to_json())
    reads = []
    original = C.load_json
    monkeypatch.setattr(C, "load_json", lambda p: reads.append(p) or original(p))
    C._load_json_cached.cache_clear()
    assert C.as_preset(str(path)).rows == C.get("you").rows
    C.as_preset(str(path))
    assert len(reads) == 1
    import os

    stat = path.stat()
    path.write_text(C.get("jordan").to_json())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert C.as_preset(str(path)).rows == C.get("jordan").rows and len(reads) == 2
    with pytest.raises(ValueError, match="not found"):
        C.as_preset(str(tmp_path / "missing.json"))
