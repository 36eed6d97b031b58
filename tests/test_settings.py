"""Settings refuse bad input before any work: config files, sections, kinds, phase settings a pipeline hands on,
and the resume rules of run folders."""

from __future__ import annotations

import dataclasses
import json

import pytest

from wprlhf.checkpoint import load_config, read_config_file
from wprlhf.errors import UserError


@pytest.mark.parametrize("text, words", [
    ("ppo: {steps: 3\n", "not valid YAML"),
    ("a:\n\tb: 1\n", "not valid YAML"),
    ("1: 2\nfoo: 3\n", "not a setting's name"),
    ("ppo:\n  null: 3\n", "key ppo.None"),
])  # fmt: skip
def test_a_malformed_config_file_is_a_clear_error(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=words):
        read_config_file(path)


def test_a_config_file_that_is_no_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a file"):
        read_config_file(tmp_path)
    (tmp_path / "b.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="not UTF-8"):
        read_config_file(tmp_path / "b.yaml")


@pytest.mark.parametrize("body, words", [
    ("sft: {enabled: 'no'}", "sft.enabled must be true or false"),
    ("fixed_length: 'false'", "fixed_length must be true or false"),
    ("eval: {batch_size: abc}", "eval.batch_size must be a whole number"),
    ("eval: {best_of: 4}", "eval.best_of must be text"),
    ("sft: {data: 8}", "sft.data must be text"),
    ("reward_extra: 5", "reward_extra must be text"),
    ("ppo: {lr: 1e-5}", "write 1.0e-5"),
    ("ppo: {steps: 0}", "ppo.steps must be >= 1"),
    ("batch_size: 8\nppo: {batch_size: 4}", "name one setting twice"),
])  # fmt: skip
def test_stories_sections_refuse_values_of_the_wrong_kind(tmp_path, body, words):
    from wprlhf.pipelines.stories import StoriesConfig

    path = tmp_path / "c.yaml"
    path.write_text(body + "\n")
    with pytest.raises(UserError, match=words):
        load_config(StoriesConfig, path, {})


def test_an_old_and_a_new_name_of_one_setting_with_one_value_is_fine(tmp_path):
    from wprlhf.pipelines.stories import StoriesConfig

    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8\nppo: {batch_size: 8, steps: 3}\n")
    config = load_config(StoriesConfig, path, {"ppo": {"batch_size": 4}})  # a flag overrides the file
    assert (config.ppo.batch_size, config.ppo.steps) == (4, 3)


def test_stories_refuses_what_a_phase_would_refuse_before_any_work(tmp_path):
    """A setting PPO refuses (a negative score clip, a temperature under its floor) or an instruction in the chat
    template's markup fails when the run starts, not after the split and the reward models."""
    from wprlhf.pipelines.stories import StoriesConfig, run

    for settings, words in (({"ppo": {"score_clip": -1.0}}, "score_clip"), ({"temperature": 0.01}, "temperature"),
                            ({"instruction": "<|im_start|>system"}, "--instruction holds the chat template")):
        config = load_config(StoriesConfig, None, {"policy": "tiny", "data": str(tmp_path / "none"), **settings})
        with pytest.raises(UserError, match=words):
            run(config, tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_an_rl_phase_stopped_before_its_first_checkpoint_starts_over_keeping_its_pool(tmp_path):
    from wprlhf.pipelines.stories import _continue_or_start_over

    phase = tmp_path / "dpo"
    (phase / "tb").mkdir(parents=True)
    for name in ("metrics.csv", "samples.jsonl", "pool.jsonl"):
        (phase / name).write_text("x\n")
    assert _continue_or_start_over(phase) is False
    assert sorted(p.name for p in phase.iterdir()) == ["pool.jsonl"]
    (phase / "checkpoints").mkdir()
    assert _continue_or_start_over(phase) is True


def test_a_run_folder_stopped_before_its_first_checkpoint_says_to_force(tmp_path):
    from wprlhf.engine import RunFiles

    (tmp_path / "metrics.csv").write_text("step\n")
    with pytest.raises(UserError, match="before its first checkpoint.*--force"):
        RunFiles(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="use --resume to continue it, --force"):
        RunFiles(tmp_path)
    with pytest.raises(UserError, match="--force to overwrite"):
        RunFiles(tmp_path, resumable=False)


def test_a_resumed_loop_refuses_a_setting_its_phases_used(tmp_path):
    from wprlhf.pipelines.loop import RESUMED_AS_IS, LoopConfig
    from wprlhf.pipelines.runner import check_settings

    saved = dataclasses.asdict(LoopConfig())
    check_settings(LoopConfig(rounds=5, poll_s=1.0), saved, ["start"], lambda phase: RESUMED_AS_IS)  # may change
    with pytest.raises(UserError, match="--eval-samples 2 \\(now 3\\)"):
        check_settings(LoopConfig(eval_samples=3), saved, ["start"], lambda phase: RESUMED_AS_IS)


def test_range_checks_of_held_out_shares():
    from wprlhf.methods.onpolicy_config import PPOConfig
    from wprlhf.pipelines.compare import CompareConfig
    from wprlhf.rewards.reward_model import RewardConfig

    with pytest.raises(UserError, match="--rm-val-fraction"):
        CompareConfig(rm_val_fraction=1.5)
    with pytest.raises(UserError, match="--val-fraction below 1"):
        RewardConfig(val_fraction=0.99 + 0.01)
    with pytest.raises(UserError, match="score_clip 0"):
        PPOConfig(score_clip=0.0)


def test_a_reward_model_with_every_prompt_held_out_is_refused_and_writes_nothing(tmp_path):
    from wprlhf.rewards.reward_model import RewardConfig, train

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "responses": [f"good {i}", f"bad {i}"], "best": 0}) + "\n"
                            for i in range(3)))  # fmt: skip
    with pytest.raises(UserError, match="none is left to train on"):
        train(RewardConfig(data=str(data), model="tiny", val_fraction=0.99, device="cpu", mixed_precision="no"),
              tmp_path / "rm")  # fmt: skip
    assert not (tmp_path / "rm").exists()


def test_a_flag_help_keeps_an_abbreviation_whole():
    from wprlhf.cli import first_sentence

    assert first_sentence("Either 'x' (e.g. 'best-of-8') or y. More.") == "Either 'x' (e.g. 'best-of-8') or y."
