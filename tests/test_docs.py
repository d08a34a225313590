"""The documentation holds together: links resolve, CI finds its test command, every module
is in ARCHITECTURE.md. Plain file reads, no model is built."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "ARCHITECTURE.md", *(ROOT / "docs").glob("*.md")])
# Written on another branch; linked before it merges.
PENDING = {ROOT / "SECURITY.md"}

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(text: str) -> list[str]:
    """Targets of the Markdown links and images in ``text``, outside code."""
    return _LINK.findall(_CODE.sub("", _FENCE.sub("", text)))


def anchors(text: str) -> set[str]:
    """The heading anchors GitHub makes for ``text`` (lower case, punctuation dropped,
    spaces to hyphens, ``-1``, ``-2`` for repeats)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken(page: Path) -> list[str]:
    """Every relative link of ``page`` whose file or heading does not exist."""
    bad = []
    for target in links(page.read_text()):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if dest in PENDING:
            continue
        if not dest.exists():
            bad.append(f"{target}: no file {_shown(dest)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            bad.append(f"{target}: no heading #{anchor} in {_shown(dest)}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert not broken(page), f"{page.relative_to(ROOT)}: {broken(page)}"


def test_link_check_catches_a_missing_file_and_heading(tmp_path: Path) -> None:
    tmp_path = tmp_path.resolve()
    (tmp_path / "b.md").write_text("# Title\n\n## Large models: `--max-memory`\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md) [ok](b.md#large-models---max-memory) [web](https://x.org/y)\n"
                    "![img](missing.png) [gone](b.md#nowhere) `[code](not/a/link.md)`\n"
                    "```\n[fenced](also/not.md)\n```\n")
    assert broken(page) == [f"missing.png: no file {tmp_path / 'missing.png'}",
                            f"b.md#nowhere: no heading #nowhere in {tmp_path / 'b.md'}"]


def test_readme_test_command_is_what_ci_runs() -> None:
    # .ci/run runs the line after the first "# test-command" line of README.md.
    lines = (ROOT / "README.md").read_text().splitlines()
    at = lines.index("# test-command")
    assert lines[at + 1] == "python -m pytest -q"
    assert lines[at - 1] == "```bash"


def _defines_something(init: Path) -> bool:
    """Whether a package ``__init__.py`` holds more than its docstring."""
    body = ast.parse(init.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def test_architecture_lists_every_module() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    listed = set(re.findall(r"`(explorer/[\w/]+\.py)`", text))
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "explorer").rglob("*.py")
               if p.name != "__init__.py" or _defines_something(p)}
    missing = sorted(modules - listed)
    assert not missing, f"add to ARCHITECTURE.md's module table: {missing}"
    gone = sorted(m for m in listed if not (ROOT / m).exists())
    assert not gone, f"ARCHITECTURE.md lists modules that do not exist: {gone}"
