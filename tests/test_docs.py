"""The docs site builds offline with mkdocs --strict, and its pages carry the README's sections."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
from hooks import on_page_markdown, readme_section  # noqa: E402


def test_readme_section_stops_at_the_next_heading_of_its_level():
    text = "# T\n## A\na1\n```\n# a comment, not a heading\n```\n### A.1\na2\n## B\nb\n"
    assert readme_section("A", text) == "## A\na1\n```\n# a comment, not a heading\n```\n### A.1\na2"
    assert readme_section("B", text) == "## B\nb"
    with pytest.raises(KeyError, match="no section"):
        readme_section("C", text)


def test_marker_is_replaced_and_paths_rewritten():
    out = on_page_markdown('{{ readme("Distributed training") }}')
    assert out.startswith("## Distributed training") and "](docs/" not in out and "](img/" in out


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs and mkdocstrings are in the docs extra",
)
def test_site_builds_strict_offline(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "api" / "index.html").read_text()
    assert "nonfinite" in api and "ReplicatedExecutor" in api and "QKClip" in api
    assert "ReplicatedExecutor" in (tmp_path / "distributed" / "index.html").read_text()
    faq = (tmp_path / "faq" / "index.html").read_text()
    assert "NonFiniteGradientError" in faq
    assert (tmp_path / "img" / "distributed_train_h200x2.png").exists()
