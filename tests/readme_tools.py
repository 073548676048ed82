"""Reading the READMEs' examples for the tests that run them: Python snippets and ``physppl`` command lines."""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["python_snippets", "command_lines"]


def python_snippets(path: Path, section: str | None = None) -> list[str]:
    """The ```python blocks of ``path`` (only those under the heading ``section`` when given)."""
    text = path.read_text()
    if section is not None:
        text = text.split(section)[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


def command_lines(path: Path, section: str | None = None) -> list[list[str]]:
    """The ``physppl ...`` command lines of the ```bash blocks (of one section when given), as override lists:
    ``hydra.*`` and ``-m`` dropped, placeholders such as ``<previous run>`` kept as text."""
    text = path.read_text()
    if section is not None:
        text = text.split(section)[1].split("\n## ")[0]
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = re.sub(r"<[^>]*>", "PLACEHOLDER", block.replace("\\\n", " "))
        for line in block.splitlines():
            words = line.split("#")[0].split()
            if words and words[0] == "physppl":
                out.append([w.strip("'") for w in words[1:] if not w.startswith("hydra") and w != "-m"])
    return out
