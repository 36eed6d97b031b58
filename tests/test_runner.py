"""The one pipeline runner (`pipelines/runner.py`): its state file, the phases it skips, and the resume rules every
pipeline shares."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from wprlhf.errors import UserError
from wprlhf.pipelines.runner import Runner


@dataclass
class Config:
    data: str = ""
    lr: float = 0.1
    steps: int = 3


def open_run(tmp_path, config=None, **kw):
    kw = {"inputs": ("data",), "phases": ("split", "train", "eval"), "quiet": True, **kw}
    return Runner(tmp_path / "run", "state.json", "test run", config or Config(), **kw)


def test_finished_phases_are_skipped_and_their_facts_and_times_kept(tmp_path):
    runner = open_run(tmp_path)
    assert [p for p in ("split", "train", "eval") if runner.wanted(p)] == ["split", "train", "eval"]
    runner.finish("split", split_dir="x")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["done"] == ["split"] and state["split_dir"] == "x" and state["timings_s"]["split"] >= 0
    assert state["config"] == {"data": "", "lr": 0.1, "steps": 3} and state["elapsed_s"] >= state["timings_s"]["split"]
    with pytest.raises(UserError, match="holds a test run; pass --resume"):
        open_run(tmp_path)
    again = open_run(tmp_path, resume=True, until="train")
    assert [p for p in ("split", "train", "eval") if again.wanted(p)] == ["train"]  # eval is after --until
    with pytest.raises(UserError, match="--until 'sft': choose one of split, train, eval"):
        open_run(tmp_path, resume=True, until="sft")


def test_a_resume_refuses_changed_settings_a_finished_phase_depends_on_and_changed_inputs(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("a\n")
    open_run(tmp_path, Config(data=str(data))).finish("split")
    depends = {"split": ("data",), "train": ("lr",)}.get
    open_run(tmp_path, Config(data=str(data), lr=0.5), resume=True, depends=lambda p: depends(p, ()))  # train not done
    with pytest.raises(UserError, match=r"--lr 0.1 \(now 0.5\)"):
        open_run(tmp_path, Config(data=str(data), lr=0.5), resume=True, depends=lambda p: depends(p, ()),
                 started=("train",))  # fmt: skip
    data.write_text("b\n")
    with pytest.raises(UserError, match="data"):
        open_run(tmp_path, Config(data=str(data)), resume=True)
    open_run(tmp_path, Config(data=str(data)), resume=True, allow_changed_inputs=True)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"done": 3}'])
def test_a_corrupt_state_file_is_named_with_the_fix(tmp_path, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.json").write_text(content)
    with pytest.raises(UserError, match="state.json .*(corrupt|not a run's state).*delete the run directory"):
        open_run(tmp_path, resume=True)
