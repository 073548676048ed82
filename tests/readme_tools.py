"""Reading the READMEs' examples for the tests that run them: Python snippets and ``physppl`` command lines."""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["python_snippets", "command_lines", "composed_configs"]


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


def composed_configs(path: Path, section: str | None = None) -> list:
    """Each command line of :func:`command_lines` composed against physppl's configuration (an error if an option
    was renamed away): a sweep's value list is checked by its first value; optuna's search-space expressions
    (``interval(...)``, ``choice(...)``) are left to optuna."""
    from hydra import compose, initialize_config_module

    configs = []
    with initialize_config_module("physppl.conf", version_base="1.3"):
        for overrides in command_lines(path, section):
            single = []
            for o in overrides:
                key, _, value = o.partition("=")
                if "(" in value:
                    continue
                single.append(f"{key}={value.split(',')[0]}" if "," in value and "[" not in value else o)
            configs.append((overrides, compose("config", overrides=single)))
    return configs
