"""Checkpoints damaged after they were written: a resume checks every file before it touches the models, falls back
to the checkpoint before with a warning, deletes nothing, and when none is usable names one command that works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wprlhf import checkpoint as ckpt
from wprlhf.cli import main
from wprlhf.methods.ppo import PPOConfig, train
from wprlhf.metrics import read_metrics
from wprlhf.models import ValueHead
from wprlhf.rewards.spec import length

# The smallest run that saves twice: checkpoints at steps 2 and 4.
TINY = ["--policy", "tiny", "--reward", "length", "--checkpoint-every", "2", "--batch-size", "2",
        "--num-minibatches", "1", "--response-length", "8", "--log-samples", "0"]  # fmt: skip
CONFIG = dict(policy="tiny", reward="length", checkpoint_every=2, batch_size=2, num_minibatches=1, response_length=8,
              log_samples=0)  # fmt: skip
PROMPTS = ["Write about a cat.", "Write about a ship.", "Write about a storm."]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])
    return path.read_bytes()


def folders(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------- whole runs


@pytest.mark.learning
def test_truncated_value_head_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    """The issue's repro: `--shared-value-head`, the latest value head cut short, then --resume to step 6."""
    out = tmp_path / "r"
    args = ["ppo", *TINY, "--shared-value-head", "--out", out]
    assert run_cli(capsys, *args, "--steps", 4)[0] == 0
    assert folders(out) == ["latest", "step-000002", "step-000004"]  # the one before the latest is kept
    cut = truncate(out / "checkpoints" / "step-000004" / "policy" / "value_head.safetensors")

    code, err = run_cli(capsys, *args, "--steps", 6, "--resume")
    assert code == 0, err
    assert "warning: step-000004: policy/value_head.safetensors is corrupt or truncated" in err
    assert f"Resuming from {out / 'checkpoints' / 'step-000002'}. Nothing was deleted" in err
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoints" / "latest").read_text() == "step-000006"
    # The broken folder was moved aside, not deleted, when the run saved step 4 again.
    assert folders(out) == ["latest", "step-000004", "step-000004.broken", "step-000006"]
    assert (out / "checkpoints" / "step-000004.broken" / "policy" / "value_head.safetensors").read_bytes() == cut


@pytest.mark.learning
def test_corrupt_trainer_state_falls_back_and_ends_as_an_uninterrupted_run(tmp_path, capsys):
    """Resuming from the checkpoint before the broken one redoes steps 3-4: same metrics, same final weights."""
    from safetensors.torch import load_file

    train(PPOConfig(**CONFIG, steps=6), PROMPTS, length, tmp_path / "whole", progress=False)
    train(PPOConfig(**CONFIG, steps=4), PROMPTS, length, tmp_path / "split", progress=False)
    truncate(tmp_path / "split" / "checkpoints" / "step-000004" / "trainer_state.pt", keep=300)
    capsys.readouterr()
    train(PPOConfig(**CONFIG, steps=6), PROMPTS, length, tmp_path / "split", resume=True, progress=False)
    err = capsys.readouterr().err
    assert "step-000004: trainer_state.pt is corrupt" in err and "step-000002" in err

    whole, split = (read_metrics(tmp_path / run / "metrics.csv") for run in ("whole", "split"))
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    skip = {"time_generate", "time_score", "time_train", "episodes_per_s"}
    for a, b in zip(whole, split):
        for key in a.keys() - skip:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for model in ("policy", "value"):
        wa, wb = (load_file(tmp_path / run / model / "model.safetensors") for run in ("whole", "split"))
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


@pytest.mark.learning
def test_no_usable_checkpoint_names_one_command_that_works(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["ppo", *TINY, "--checkpoint-every", 1, "--out", out]
    assert run_cli(capsys, *args, "--steps", 2)[0] == 0
    cut = truncate(out / "checkpoints" / "step-000002" / "policy" / "model.safetensors")
    (out / "checkpoints" / "step-000001" / "trainer_state.pt").unlink()

    code, err = run_cli(capsys, *args, "--steps", 3, "--resume")
    assert code == 2
    assert "step-000002: policy/model.safetensors is corrupt or truncated" in err
    assert "step-000001: trainer_state.pt is missing: the checkpoint is incomplete" in err
    assert err.count("rerun") == 1 and "rerun without --resume and with --out set to a new directory" in err
    assert "resume again" not in err and "delete it" not in err  # no circle back to --resume
    # Nothing was deleted or changed, so the user can look at what broke.
    assert folders(out) == ["latest", "step-000001", "step-000002"]
    assert (out / "checkpoints" / "step-000002" / "policy" / "model.safetensors").read_bytes() == cut
    # ... and the command it names works.
    assert run_cli(capsys, "ppo", *TINY, "--checkpoint-every", 1, "--out", tmp_path / "new", "--steps", 3)[0] == 0


@pytest.mark.learning
def test_resume_without_any_checkpoint_names_one_command_that_works(tmp_path, capsys):
    code, err = run_cli(capsys, "ppo", *TINY, "--out", tmp_path / "fresh", "--steps", 1, "--resume")
    assert code == 2 and "holds no checkpoint" in err and err.count("rerun") == 1
    assert "To go on, start the run: rerun without --resume" in err


# ---------------------------------------------------------------------------------------------- save and read


@pytest.fixture()
def saved(tmp_path, tiny, tokenizer):
    """A run folder with checkpoints at steps 2 and 4 of `tiny` + a value head; step 4's weights differ."""
    head = ValueHead(tiny.config.hidden_size)
    out = tmp_path / "run"
    for step in (2, 4):
        with torch.no_grad():
            tiny.model.norm.weight.fill_(step)
            head.v_head.bias.fill_(step)
        ckpt.save_checkpoint(ckpt.checkpoint_path(out, step), {"policy": tiny}, tokenizer, {"step": step}, head)
    return out


def _fresh(tiny):
    head = ValueHead(tiny.config.hidden_size, seed=7)
    with torch.no_grad():
        tiny.model.norm.weight.fill_(-1.0)
    return {"policy": tiny}, head


def _untouched(models, head):
    return bool((models["policy"].model.norm.weight == -1).all()) and head.v_head.bias.detach().item() == 0.0


@pytest.mark.parametrize("damage", ["value head", "policy", "state", "state not a dict", "state missing"])
def test_a_failed_load_leaves_the_models_untouched(saved, tiny, damage):
    latest = saved / "checkpoints" / "step-000004"
    if damage == "value head":
        truncate(latest / "policy" / ckpt.VALUE_HEAD_FILE, keep=60)
    elif damage == "policy":
        truncate(latest / "policy" / "model.safetensors", keep=5000)
    elif damage == "state":
        truncate(latest / ckpt.STATE_FILE)
    elif damage == "state not a dict":
        torch.save([1, 2], latest / ckpt.STATE_FILE)
    else:
        (latest / ckpt.STATE_FILE).unlink()
    models, head = _fresh(tiny)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(latest, models, head)
    assert str(latest) in str(err.value)
    assert _untouched(models, head)
    # A resume reads the one before instead; only applying it changes the models.
    found = ckpt.resume_checkpoint(saved, models, head, warn=None)
    assert found.path.name == "step-000002" and _untouched(models, head)
    assert ckpt.apply_checkpoint(found, models, head) == {"step": 2}
    assert (tiny.model.norm.weight == 2).all() and head.v_head.bias.detach().item() == 2.0


def test_weights_from_other_models_are_a_broken_checkpoint(saved, tiny):
    from safetensors.torch import save_file

    save_file({"v_head.weight": torch.zeros(1, 3), "v_head.bias": torch.zeros(1)},
              saved / "checkpoints" / "step-000004" / "policy" / ckpt.VALUE_HEAD_FILE)  # fmt: skip
    models, head = _fresh(tiny)
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit the value head of this run \(v_head.weight has shape"):
        ckpt.read_checkpoint(saved / "checkpoints" / "step-000004", models, head)


@pytest.mark.parametrize("pointer", [None, "garbage\n", "step-000009", "../../etc"])
def test_a_broken_latest_pointer_falls_back_to_the_newest_step_folder(saved, tiny, pointer):
    latest = saved / "checkpoints" / "latest"
    if pointer is None:
        latest.unlink()
    else:
        latest.write_text(pointer)
    warnings = []
    found = ckpt.resume_checkpoint(saved, *_fresh(tiny), warn=warnings.append)
    assert found.path.name == "step-000004"
    assert len(warnings) == 1 and str(latest) in warnings[0] and "skipped" not in warnings[0]
    assert ckpt.latest_checkpoint(saved).name == "step-000004"


def test_check_state_stops_at_once_on_other_settings(saved, tiny):
    """Other settings are the user's choice, not damage: no fallback, no partial load."""
    from wprlhf.errors import UserError

    def check_state(state):
        raise UserError("other settings")

    models, head = _fresh(tiny)
    with pytest.raises(UserError, match="other settings") as err:
        ckpt.resume_checkpoint(saved, models, head, check_state=check_state)
    assert not isinstance(err.value, ckpt.NoUsableCheckpoint) and _untouched(models, head)


def test_save_keeps_two_and_is_not_stopped_by_leftovers(saved, tiny, tokenizer):
    root = saved / "checkpoints"
    (root / "step-000006.tmp-killed").mkdir()  # a save killed half-way
    (root / "step-000008").write_text("not a folder")  # what a resume skipped, at a step this run saves again
    save = lambda step: ckpt.save_checkpoint(ckpt.checkpoint_path(saved, step), {"policy": tiny}, tokenizer,
                                             {"step": step})  # fmt: skip
    save(6)
    assert folders(saved) == ["latest", "step-000004", "step-000006", "step-000008"]  # newer ones are left alone
    save(8)
    assert folders(saved) == ["latest", "step-000006", "step-000008", "step-000008.broken"]
    assert (root / "step-000008.broken").read_text() == "not a folder"
    (root / "latest").unlink()
    (root / "latest").mkdir()  # garbage where the pointer goes
    save(10)
    assert (root / "latest").read_text() == "step-000010"
    assert [p.name for p in ckpt.find_checkpoints(saved)[0]] == ["step-000010", "step-000008"]


def test_a_killed_build_leaves_nothing_and_a_live_one_keeps_its_folder(tmp_path):
    """`files.building_beside`: a process killed (SIGKILL) mid-build leaves a folder the next build removes; another
    process's live build keeps its folder; a finished build is renamed into place and leaves no lock behind."""
    import signal
    import subprocess
    import sys

    from wprlhf.files import building_beside

    target = tmp_path / "rm-abc"
    code = ("import sys, time\nfrom wprlhf.files import building_beside\n"
            f"with building_beside({str(target)!r}) as tmp:\n"
            "    (tmp / 'half.bin').write_bytes(b'x')\n    print(tmp, flush=True)\n    time.sleep(60)\n")  # fmt: skip
    builders = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        folders = [Path(b.stdout.readline().strip()) for b in builders]
        assert all((f / "half.bin").exists() for f in folders)
        builders[0].send_signal(signal.SIGKILL)
        builders[0].wait()
        with building_beside(target) as tmp:
            assert not folders[0].exists() and not Path(f"{folders[0]}.lock").exists()  # the killed one's is gone
            assert (folders[1] / "half.bin").exists()  # the live one's stays
            (tmp / "model.bin").write_bytes(b"m")
            tmp.rename(target)
        assert (target / "model.bin").exists()
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["rm-abc", folders[1].name, f"{folders[1].name}.lock"]), left
    finally:
        for b in builders:
            b.kill()
            b.wait()
