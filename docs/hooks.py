"""mkdocs hook: ``{{ readme("Heading") }}`` on a page becomes that README section (up to the next heading of
the same or a higher level), with paths rewritten from the repository root to the docs folder, so the
README and the site share one text."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = re.compile(r'^\{\{ readme\("(?P<title>[^"]+)"\) \}\}$', re.MULTILINE)


def _headings(lines: list[str]) -> list[tuple[int, int, str]]:
    """(line index, level, title) of the markdown headings, skipping fenced code (where # is a comment)."""
    out, fenced = [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^(#+) (.*)$", line)):
            out.append((i, len(m.group(1)), m.group(2)))
    return out


def readme_section(title: str, text: str | None = None) -> str:
    lines = (text if text is not None else README.read_text()).splitlines()
    heads = _headings(lines)
    for n, (i, level, name) in enumerate(heads):
        if name.startswith(title):
            end = next((j for j, lv, _ in heads[n + 1 :] if lv <= level), len(lines))
            body = lines[i:end]
            return "\n".join(body).rstrip("\n").replace("](docs/", "](")
    raise KeyError(f"README.md has no section starting with {title!r}")


def on_page_markdown(markdown: str, **_: object) -> str:
    return MARKER.sub(lambda m: readme_section(m.group("title")), markdown)
