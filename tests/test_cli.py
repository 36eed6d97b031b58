"""The `wprlhf` command: smoke runs that check the files they write, and every bad input with its message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from wprlhf.cli import main
from wprlhf.metrics import METRIC_NAMES, read_metrics

TINY_RUN = ["--policy", "tiny", "--batch-size", "4", "--num-minibatches", "2", "--ppo-epochs", "1",
            "--response-length", "4", "--log-samples", "1", "--sample-every", "1"]  # fmt: skip


@pytest.fixture()
def prompts_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("A dragon opens a bakery.\n\nThe moon files a complaint.\n")
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.learning
def test_ppo_writes_metrics_tensorboard_samples_checkpoint_policy(tmp_path, prompts_txt, capsys):
    out = tmp_path / "run"
    code, _ = run_cli(capsys, "ppo", *TINY_RUN, "--prompts", prompts_txt, "--steps", 2, "--out", out, "--checkpoint-every", 1)
    assert code == 0
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2] and [r["episodes"] for r in rows] == [4, 8]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == list(METRIC_NAMES)
    for row in rows:
        assert 0 <= row["score_mean"] <= 1 and row["response_length"] <= 4
        assert row["time_generate"] > 0 and row["time_train"] > 0
    assert list((out / "tb").glob("events.out.tfevents.*"))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2}
    assert samples[0]["prompt"] in prompts_txt.read_text()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert json.loads((out / "config.json").read_text())["batch_size"] == 4
    assert (out / "policy" / "model.safetensors").exists() and (out / "value" / "model.safetensors").exists()
    # A second run into the same directory must not silently overwrite it.
    code, err = run_cli(capsys, "ppo", *TINY_RUN, "--prompts", prompts_txt, "--steps", 2, "--out", out)
    assert code == 2 and "already holds a run" in err and "--resume" in err


def test_config_file_and_flags(tmp_path, prompts_txt, capsys):
    """A YAML config sets fields; a flag on the command line wins over it; unknown keys are errors."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 2\nnum_minibatches: 1\nlr: 0.0\n")
    out = tmp_path / "run"
    code, _ = run_cli(capsys, "ppo", *TINY_RUN, "--config", cfg, "--prompts", prompts_txt, "--steps", 1, "--out", out)
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["batch_size"] == 4 and saved["lr"] == 0.0  # --batch-size 4 from TINY_RUN beats the file's 2
    cfg.write_text("batch_sise: 2\n")
    code, err = run_cli(capsys, "ppo", "--config", cfg, "--out", tmp_path / "x")
    assert code == 2 and "unknown PPOConfig keys ['batch_sise']" in err


def test_sample_writes_k_responses_per_prompt(tmp_path, prompts_txt, capsys):
    out = tmp_path / "samples.jsonl"
    code, _ = run_cli(capsys, "sample", "--policy", "tiny", "--prompts", prompts_txt, "-k", 3,
                      "--max-new-tokens", 5, "--out", out)  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["A dragon opens a bakery.", "The moon files a complaint."]
    assert all(len(line["responses"]) == 3 and all(isinstance(r, str) for r in line["responses"]) for line in lines)


def test_console_script_entry_point(tmp_path, prompts_txt):
    """The installed `wprlhf` command runs and reports a bad input without a traceback."""
    result = subprocess.run([sys.executable, "-m", "wprlhf.cli", "ppo", "--policy", "no/such/model/dir",
                             "--prompts", str(prompts_txt), "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr


# ------------------------------------------------------------------------------------------ bad input


def _reward_file(tmp_path, body):
    path = tmp_path / "my_reward.py"
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--policy", "./missing-dir"], "model directory ./missing-dir does not exist"),
        (["--prompts", "nope.txt"], "prompts file nope.txt does not exist"),
        (["--reward", "no_such_reward"], "unknown reward 'no_such_reward'"),
        (["--reward", "no_such_module_xyz:fn"], "cannot import module 'no_such_module_xyz'"),
        (["--reward", "missing_file.py:fn"], "file missing_file.py does not exist"),
        (["--batch-size", "6", "--num-minibatches", "4"], "batch_size 6 is not divisible by num_minibatches 4"),
        (["--kl-estimator", "k2"], "kl_estimator must be one of"),
    ],
)
def test_bad_options_fail_with_a_clear_message(tmp_path, prompts_txt, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    base = ["ppo", "--policy", "tiny", "--prompts", str(prompts_txt), "--out", str(tmp_path / "r")]
    code, err = run_cli(capsys, *base, *args)
    assert code == 2
    assert message in err


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "\n \n", "holds no prompts"),
        ("p.xml", "<prompt/>", "unknown format"),
        ("p.csv", "title,score\nhello,3\n", "has no 'prompt' column"),
        ("p.jsonl", '{"prompt": "ok"}\n{"prompt": oops}\n', "line 2 is not valid JSON"),
        ("p2.jsonl", '{"text2": "x"}\n', "line 1: no 'prompt' field"),
    ],
)
def test_bad_prompt_files(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    code, err = run_cli(capsys, "ppo", "--policy", "tiny", "--prompts", path, "--out", tmp_path / "r")
    assert code == 2 and message in err


def test_csv_gz_prompts_with_multiline_fields(tmp_path):
    import gzip

    from wprlhf.data import load_prompts

    path = tmp_path / "p.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write('prompt_id,prompt\n1,"a prompt\nover two lines"\n2,second\n')
    assert load_prompts(path) == ["a prompt\nover two lines", "second"]


@pytest.mark.parametrize(
    "body, message",
    [
        ("def fn(prompts, responses):\n    return [1.0]\n", "returned 1 scores for 4 responses"),
        ("def fn(prompts, responses):\n    return [float('nan')] * len(responses)\n", "non-finite scores"),
        ("def fn(prompts, responses):\n    return None\n", "must return a list of numbers"),
        ("import no_such_dependency_xyz\n", "importing"),
        ("x = 1\n", "has no function 'fn'"),
    ],
)
def test_bad_reward_functions(tmp_path, prompts_txt, capsys, body, message):
    path = _reward_file(tmp_path, body)
    code, err = run_cli(capsys, "ppo", *TINY_RUN, "--prompts", prompts_txt, "--reward", f"{path}:fn",
                        "--steps", 1, "--out", tmp_path / "r")  # fmt: skip
    assert code == 2 and message in err


@pytest.mark.learning
def test_resume_refuses_corrupt_and_mismatched_checkpoints(tmp_path, prompts_txt, capsys):
    out = tmp_path / "run"
    args = ["ppo", *TINY_RUN, "--prompts", prompts_txt, "--out", out]
    assert run_cli(capsys, *args, "--steps", 1)[0] == 0
    code, err = run_cli(capsys, *args, "--steps", 2, "--resume", "--lr", "0.5")
    assert code == 2 and "other settings (lr: 1.41e-05 -> 0.5)" in err
    state = out / "checkpoints" / "step-000001" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    code, err = run_cli(capsys, *args, "--steps", 2, "--resume")
    assert code == 2 and "is corrupt" in err
    weights = out / "checkpoints" / "step-000001" / "policy" / "model.safetensors"
    state.unlink()
    code, err = run_cli(capsys, *args, "--steps", 2, "--resume")
    assert code == 2 and "incomplete" in err
    code, err = run_cli(capsys, "ppo", *TINY_RUN, "--prompts", prompts_txt, "--out", tmp_path / "fresh", "--resume")
    assert code == 2 and "no checkpoint" in err
    assert weights.exists()  # refusing to resume deletes nothing


def test_hub_id_loads_from_a_local_hub_cache(tmp_path, prompts_txt, tokenizer):
    """A hub id resolves through the Hugging Face cache layout, offline (a local copy in the hub's format)."""
    import os

    from wprlhf.models import load_policy

    model, _ = load_policy("tiny")
    snapshot = tmp_path / "hub" / "models--wprlhf-test--tiny-story" / "snapshots" / "0123abcd"
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "s.jsonl"
    result = subprocess.run([sys.executable, "-m", "wprlhf.cli", "sample", "--policy", "wprlhf-test/tiny-story",
                             "--prompts", str(prompts_txt), "-k", "1", "--max-new-tokens", "3", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(out.read_text().splitlines()) == 2


def test_unknown_hub_id_offline_fails_fast(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(capsys, "sample", "--policy", "nobody/no-such-model", "--out", tmp_path / "s.jsonl")
    assert code == 2 and "cannot be reached (offline?)" in err


@pytest.mark.parametrize("fails", [False, True], ids=["finishes", "user_error"])
def test_the_command_closes_the_process_group_it_opened(tmp_path, capsys, monkeypatch, fails):
    """Under torchrun the command opens a process group (accelerate's state); it closes it before exit, so gloo's
    teardown at interpreter exit cannot turn the run's exit status non-zero. A group the caller opened stays open."""
    import torch.distributed as dist

    from wprlhf import cli
    from wprlhf.errors import UserError

    def opens_a_group(args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        if fails:
            raise UserError("stopped")

    monkeypatch.setattr(cli, "cmd_sample", opens_a_group)
    try:
        code, _ = run_cli(capsys, "sample", "--policy", "tiny", "--prompts", "p.txt", "--out", "o.jsonl")
        assert code == (2 if fails else 0)
        assert not dist.is_initialized()
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
        monkeypatch.setattr(cli, "cmd_sample", lambda args: None)
        assert run_cli(capsys, "sample", "--policy", "tiny", "--prompts", "p.txt", "--out", "o.jsonl")[0] == 0
        assert dist.is_initialized()  # the caller's group
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_every_flag_of_every_subcommand_has_help(capsys):
    """`wprlhf X -h` explains every flag: a config field's flag shows the first sentence of its docstring, a
    hand-written one its own help; none is a bare '(default ...)'. Every help page renders."""
    import argparse

    from wprlhf.cli import build_parser

    def walk(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, [*path, name])

    bare, pages = [], 0
    for path, parser in walk(build_parser(), []):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help.startswith("(default"):
                bare.append(f"wprlhf {' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
        parser.format_help()  # a stray % in a docstring would raise here
        pages += 1
    assert not bare, bare
    assert pages > 20
    assert "RLOO, GRPO and DPO" in build_parser().format_help()


def test_python_dash_m_wprlhf_is_the_command():
    """`python -m wprlhf` runs the same command as `wprlhf` (for an environment whose scripts are not on PATH)."""
    done = subprocess.run([sys.executable, "-m", "wprlhf", "-h"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "the main job: RLHF on r/WritingPrompts" in done.stdout, done.stderr[-500:]
    bad = subprocess.run([sys.executable, "-m", "wprlhf", "no-such-command"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
