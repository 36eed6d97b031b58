"""A resume refuses inputs that changed since the run started (`files.fingerprint`), unless --allow-changed-inputs:
the prompts file and a `file.py:fn` reward of an on-policy run, DPO's comparisons, the data of `stories`, the
comparisons of `compare` and the prompts of `loop`. Every run is `tiny` and a step or two long."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import pytest

from wprlhf.cli import main
from wprlhf.errors import UserError
from wprlhf.files import INPUTS_FILE, check_inputs, fingerprint, input_fingerprints
from wprlhf.metrics import read_metrics


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the fingerprint


def _model_dir(path, weights: bytes = b"w" * 64):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"hidden_size": 8}')
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_a_file_is_fingerprinted_by_its_content(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("A dragon opens a bakery.\n")
    first = fingerprint(str(path))
    assert first.startswith("file sha256:") and fingerprint(str(path)) == first
    path.write_text("A dragon closes a bakery.\n")  # same size, other content
    assert fingerprint(str(path)) != first


def test_a_directory_by_the_names_and_sizes_of_its_model_files(tmp_path):
    model = _model_dir(tmp_path / "rm")
    first = fingerprint(str(model))
    assert first.startswith("directory sha256:")
    # What later commands write beside a model does not change it: an evaluation, checkpoints, TensorBoard logs.
    (model / "eval-heldout.json").write_text('{"accuracy": 0.7}')
    _model_dir(model / "checkpoints" / "step-000001")
    (model / "tb").mkdir()
    (model / "tb" / "events.out").write_text("x")
    assert fingerprint(str(model)) == first
    (model / "model.safetensors").write_bytes(b"w" * 65)  # retrained: its weights' size moved
    assert fingerprint(str(model)) != first


def test_reward_specs_builtins_and_hub_ids(tmp_path):
    model, code = _model_dir(tmp_path / "rm"), tmp_path / "reward.py"
    code.write_text("def fn(prompts, responses):\n    return [0.0] * len(responses)\n")
    for builtin in ("vowels", "tiny", "smollm2", "", "0.7*sentiment+0.3*relevance", "wprlhf.rewards.spec:vowels",
                    "task:positive-reviews", f"{tmp_path}/missing.py:fn"):  # fmt: skip
        assert fingerprint(builtin) is None, builtin
    assert fingerprint(f"rm:{model}") == fingerprint(f"sim:rm:{model}") == fingerprint(str(model))
    assert fingerprint(f"{code}:fn") == fingerprint(str(code))  # the file; what it imports is not seen
    assert fingerprint("HuggingFaceTB/SmolLM2-135M") == "hub HuggingFaceTB/SmolLM2-135M"
    summed = fingerprint(f"0.5*length+rm:{model}")
    assert summed.startswith("sum sha256:") and fingerprint("0.5*length+0.3*vowels") is None
    (model / "model.safetensors").write_bytes(b"w" * 99)
    assert fingerprint(f"0.5*length+rm:{model}") != summed
    # a file.py:fn reward inside a weighted sum is its file's too
    for spec in (f"0.5*{code}:fn+vowels", f"vowels+{code}:fn", f"rm:{model}+{code}:fn"):
        before = fingerprint(spec)
        assert before is not None, spec
        code.write_text(code.read_text() + "# edited\n")
        assert fingerprint(spec) != before, spec


@pytest.mark.parametrize("content", ["null", "[1, 2]", '{"prompts": "x", "reward": 5}', '{"prompts": {"spec": 1}}'])
def test_a_hand_edited_inputs_file_is_refused_not_ignored(tmp_path, content):
    from wprlhf.files import read_inputs

    (tmp_path / INPUTS_FILE).write_text(content)
    with pytest.raises(UserError, match="is not what wprlhf writes there.*delete it to resume"):
        read_inputs(tmp_path)


def test_check_inputs_names_each_change_and_lets_old_runs_resume(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("{}\n")
    saved = input_fingerprints({"data": str(path), "policy": "tiny"}, {"pairs": [("p", "a", "b")]})
    assert set(saved) == {"data", "pairs"}  # 'tiny' names nothing on disk
    assert check_inputs(saved, saved) == [] and check_inputs(None, saved) == [] and check_inputs({}, saved) == []
    path.write_text("{}\n{}\n")
    now = input_fingerprints({"data": str(path)}, {"pairs": [("p", "a", "c")]})
    said = rf"data \({re.escape(str(path))}\) has changed; pairs \(1 items\) has changed"
    with pytest.raises(UserError, match=said) as err:
        check_inputs(saved, now, run="the run in R")
    assert "another --out" in str(err.value) and "--allow-changed-inputs" in str(err.value)
    assert len(check_inputs(saved, now, allow_changed=True)) == 2
    path.unlink()
    with pytest.raises(UserError, match="data .* is gone"):
        check_inputs(saved, input_fingerprints({"data": str(path)}, {"pairs": [("p", "a", "b")]}))


# ------------------------------------------------------------------------------------------ PPO, RLOO, GRPO

GRPO_RUN = ["grpo", "--policy", "tiny", "--batch-size", "4", "--samples-per-prompt", "2", "--num-minibatches", "1",
            "--ppo-epochs", "1", "--response-length", "4", "--log-samples", "0"]  # fmt: skip


@pytest.mark.learning
def test_grpo_resume_refuses_a_rewritten_prompts_file_or_reward_file(tmp_path, capsys):
    """The issue's case: the prompts file and the `file.py:fn` reward overwritten between a run and its resume."""
    prompts, reward, out = tmp_path / "prompts.txt", tmp_path / "reward.py", tmp_path / "run"
    prompts.write_text("A dragon opens a bakery.\nThe moon files a complaint.\n")
    reward.write_text("def fn(prompts, responses):\n    return [len(r) / 10 for r in responses]\n")
    args = [*GRPO_RUN, "--prompts", prompts, "--reward", f"{reward}:fn", "--out", out]
    assert run_cli(capsys, *args, "--steps", 1)[0] == 0
    assert json.loads((out / INPUTS_FILE).read_text())["prompts"]["spec"] == str(prompts)

    prompts.write_text("Write only the letter x.\nSay nothing at all.\n")
    code, err = run_cli(capsys, *args, "--steps", 2, "--resume")
    assert code == 2 and f"prompts ({prompts}) has changed" in err and "prompt_list" in err
    assert "another --out" in err and "--allow-changed-inputs" in err
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1]  # refused before any step
    code, err = run_cli(capsys, *args, "--steps", 2, "--resume", "--allow-changed-inputs")
    assert code == 0 and "continues on changed inputs" in err
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2]

    # It now runs on the new prompts; the reward file is the next to change.
    reward.write_text("def fn(prompts, responses):\n    return [-5.0 for r in responses]\n")
    code, err = run_cli(capsys, *args, "--steps", 3, "--resume")
    assert code == 2 and f"reward ({reward}:fn) has changed" in err and "prompts (" not in err
    # A run written before fingerprints were kept (no inputs.json) resumes unchecked.
    (out / INPUTS_FILE).unlink()
    assert run_cli(capsys, *args, "--steps", 3, "--resume")[0] == 0
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2, 3]


@pytest.mark.learning
def test_the_python_api_compares_the_prompt_list_itself(tmp_path):
    """train() is handed prompts, not a file: their list is fingerprinted too."""
    from wprlhf.methods.ppo import PPOConfig, train
    from wprlhf.rewards.spec import vowels

    config = PPOConfig(policy="tiny", batch_size=2, num_minibatches=1, ppo_epochs=1, response_length=4, steps=1,
                       log_samples=0)  # fmt: skip
    train(config, ["A dragon opens a bakery.", "The moon files a complaint."], vowels, tmp_path / "run", progress=False)
    longer = dataclasses.replace(config, steps=2)
    with pytest.raises(UserError, match=r"prompt_list \(2 items\) has changed"):
        train(longer, ["Say x.", "Say y."], vowels, tmp_path / "run", resume=True, progress=False)


# ------------------------------------------------------------------------------------------ DPO, SFT


@pytest.mark.learning
def test_dpo_resume_refuses_a_rewritten_comparisons_file(tmp_path, capsys):
    from wprlhf.data import Comparison, write_comparisons

    data, out = tmp_path / "labels.jsonl", tmp_path / "run"
    write_comparisons(data, [Comparison(f"Say something about thing {i}.", ["brr tsk", "aeiou oui"], 1)
                             for i in range(8)])  # fmt: skip
    args = ["dpo", "--policy", "tiny", "--data", data, "--batch-size", "4", "--epochs", "1", "--val-fraction", "0",
            "--out", out]  # fmt: skip
    assert run_cli(capsys, *args)[0] == 0
    write_comparisons(data, [Comparison(f"Say something about thing {i}.", ["brr tsk", "aeiou oui"], 0)
                             for i in range(8)])  # fmt: skip
    code, err = run_cli(capsys, *args, "--resume")
    assert code == 2 and f"data ({data}) has changed" in err and "pairs (8 items) has changed" in err
    assert run_cli(capsys, *args, "--resume", "--allow-changed-inputs")[0] == 0


@pytest.mark.learning
def test_sft_records_what_it_trained_on(tmp_path, tokenizer):
    """SFT does not resume; its run records the fingerprints a resume would compare."""
    from tests.test_sft import write_responses
    from wprlhf.methods.sft import SFTConfig, train

    data = write_responses(tmp_path / "responses.csv", n_prompts=4)
    config = SFTConfig(policy="tiny", data=str(data), max_length=48, batch_size=4, epochs=1, eval_every=100,
                       val_fraction=0.25, n_samples=0)  # fmt: skip
    train(config, tmp_path / "run", progress=False)
    recorded = json.loads((tmp_path / "run" / INPUTS_FILE).read_text())
    assert recorded == {"data": {"spec": str(data), "fingerprint": fingerprint(str(data))}}


# ------------------------------------------------------------------------------------------ the pipelines' state files


def _writing_prompts(root):
    """16 prompts x 2 karma-scored stories, as `wprlhf stories --data` reads them."""
    root.mkdir()
    with open(root / "prompt_responses.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt_id", "prompt", "response_id", "response", "response_score", "response_rank"])
        for p in range(16):
            for r, karma in enumerate((90, 1)):
                w.writerow([f"p{p:04d}", f"[WP] prompt {p} about a cat", f"p{p:04d}_r{r}", f"The cat {p} ran {r}.",
                            karma, r])  # fmt: skip
    return root


def test_stories_resume_refuses_changed_data(tmp_path, capsys):
    data = _writing_prompts(tmp_path / "wp")
    args = ["stories", "--out", tmp_path / "run", "--data", data, "--until", "split", "--policy", "tiny",
            "--reward-model", "tiny", "--cache-dir", tmp_path / "cache", "--eval-prompts", "4"]  # fmt: skip
    assert run_cli(capsys, *args)[0] == 0
    assert "data" in json.loads((tmp_path / "run" / "stories_state.json").read_text())["inputs"]
    with open(data / "prompt_responses.csv", "a", newline="") as f:
        csv.writer(f).writerow(["p9999", "[WP] a new prompt", "p9999_r0", "A new story.", 5, 0])
    code, err = run_cli(capsys, *args, "--resume")
    assert code == 2 and f"data ({data}) has changed" in err and "--allow-changed-inputs" in err
    assert run_cli(capsys, *args, "--resume", "--allow-changed-inputs")[0] == 0


class Killed(Exception):
    pass


def _die(*args, **kwargs):
    raise Killed


def test_compare_resume_refuses_a_changed_comparisons_file(tmp_path, monkeypatch):
    from wprlhf.data import Comparison, write_comparisons
    from wprlhf.pipelines import compare

    prompts, data, out = tmp_path / "prompts.txt", tmp_path / "labels.jsonl", tmp_path / "run"
    prompts.write_text("".join(f"Tell me about the {i}th cat.\n" for i in range(16)))
    write_comparisons(data, [Comparison(f"Tell me about the {i}th cat.", ["a b", "c d"], i % 2) for i in range(16)])
    config = compare.CompareConfig(policy="tiny", reward_model="tiny", methods="dpo", eval_prompts=4, budget=16,
                                   batch_size=8, prompts=str(prompts), comparisons=str(data))  # fmt: skip
    monkeypatch.setattr(compare, "_train_method", _die)  # killed once the comparisons are in
    with pytest.raises(Killed):
        compare.run(config, out)
    write_comparisons(data, [Comparison(f"Tell me about the {i}th cat.", ["a b", "c d"], 1) for i in range(16)])
    with pytest.raises(UserError, match=rf"comparisons \({re.escape(str(data))}\) has changed"):
        compare.run(config, out, resume=True)
    with pytest.raises(Killed):  # allowed: it goes on to train
        compare.run(config, out, resume=True, allow_changed_inputs=True)


@pytest.mark.learning
def test_loop_resume_refuses_a_changed_prompts_file(tmp_path, monkeypatch):
    from wprlhf.pipelines import loop

    prompts, out = tmp_path / "prompts.txt", tmp_path / "run"
    prompts.write_text("".join(f"Tell me about the {i}th cat.\n" for i in range(8)))
    config = loop.LoopConfig(policy="tiny", reward_model="tiny", labeler="sim:sentiment", rounds=1, k=2,
                             prompts_per_round=2, eval_prompts=2, ppo_steps=1, response_length=4,
                             prompts=str(prompts))  # fmt: skip
    monkeypatch.setattr(loop, "rm_train", _die)  # killed after sampling and labelling round 1
    with pytest.raises(Killed):
        loop.run(config, out)
    assert json.loads((out / loop.STATE_FILE).read_text())["done"] == ["start", "1:sample", "1:label"]
    prompts.write_text("".join(f"Tell me about the {i}th dog.\n" for i in range(8)))
    with pytest.raises(UserError, match=rf"prompts \({re.escape(str(prompts))}\) has changed"):
        loop.run(config, out, resume=True)
    with pytest.raises(Killed):
        loop.run(config, out, resume=True, allow_changed_inputs=True)
