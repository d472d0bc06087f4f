import json

import numpy as np
import pytest
import torch

from muonkit import coefficients as C
from muonkit import orthogonalize
from muonkit.cli import main


def run(capsys, *args):
    code = main(["coeffs", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_show_compare(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0 and all(name in out for name in C.list_presets())
    code, out, _ = run(capsys, "show", "fixed_point_quintic")
    assert code == 0 and "(3.25, -3.51, 1.26)" in out and "attracting fixed point" in out and "f'(1) = -0.98" in out
    code, out, _ = run(capsys, "show", "jordan")
    assert "not an attracting" in out and "outside 1 +- 0.3" in out
    code, out, _ = run(capsys, "compare", "jordan", "polar_express", "--x-lo", "1e-2")
    lines = [ln for ln in out.splitlines() if ln.startswith(("jordan", "polar_express"))]
    assert code == 0 and len(lines) == 2 and "15" in lines[0]


def test_design_minimax_saves_preset_usable_by_orthogonalize(capsys, tmp_path):
    path = tmp_path / "pe7.json"
    code, _, _ = run(
        capsys, "design", "--method", "minimax", "--degree", "7", "--steps", "4", "--l", "0.01", "--save", str(path)
    )
    assert code == 0 and path.exists()
    saved = json.loads(path.read_text())
    assert len(saved["rows"]) == 4 and len(saved["rows"][0]) == 4
    preset = C.as_preset(str(path))
    assert preset.degree == 7 and preset.default_steps == 4
    G = torch.randn(40, 30, dtype=torch.float64)
    assert torch.allclose(orthogonalize(G, str(path)), orthogonalize(G, preset))


def test_design_fixed_point_and_tune(capsys):
    code, out, _ = run(capsys, "design", "--method", "fixed-point", "--degree", "5", "--a", "3.25")
    assert code == 0 and "(3.25, -3.51, 1.26)" in out
    code, out, _ = run(capsys, "design", "--method", "tune", "--degree", "3", "--steps", "5", "--x-lo", "0.02")
    assert code == 0 and "tuned" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (("show", "nope"), "unknown coefficient preset"),
        (("design", "--method", "minimax", "--degree", "4"), "odd"),
        (("design", "--method", "fixed-point", "--degree", "3", "--a", "2.5"), "not an attracting"),
        (
            ("design", "--method", "tune", "--degree", "3", "--steps", "3", "--eps", "0.05", "--x-lo", "1e-4"),
            "no degree-3",
        ),
        (("show", "/nonexistent/file.json"), "not found"),
    ],
)
def test_errors_are_one_line(capsys, args, message):
    code, _, err = run(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_plot_writes_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cubic.png"
    code, _, _ = run(capsys, "plot", "bernstein", "fixed_point_cubic", "--per-step", "--out", str(out))
    assert code == 0 and out.read_bytes()[:4] == b"\x89PNG"
    import matplotlib.image

    pixels = matplotlib.image.imread(out)  # decodes: a real image with curves on it, not a blank canvas
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)) > 20
