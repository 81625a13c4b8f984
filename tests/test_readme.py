"""Every Python example in README.md runs (blocks preceded by ``<!-- skip-test -->`` are
shown only: they need a GPU or large checkpoints)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text()
    out = []
    for match in re.finditer(r"(<!-- skip-test -->\s*)?```python\n(.*?)```", text, flags=re.S):
        if match.group(1):
            continue
        line = text[: match.start()].count("\n") + 1
        out.append(pytest.param(match.group(2), id=f"line{line}"))
    return out


def test_readme_has_examples():
    assert len(_blocks()) >= 1


@pytest.mark.parametrize("code", _blocks())
def test_readme_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
