"""The README and docs: relative links resolve, the README stays a short
user guide, and its code runs: standalone blocks as written, excerpts of a
recipe line for line from that file in examples/."""
import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(text):
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, re.S)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if "://" in target or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: {target}"


def test_readme_is_a_short_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def readme_excerpts():
    """(block, example file) for README blocks that excerpt an example."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in python_blocks(text):
        start = text.index(block.splitlines()[0])
        named = re.findall(r"`examples/(\w+\.py)`", text[max(0, start - 800):start])
        out.append((block, named[-1] if named and "import" not in block else None))
    return out


def test_readme_excerpts_are_lines_of_their_example():
    excerpts = [(b, f) for b, f in readme_excerpts() if f]
    assert len(excerpts) >= 2
    for block, name in excerpts:
        example = {line.strip() for line in (ROOT / "examples" / name).read_text().splitlines()}
        for line in block.splitlines():
            code = line.split("  #")[0].strip()
            assert any(e.startswith(code) for e in example), f"{name}: {line}"


def test_readme_standalone_blocks_run():
    ran = 0
    for block, name in readme_excerpts():
        if name is None:
            exec(compile(block, "README", "exec"), {})
            ran += 1
    assert ran >= 3
