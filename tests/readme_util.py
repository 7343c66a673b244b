"""The README's code blocks, for tests that run them as written."""
import pathlib
import re
import textwrap

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker):
    """The first ```python block after the line ``marker`` in README.md."""
    text = README.read_text()
    start = text.index(marker)
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    return textwrap.dedent(block.group(1))
