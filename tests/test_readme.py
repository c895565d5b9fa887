"""README.md's Python examples run as written.

Every ```python block of README.md is a test case, found anew at each collection, so sections
added later are covered without touching this file. A block that cannot run on a CPU (it needs a
CUDA GPU, a checkpoint download, several processes) carries the marker

    <!-- readme-test: skip (the reason) -->

on the line before its fence; it is still compiled (no syntax errors) and is reported as a skip
with that reason (``pytest -rs``). Every other block runs in a fresh namespace, in an empty
temporary working directory, on this machine's CPU (kernels in Triton's interpreter, as
conftest.py sets it up); examples keep to the tiny model and small inputs so that each takes a
few seconds.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
SKIP = re.compile(r"^\s*<!--\s*readme-test:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
MARKER = re.compile(r"readme-test", re.IGNORECASE)
PYTHON = ("python", "py")


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    heading: str  # the section it is in
    code: str
    skip: str | None  # the reason, or None: it runs

    @property
    def name(self) -> str:
        return f"line{self.line}-" + re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")[:40]


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, with their skip markers; stray or malformed markers raise."""
    lines = text.splitlines()
    blocks, heading, i = [], "top", 0
    pending: tuple[int, str] | None = None  # a skip marker waiting for its block: (line, reason)
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            if MARKER.search(line):
                skip = SKIP.match(line)
                if skip is None:
                    raise ValueError(f"README.md:{i + 1}: malformed marker {line.strip()!r}; write "
                                     "<!-- readme-test: skip (reason) -->")
                if pending is not None:
                    raise ValueError(f"README.md:{pending[0]}: skip marker with no ```python block after it")
                pending = (i + 1, skip["reason"].strip())
            elif line.strip() and pending is not None:
                raise ValueError(f"README.md:{pending[0]}: skip marker not right before a ```python block")
            i += 1
            continue
        indent, lang, start = fence["indent"], fence["lang"].lower(), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1  # the closing fence
        if lang in PYTHON:
            blocks.append(Block(start + 1, heading, "\n".join(body) + "\n", pending[1] if pending else None))
        elif pending is not None:
            raise ValueError(f"README.md:{pending[0]}: skip marker before a ```{lang} block; only ```python "
                             "blocks are run")
        pending = None
    if pending is not None:
        raise ValueError(f"README.md:{pending[0]}: skip marker with no ```python block after it")
    return blocks


BLOCKS = python_blocks(README.read_text())


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_readme_example_runs_as_written(block, tmp_path, monkeypatch):
    compiled = compile(block.code, f"README.md:{block.line}", "exec")  # skipped blocks still parse
    if block.skip is not None:
        pytest.skip(f"README.md:{block.line} ({block.heading}): {block.skip}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(README.parent / "configs")  # the shipped configs the examples name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights in the examples: focal warnings expected
        exec(compiled, {"__name__": "__readme__"})  # noqa: S102 - running the README's own code is the point


def test_readme_has_examples_that_run():
    """A parser that found nothing, or a README whose every example is skipped, would pass silently."""
    assert len(BLOCKS) >= 5 and sum(b.skip is None for b in BLOCKS) >= 3, [(b.line, b.skip) for b in BLOCKS]


@pytest.mark.parametrize("text, message", [
    ("<!-- readme-test: skip (gpu) -->\n```bash\nls\n```\n", "before a ```bash block"),
    ("<!-- readme-test: skip (gpu) -->\nsome prose\n```python\npass\n```\n", "not right before"),
    ("<!-- readme-test: skip -->\n```python\npass\n```\n", "malformed marker"),
    ("```python\npass\n```\n<!-- readme-test: skip (gpu) -->\n", "no ```python block after it"),
])
def test_misplaced_markers_are_refused(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        python_blocks(text)


def test_markers_and_indented_blocks_are_read():
    text = ("# A\n<!-- readme-test: skip (needs CUDA) -->\n\n```python\nimport torch\n```\n"
            "- item:\n\n  ```python\n  x = 1\n  if x:\n      y = 2\n  ```\n")
    first, second = python_blocks(text)
    assert (first.line, first.heading, first.skip, first.code) == (4, "A", "needs CUDA", "import torch\n")
    assert second.skip is None and second.code == "x = 1\nif x:\n    y = 2\n"
