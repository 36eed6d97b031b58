"""The README's Python quick start runs as written (on the tiny model, one step), and every page it links exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_a_front_door():
    assert len(README.splitlines()) <= 250
    for link in re.findall(r"\]\((docs/[^)]+)\)", README):
        assert (ROOT / link).is_file(), link


@pytest.mark.learning
def test_the_python_quick_start_runs(tmp_path, monkeypatch):
    """The first Python block of the README, with the tiny model and one step in place of SmolLM2 and 20 (and the
    process's malloc left as the suite found it: conftest says why)."""
    monkeypatch.setattr("wprlhf.allocator.keep_freed_memory", lambda: False)
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    assert 'policy="smollm2", steps=20' in block and '"runs/dragons"' in block
    code = block.replace('policy="smollm2", steps=20', 'policy="tiny", steps=1, batch_size=2, num_minibatches=1, '
                         'response_length=4').replace('"runs/dragons"', repr(str(tmp_path / "dragons")))  # fmt: skip
    exec(compile(code, "README.md", "exec"), {})
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "dragons" / "policy").config.num_hidden_layers == 2
    import json

    recorded = json.loads((tmp_path / "dragons" / "config.json").read_text())["reward"]
    assert recorded == "python:README.md.reward_fn" or recorded.endswith(".reward_fn"), recorded


def test_every_public_name_the_docs_use_exists():
    """Each `from wprlhf.x import a, b` written in the README or docs/ imports, and each `module.name` they cite in
    backticks (`spec.load_reward`, `judges.story_verdict`) names a module of wprlhf and an attribute of it."""
    import importlib

    pages = [README] + [p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(pages)
    files = [p.relative_to(ROOT).with_suffix("") for p in (ROOT / "wprlhf").rglob("*.py") if p.stem != "__init__"]
    modules = {f.name: ".".join(f.parts) for f in files}  # 'ppo' -> 'wprlhf.methods.ppo'
    assert len(modules) == len(files), "two modules of wprlhf share a name: a doc's `name.attr` would be ambiguous"
    checked = 0
    for module, names in re.findall(r"from (wprlhf[\w.]*) import ([\w, ]+)", text):
        imported = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(imported, name), f"{module}.{name}"
            checked += 1
    for module, name in set(re.findall(r"`(\w+)\.(\w+)`", text)):
        if module in modules and not name.startswith(("py", "json")):  # `ppo.py` is a file, not a name
            assert hasattr(importlib.import_module(modules[module]), name), f"{modules[module]}.{name}"
            checked += 1
    assert checked >= 10
