"""The docs site builds offline with mkdocs --strict; the README's links lead to files that exist."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_readme_links_and_images_exist():
    """Every relative link and image of the README names a file of the repository."""
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#:]+)\)", text)
    assert targets, "the README links to its docs pages"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, missing


def test_docs_pages_are_all_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert pages and all(f": {p}" in nav for p in pages), pages


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
