"""The folders are the tiers of docs/architecture.md, and every import points down them.

That page's block is the one table; this test reads it. Each row is `level N  FOLDER/  a, b > c > d`: the modules
of one folder of wprlhf, in groups from highest to lowest. The test checks that every file of the package is
placed, in the folder it lives in, and parses each module's imports with `ast` (at the top of the file and inside
functions, relative and absolute). Across folders an import must go to a lower level; inside a folder, to a group
further right. Beside the tiers: labeling/ imports nothing else from wprlhf, report.py and labeling/ never import
torch, nothing imports cli, only cli reads sys.argv, and core.py imports nothing from wprlhf.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wprlhf"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
BOTTOM = "errors"
"""Imports nothing; any module may import it (docs/architecture.md)."""


@dataclass(frozen=True)
class Place:
    """Where the diagram puts a module: its folder ('' for wprlhf/ itself), its level and its group in the row
    (0 = the rightmost, lowest group)."""

    folder: str
    level: int
    group: int


def read_places(page: str) -> dict[str, Place]:
    """{module: Place} from the first code block of docs/architecture.md; a module is named by its path under
    wprlhf/ without .py ('core', 'methods/ppo', 'labeling/__init__')."""
    if "```" not in page:
        raise AssertionError("docs/architecture.md has no code block, where the tier diagram lives")
    places: dict[str, Place] = {}
    for line in page.split("```", 2)[1].splitlines():
        match = re.match(r"\s*level (\d+)\s+(\S+/)\s+(.+)", line)
        if not match:
            continue
        folder = "" if match.group(2) == "wprlhf/" else match.group(2).rstrip("/")
        groups = [g.split(",") for g in match.group(3).split(">")]
        for i, group in enumerate(groups):
            for name in filter(None, (n.strip() for n in group)):
                module = f"{folder}/{name}" if folder else name
                if module in places:
                    raise AssertionError(f"docs/architecture.md's tier diagram places {module} twice")
                places[module] = Place(folder, int(match.group(1)), len(groups) - 1 - i)
    if not places:
        raise AssertionError("docs/architecture.md has no 'level N  folder/  module, module > module' lines")
    return places


def package_sources(package: Path = PACKAGE) -> dict[str, str]:
    """{module: source} for every .py file under wprlhf/."""
    return {f.relative_to(package).with_suffix("").as_posix(): f.read_text(encoding="utf-8")
            for f in sorted(package.rglob("*.py"))}  # fmt: skip


def _dotted(name: str) -> str:
    """'labeling/store' -> 'wprlhf.labeling.store'; '__init__' -> 'wprlhf'; 'methods/__init__' -> 'wprlhf.methods'."""
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


def _folder(name: str) -> str:
    return name.rpartition("/")[0]


def misplaced(sources: dict[str, str], places: dict[str, Place]) -> list[str]:
    """Files the diagram does not place, or places in another folder than the one they live in."""
    out = [f"{_file(m)} is in no tier: place it in its folder's row of docs/architecture.md"
           for m in sources if m not in places]  # fmt: skip
    out += [f"{_file(m)} lives in {_folder(m) or 'wprlhf'}/ but docs/architecture.md's row is {p.folder or 'wprlhf'}/"
            for m, p in places.items() if m in sources and _folder(m) != p.folder]  # fmt: skip
    return out


def _arrow_breaks(a: Place, b: Place) -> str | None:
    """Why an import from a module placed at `a` of one placed at `b` breaks the tiers, or None when it is down."""
    if a.folder == b.folder:
        if (b.level, b.group) < (a.level, a.group):
            return None
        return f"(level {a.level} group {a.group} -> level {b.level} group {b.group}): inside a folder, import only rightwards"
    if b.level < a.level:
        return None
    return f"(level {a.level} -> level {b.level}): across folders, import only from a lower level"


def violations(sources: dict[str, str], places: dict[str, Place]) -> list[str]:
    """Every broken rule of docs/architecture.md, one line each."""
    by_dotted = {_dotted(m): m for m in sources}
    out = misplaced(sources, places)
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
            if other == "cli" and name != "__main__":  # `python -m wprlhf` runs the command
                out.append(f"{arrow} (line {line}): nothing imports cli")
            if name == "core":
                out.append(f"{arrow} (line {line}): core.py imports nothing from wprlhf")
            if other == BOTTOM or name not in places or other not in places:
                continue
            why = _arrow_breaks(places[name], places[other])
            if why:
                out.append(f"{arrow} {why}, line {line}")
    return out


# ------------------------------------------------------------------------------------------------ the package


def test_imports_point_down_the_folders():
    found = violations(package_sources(), read_places(ARCHITECTURE.read_text(encoding="utf-8")))
    assert not found, "imports or files that break docs/architecture.md:\n" + "\n".join(found)


def test_the_folders_are_the_tiers_of_the_style_guide():
    places = read_places(ARCHITECTURE.read_text(encoding="utf-8"))
    levels = {p.folder: p.level for m, p in places.items() if m != "cli"}
    assert levels["methods"] == levels["rewards"] < levels["evals"] < levels["pipelines"] < places["cli"].level
    assert levels[""] == levels["labeling"] == 0 and places["core"].group == places[BOTTOM].group == 0
    assert places["cli"].level == max(p.level for p in places.values())
    for name in ("methods/ppo", "methods/rloo", "methods/grpo", "methods/dpo", "methods/sft", "methods/best_of",
                 "rewards/spec", "rewards/reward_model", "evals/side_by_side", "pipelines/stories",
                 "labeling/store", "labeling/app"):
        assert name in places, f"docs/architecture.md's diagram does not place {name}"


# ------------------------------------------------------------------------------------------------ the checker

PAGE = """```
level 3  wprlhf/     cli
level 2  pipelines/  stories, sentiment, __init__
level 1  methods/    ppo > onpolicy, __init__
level 1  rewards/    spec > judges, __init__
level 0  wprlhf/     models, data > core, errors
level 0  labeling/   __init__, app > store
```"""
PLACES = read_places(PAGE)


def test_a_row_places_its_modules_in_its_folder_from_the_highest_group_down():
    assert PLACES["methods/ppo"] == Place("methods", 1, 1) and PLACES["methods/onpolicy"] == Place("methods", 1, 0)
    assert PLACES["methods/__init__"] == Place("methods", 1, 0)
    assert PLACES["cli"] == Place("", 3, 0) and PLACES["errors"] == Place("", 0, 0)
    assert PLACES["labeling/app"] == Place("labeling", 0, 1)
    with pytest.raises(AssertionError, match="places methods/ppo twice"):
        read_places(PAGE.replace("ppo > onpolicy", "ppo > ppo"))
    with pytest.raises(AssertionError, match="no code block"):
        read_places("# x\n")


def test_a_file_in_no_row_or_in_another_folder_fails():
    sources = {"errors": "", "core": "", "newthing": "from .errors import UserError\n", "methods/judges": ""}
    assert misplaced(sources, PLACES) == [
        "newthing.py is in no tier: place it in its folder's row of docs/architecture.md",
        "methods/judges.py is in no tier: place it in its folder's row of docs/architecture.md"]
    assert misplaced({"rewards/ppo": ""}, {"rewards/ppo": PLACES["methods/ppo"]}) == [
        "rewards/ppo.py lives in rewards/ but docs/architecture.md's row is methods/"]


def test_upward_sideways_and_leftward_imports_fail_at_any_depth_in_any_form():
    sources = {
        "errors": "", "core": "",
        "models": "from .errors import UserError\nfrom .core import gae\n",  # rightwards in wprlhf/: fine
        "data": "import json\n\ndef read():\n    from .models import load\n",  # same group, inside a function
        "methods/ppo": "def train():\n    if True:\n        from wprlhf.pipelines.stories import run\n"
                       "from .onpolicy import Trainer\nfrom ..rewards import spec\n",  # up, down, sideways
        "methods/onpolicy": "from . import ppo\nfrom ..core import gae\n",  # leftwards; down a level: fine
        "pipelines/stories": "from ..methods import ppo\nimport wprlhf.rewards.judges\n",  # down: fine
        "rewards/spec": "", "rewards/judges": "", "methods/__init__": "", "rewards/__init__": "",
        "pipelines/__init__": "",
    }  # fmt: skip
    assert violations(sources, PLACES) == [
        "data.py -> models.py (level 0 group 1 -> level 0 group 1): inside a folder, import only rightwards, line 4",
        "methods/ppo.py -> rewards/spec.py (level 1 -> level 1): across folders, import only from a lower level, "
        "line 5",
        "methods/ppo.py -> rewards/__init__.py (level 1 -> level 1): across folders, import only from a lower "
        "level, line 5",
        "methods/ppo.py -> pipelines/stories.py (level 1 -> level 2): across folders, import only from a lower "
        "level, line 3",
        "methods/ppo.py -> pipelines/__init__.py (level 1 -> level 2): across folders, import only from a lower "
        "level, line 3",
        "methods/onpolicy.py -> methods/ppo.py (level 1 group 0 -> level 1 group 1): inside a folder, import only "
        "rightwards, line 1",
    ]


def test_package_rules_beside_the_tiers():
    sources = {
        "errors": "", "core": "from .errors import UserError\n", "cli": "import sys\nargs = sys.argv\n",
        "data": "import sys as system\n\ndef f():\n    return system.argv[1:]\n",
        "models": "from torch import nn\nfrom .cli import main\n",
        "labeling/store": "import torch.nn\n", "labeling/app": "from .store import Store\nfrom ..data import x\n",
        "labeling/__init__": "from .store import Store\n",
    }  # fmt: skip
    assert violations(sources, PLACES) == [
        "core.py -> errors.py (line 1): core.py imports nothing from wprlhf",
        "data.py reads sys.argv (line 4): only cli.py parses the command line",
        "models.py -> cli.py (line 2): nothing imports cli",
        "models.py -> cli.py (level 0 group 1 -> level 3 group 0): inside a folder, import only rightwards, line 2",
        "labeling/store.py imports torch.nn (line 1): report.py and labeling/ never import torch",
        "labeling/app.py -> data.py (line 2): labeling/ imports nothing from wprlhf",
        "labeling/app.py -> data.py (level 0 -> level 0): across folders, import only from a lower level, line 2",
    ]


def test_importing_a_subpackage_counts_its_init_and_from_dot_import_names_the_module():
    known = {"cli", "checkpoint", "labeling/__init__", "labeling/store", "labeling/app", "methods/__init__",
             "methods/ppo", "methods/onpolicy"}  # fmt: skip
    assert imports("cli", "from .labeling.store import Store\nfrom . import checkpoint as ckpt\n", known) == [
        ("wprlhf.labeling.store", 1), ("wprlhf.labeling", 1), ("wprlhf.checkpoint", 2)]
    assert imports("labeling/app", "from .store import Store\n", known) == [("wprlhf.labeling.store", 1)]
    assert imports("methods/ppo", "from .onpolicy import Trainer\nfrom ..checkpoint import save\n", known) == [
        ("wprlhf.methods.onpolicy", 1), ("wprlhf.checkpoint", 2)]
    assert imports("cli", "from .methods import ppo\n", known) == [("wprlhf.methods.ppo", 1), ("wprlhf.methods", 1)]
