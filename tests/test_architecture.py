"""The import graph keeps the tiers of docs/architecture.md: every arrow points down.

That page's tier diagram is the one table; this test reads it. It places every module of wprlhf/ and
wprlhf/labeling/ in it, parses each module's imports with `ast` (at the top of the file and inside functions,
relative and absolute) and fails on any import of a module of the same or a higher tier, naming the arrow
(`a.py -> b.py (tier i -> tier j)`). Modules the diagram names but the tree does not hold yet are skipped. Beside the
tiers: labeling/ imports nothing from wprlhf, report.py and labeling/ never import torch, nothing imports cli,
only cli reads sys.argv, and core.py imports nothing from wprlhf.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wprlhf"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
BOTTOM = "errors"
"""Imports nothing; any module may import it, in its own tier too (docs/architecture.md)."""
NO_TORCH = ("report", "labeling/")


def read_tiers(page: str) -> dict[str, int]:
    """{module: tier} from the first code block of docs/architecture.md: lines `tier N  a, b, c`."""
    if "```" not in page:
        raise AssertionError("docs/architecture.md has no code block, where the tier diagram lives")
    block = page.split("```", 2)[1]
    tiers: dict[str, int] = {}
    for line in block.splitlines():
        match = re.match(r"\s*tier (\d+)\s+(.+)", line)
        if not match:
            continue
        for name in match.group(2).split(","):
            name = name.strip()
            if name in tiers:
                raise AssertionError(f"docs/architecture.md's tier diagram places {name} twice (tiers "
                                     f"{tiers[name]} and "
                                     f"{match.group(1)})")  # fmt: skip
            tiers[name] = int(match.group(1))
    if not tiers:
        raise AssertionError("docs/architecture.md has no 'tier N  module, module' lines")
    return tiers


def package_sources(package: Path = PACKAGE) -> dict[str, str]:
    """{module: source} for wprlhf/*.py and wprlhf/labeling/*.py; a module is named by its path without .py
    ('core', 'labeling/store', '__init__' for the package itself)."""
    files = sorted(package.glob("*.py")) + sorted(package.glob("labeling/*.py"))
    return {f.relative_to(package).with_suffix("").as_posix(): f.read_text(encoding="utf-8") for f in files}


def _dotted(name: str) -> str:
    """'labeling/store' -> 'wprlhf.labeling.store'; '__init__' -> 'wprlhf'; 'labeling/__init__' -> 'wprlhf.labeling'."""
    parts = ["wprlhf", *name.split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _file(name: str) -> str:
    return f"{name}.py"


def imports(name: str, source: str, modules: set[str]) -> list[tuple[str, int]]:
    """Every module that `name` imports, as (dotted name, line), anywhere in the file: wprlhf modules resolved
    from relative and absolute forms (`from . import x` names module x when x is one), plus the packages whose
    __init__ such an import runs on the way (not the importer's own), plus every outside module as written."""
    known = {_dotted(m) for m in modules}
    here = _dotted(name)
    package = here if name.split("/")[-1] == "__init__" else here.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in known]
            targets = submodules or [module]
        for target in targets:
            found.append((target, node.lineno))
            if target.startswith("wprlhf."):  # importing a.b.c runs a/b/__init__.py first
                parts = target.split(".")
                for i in range(2, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent != here and not here.startswith(parent + "."):
                        found.append((parent, node.lineno))
    return found


def reads_argv(source: str) -> list[int]:
    """Lines that read sys.argv (`sys.argv`, `import sys as s; s.argv`, `from sys import argv`)."""
    tree = ast.parse(source)
    names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
             if a.name == "sys"}  # fmt: skip
    lines = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "argv"
             and isinstance(n.value, ast.Name) and n.value.id in names]  # fmt: skip
    lines += [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "sys"
              and any(a.name == "argv" for a in n.names)]  # fmt: skip
    return sorted(lines)


def violations(sources: dict[str, str], tiers: dict[str, int]) -> list[str]:
    """Every broken rule of docs/architecture.md, one line each."""
    by_dotted = {_dotted(m): m for m in sources}
    out = [f"{_file(m)} is in no tier: place it in docs/architecture.md's tier diagram"
           for m in sources if m not in tiers]
    for name, source in sources.items():
        argv = reads_argv(source)
        if argv and name != "cli":
            out.append(f"{_file(name)} reads sys.argv (line {argv[0]}): only cli.py parses the command line")
        for target, line in imports(name, source, set(sources)):
            top = target.split(".")[0]
            if top == "torch" and (name == "report" or name.startswith("labeling/")):
                out.append(f"{_file(name)} imports {target} (line {line}): report.py and labeling/ never import torch")
            if top != "wprlhf":
                continue
            other = by_dotted.get(target)
            if other is None:
                if target != "wprlhf":
                    out.append(f"{_file(name)} imports {target} (line {line}), which is no module of wprlhf")
                continue
            arrow = f"{_file(name)} -> {_file(other)}"
            if name.startswith("labeling/") and not other.startswith("labeling/"):
                out.append(f"{arrow} (line {line}): labeling/ imports nothing from wprlhf")
            if other == "cli":
                out.append(f"{arrow} (line {line}): nothing imports cli")
            if name == "core":
                out.append(f"{arrow} (line {line}): core.py imports nothing from wprlhf")
            if other == BOTTOM or name not in tiers or other not in tiers:
                continue
            if tiers[other] >= tiers[name]:
                out.append(f"{arrow} (tier {tiers[name]} -> tier {tiers[other]}), line {line}")
    return out


# ------------------------------------------------------------------------------------------------ the package


def test_imports_point_down_the_tiers():
    found = violations(package_sources(), read_tiers(ARCHITECTURE.read_text(encoding="utf-8")))
    assert not found, "imports that break docs/architecture.md:\n" + "\n".join(found)


def test_the_diagram_places_the_modules_of_the_style_guide_and_the_planned_ones():
    tiers = read_tiers(ARCHITECTURE.read_text(encoding="utf-8"))
    for name in ("errors", "files", "text", "core", "signatures", "distributed", "models", "data", "checkpoint",
                 "metrics", "generation", "forwards", "rewards", "reward_model", "classifier", "labelers", "sft",
                 "evaluation", "ppo", "ppo_trainer", "tasks", "loop", "report", "cli", "labeling/store",
                 "labeling/app"):
        assert name in tiers, f"docs/architecture.md's tier diagram does not place {name}"
    assert tiers["cli"] == max(tiers.values()) and tiers["core"] == tiers[BOTTOM] == 0


# ------------------------------------------------------------------------------------------------ the checker

TIERS = {"errors": 0, "core": 0, "models": 1, "data": 1, "sft": 3, "tasks": 5, "cli": 6, "report": 2,
         "labeling/store": 0, "labeling/app": 1, "labeling/__init__": 1, "__init__": 0}  # fmt: skip


def test_a_module_in_no_tier_fails():
    found = violations({"errors": "", "core": "", "newthing": "from .errors import UserError\n"}, TIERS)
    assert found == ["newthing.py is in no tier: place it in docs/architecture.md's tier diagram"]


def test_upward_and_same_tier_imports_fail_at_any_depth_in_any_form():
    sources = {
        "errors": "",
        "models": "from .errors import UserError\n",  # down: fine
        "data": "import json\n\ndef read():\n    from .models import load\n",  # same tier, inside a function
        "sft": "def train():\n    if True:\n        from wprlhf.tasks import stories\n",  # up, absolute, nested
        "tasks": "from . import sft\nimport wprlhf.models\n",  # down: fine
    }
    assert violations(sources, TIERS) == ["data.py -> models.py (tier 1 -> tier 1), line 4",
                                          "sft.py -> tasks.py (tier 3 -> tier 5), line 3"]  # fmt: skip


def test_package_rules_beside_the_tiers():
    sources = {
        "errors": "", "core": "from .errors import UserError\n", "cli": "import sys\nargs = sys.argv\n",
        "data": "import sys as system\n\ndef f():\n    return system.argv[1:]\n",
        "report": "from torch import nn\nfrom .cli import main\n",
        "labeling/store": "import torch.nn\n", "labeling/app": "from .store import Store\nfrom ..data import x\n",
        "labeling/__init__": "from .store import Store\n",
        "__init__": "",
    }  # fmt: skip
    assert violations(sources, TIERS) == [
        "core.py -> errors.py (line 1): core.py imports nothing from wprlhf",
        "data.py reads sys.argv (line 4): only cli.py parses the command line",
        "report.py imports torch (line 1): report.py and labeling/ never import torch",
        "report.py -> cli.py (line 2): nothing imports cli",
        "report.py -> cli.py (tier 2 -> tier 6), line 2",
        "labeling/store.py imports torch.nn (line 1): report.py and labeling/ never import torch",
        "labeling/app.py -> data.py (line 2): labeling/ imports nothing from wprlhf",
        "labeling/app.py -> data.py (tier 1 -> tier 1), line 2",
    ]


def test_importing_a_subpackage_counts_its_init_and_from_dot_import_names_the_module():
    known = {"cli", "checkpoint", "labeling/__init__", "labeling/store", "labeling/app"}
    assert imports("cli", "from .labeling.store import Store\nfrom . import checkpoint as ckpt\n", known) == [
        ("wprlhf.labeling.store", 1), ("wprlhf.labeling", 1), ("wprlhf.checkpoint", 2)]
    assert imports("labeling/app", "from .store import Store\n", known) == [("wprlhf.labeling.store", 1)]
    assert imports("labeling/__init__", "from .store import Store\n", known) == [("wprlhf.labeling.store", 1)]


def test_the_tier_table_is_read_from_the_architecture_page():
    page = "# Architecture\n\n```\ntier 1  b, c\ntier 0  a\n```\n\ntier 9 z\n\n```\ntier 5 y\n```\n"
    assert read_tiers(page) == {"b": 1, "c": 1, "a": 0}  # the first code block only
    with pytest.raises(AssertionError, match="places a twice"):
        read_tiers(page.replace("tier 0  a", "tier 0  a, a"))
    with pytest.raises(AssertionError, match="no code block"):
        read_tiers("# x\n")
