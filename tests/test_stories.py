"""`wprlhf stories`, `wprlhf eval` (with blind pairs), `wprlhf sample --best-of` and the story rule (issue 18)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import httpx
import pytest
import torch

from tests.helpers import learned, run_numbers, same_numbers, seed
from wprlhf.cli import main
from wprlhf.data import prompt_key
from wprlhf.methods.best_of import Pool, kl_bound
from wprlhf.rewards.judges import story_verdict

WORDS = ("the night was cold and she walked to the river where the old boat waited under a pale moon while "
         "somewhere far behind her a dog barked twice and the lights of the town went out one by one").split()


def _story(i: int, n: int = 40) -> str:
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n)).capitalize() + "."


@pytest.fixture()
def wp_data(tmp_path):
    """A tiny r/WritingPrompts directory: 24 prompts x 4 karma-scored stories (one repost pair), and 4 Fan et al.
    prompts in their tokenised form."""
    root = tmp_path / "wp"
    root.mkdir()
    with open(root / "prompt_responses.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt_id", "prompt", "response_id", "response", "response_score", "response_rank"])
        for p in range(24):
            prompt = f"[WP] prompt number {p} about a {WORDS[p]} that learns to {WORDS[p + 3]}"
            if p == 23:
                prompt = "[WP] Prompt number 0 about a THE that learns to and!"  # a repost of prompt 0
            for r, karma in enumerate((400, 90, 12, 1)):
                w.writerow([f"p{p:04d}", prompt, f"p{p:04d}_r{r:03d}", _story(p * 4 + r), karma, r])
    with open(root / "fan_prompts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "story"])
        for i in range(4):
            w.writerow([f"[ WP ] A fan prompt {i} : you do n't know why the sky is {WORDS[i]}", _story(100 + i, 60)])
    return root


def _lines(path):
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.learning
def test_stories_runs_every_phase_on_tiny_models_and_keeps_the_parts_apart(wp_data, tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    flags = ["--data", str(wp_data), "--quick", "--policy", "tiny", "--reward-model", "tiny", "--cache-dir", str(cache),
             "--eval-prompts", "8", "--ppo-steps", "3", "--sft-examples", "8", "--response-length", "12",
             "--eval-batch-size", "8", "--score-clip", "1.5", "--reward-extra", "0.5*story+relevance", "--fixed-length",
             "--seed", str(seed(0))]  # fmt: skip
    code = main(["stories", "--out", str(out), *flags])
    assert code == 0, capsys.readouterr().err[-2000:]
    state = json.loads((out / "stories_state.json").read_text())
    assert state["done"] == ["split", "rm", "judge", "sft", "ppo", "best_of", "eval"]

    # One prompt-level split; the repost (prompt 23) sits on the same side as prompt 0.
    parts = {part: _lines(out / "split" / f"{part}_prompts.txt") for part in ("train", "judge", "eval")}
    keys = {part: {prompt_key(p) for p in prompts} for part, prompts in parts.items()}
    assert not keys["train"] & keys["judge"] and not keys["train"] & keys["eval"] and not keys["judge"] & keys["eval"]
    assert len(parts["eval"]) == 8  # 6 of the data's 23 groups (a quarter at most) + 2 Fan prompts, detokenised
    fan = [p for p in parts["eval"] if "fan prompt" in p]
    assert len(fan) == 2 and all("n't" in p and " n't" not in p for p in fan)
    assert "[WP] Prompt number 0 about a THE that learns to and!" in parts[
        next(part for part in parts if prompt_key("[WP] prompt number 0 about a the that learns to and") in keys[part])]

    # No eval or judge prompt in any training file: SFT, the reward model's comparisons, PPO's samples.
    held_out = keys["eval"] | keys["judge"]
    state = json.loads((out / "stories_state.json").read_text())
    rm_prompts = {prompt_key(json.loads(line)["prompt"]) for line in _lines(out / "split" / "rm_comparisons.jsonl")}
    judge_prompts = {prompt_key(json.loads(line)["prompt"]) for line in _lines(out / "split" / "judge_comparisons.jsonl")}
    ppo_prompts = {prompt_key(json.loads(line)["prompt"]) for line in _lines(out / "ppo" / "samples.jsonl")}
    sft_prompts = {prompt_key(json.loads(line)["prompt"]) for line in _lines(Path(state["sft_dir"]) / "samples.jsonl")}
    assert rm_prompts and ppo_prompts and sft_prompts
    assert not (rm_prompts | ppo_prompts | sft_prompts) & held_out
    assert ppo_prompts <= keys["train"] and rm_prompts <= keys["train"]
    for phase in ("sft", "rm", "judge"):  # the run names its cached models
        assert (out / phase).resolve() == Path(state[f"{phase}_dir"]).resolve()
    assert judge_prompts <= keys["judge"] and judge_prompts

    # One metrics row per PPO step, with the judge's score of the same samples beside the reward.
    assert json.loads((out / "ppo" / "config.json").read_text())["score_clip"] == 1.5
    rows = list(csv.DictReader(open(out / "ppo" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["judge_mean"])) for r in rows)

    # Every judge of every side in the report, with CIs; best-of-n and PPO judged against the start and SFT.
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report["sides"]) == {"start", "sft", "best-of-2", "best-of-4", "ppo", "human-top", "human-least",
                                    "looping"}
    for name, side in report["sides"].items():
        for judge in ("judge", "story", "relevance", "distinct_1", "distinct_2", "repetition", "meta", "reward",
                      *(("kl",) if not name.startswith(("human", "looping")) else ())):
            assert side[judge]["lo"] <= side[judge]["mean"] <= side[judge]["hi"], (name, judge, side[judge])
    assert set(report["win_rates"]) >= {"ppo vs start", "best-of-4 vs start", "ppo vs sft", "best-of-4 vs sft",
                                        "ppo vs human-top", "ppo vs best-of-4"}
    assert 0 <= report["win_rates"]["human-top vs start"]["win_rate"] <= 1 and "relevance" in report["sides"]["human-top"]
    for key, win in report["win_rates"].items():  # the length-controlled rate and its CI beside every raw one
        assert win["lc_win_rate_lo"] <= win["lc_win_rate"] <= win["lc_win_rate_hi"], (key, win)
    assert report["sides"]["start"]["kl"]["mean"] == 0
    learned("|KL best-of-4 - KL sft| (nats)",
            abs(report["sides"]["best-of-4"]["kl"]["mean"] - report["sides"]["sft"]["kl"]["mean"]), 50, upper=True)
    assert "ppo" in (out / "eval" / "table.md").read_text()
    assert (out / "eval" / "over_optimisation.png").read_bytes().startswith(b"\x89PNG")
    # Before/after samples on the same prompts, and the final policy queued blind against the start.
    pairs = [json.loads(line) for line in _lines(out / "eval" / "pairs.jsonl")]
    assert [p["prompt"] for p in pairs] == parts["eval"] and all({"start", "ppo", "human-top"} <= set(p) for p in pairs)
    from wprlhf.labeling.store import Store

    queued = Store(out / "eval" / "blind.db").comparisons()
    assert {tuple(sorted(c["metadata"]["blind_sides"])) for c in queued} == {
        ("ppo", "start"), ("best-of-4", "ppo"), ("human-top", "ppo"), ("human-least", "ppo")}

    # Resuming a finished run does nothing again; resuming with a setting a finished phase used is refused.
    capsys.readouterr()
    assert main(["stories", "--out", str(out), *flags, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "done in" not in printed and "== resuming" in printed and "(split, rm, judge, sft, ppo" in printed
    assert main(["stories", "--out", str(out), *flags, "--resume", "--judge-fraction", "0.3"]) == 2
    assert "--split-judge-fraction 0.2" in capsys.readouterr().err
    # A second run on the same data and settings reuses the cached SFT policy and both reward models.
    assert main(["stories", "--out", str(tmp_path / "again"), *flags, "--until", "sft"]) == 0
    said = capsys.readouterr().out
    assert all(f"{phase}: reusing {cache}" in said for phase in ("sft", "rm", "judge")), said[-1500:]
    # SFT on the start policy's best-of-2 by the reward model (expert iteration) instead of human stories: its
    # examples are train prompts' samples, the reward model's pick among 2, and it is another cached policy.
    # With an instruction, the policy reads it before each prompt: the SFT examples hold it, the pool file the bare
    # prompts (what the reward model scored).
    # With --rl none there is no RL phase: the distilled policy is the final one, queued blind against the start.
    assert main(["stories", "--out", str(tmp_path / "expert"), *flags, "--sft-data", "best-of-2", "--instruction",
                 "Tell a story.", "--rl", "none"]) == 0  # fmt: skip
    assert not (tmp_path / "expert" / "ppo").exists()
    expert_report = json.loads((tmp_path / "expert" / "eval" / "report.json").read_text())
    assert set(expert_report["sides"]) == {"start", "sft", "best-of-2", "best-of-4", "human-top", "human-least",
                                           "looping"}
    queued = Store(tmp_path / "expert" / "eval" / "blind.db").comparisons()
    assert ("sft", "start") in {tuple(sorted(c["metadata"]["blind_sides"])) for c in queued}
    assert json.loads((tmp_path / "expert" / "stories_state.json").read_text())["done"] == [
        "split", "rm", "judge", "sft", "best_of", "eval"]
    pool = [json.loads(line) for line in _lines(tmp_path / "expert" / "split" / "sft_best_of.jsonl")]
    to_sample = [json.loads(line)["prompt"] for line in _lines(tmp_path / "expert" / "split" / "pool_queries.jsonl")]
    assert to_sample == ["Tell a story.\n\n" + row["prompt"] for row in pool]  # for a pool drawn elsewhere
    assert len(pool) == 8 and all(len(row["responses"]) == len(row["scores"]) == 2 for row in pool)
    assert {prompt_key(row["prompt"]) for row in pool} <= keys["train"]
    expert_state = json.loads((tmp_path / "expert" / "stories_state.json").read_text())
    assert expert_state["sft_dir"] != state["sft_dir"] and (Path(expert_state["sft_dir"]) / "policy").is_dir()
    sft_samples = [json.loads(line)["prompt"] for line in _lines(Path(expert_state["sft_dir"]) / "samples.jsonl")]
    assert sft_samples and all(p.startswith("[WP] prompt number") for p in sft_samples)
    assert json.loads((Path(expert_state["sft_dir"]) / "policy" / "sft_config.json").read_text())["instruction"] == (
        "Tell a story.")
    from transformers import AutoModelForCausalLM  # the SFT policy loads outside wprlhf

    AutoModelForCausalLM.from_pretrained(json.loads((out / "stories_state.json").read_text())["sft_dir"] + "/policy")

    # --rl dpo: DPO on pairs of the RL start policy's own samples (here the start, asked with the instruction), the
    # task's reward's best against its worst; the final policy is DPO's, queued blind against the start.
    dpo_run = tmp_path / "dpo"
    assert main(["stories", "--out", str(dpo_run), *flags, "--no-sft", "--rl", "dpo", "--dpo-samples", "3",
                 "--instruction", "Tell a story."]) == 0  # fmt: skip
    assert json.loads((dpo_run / "stories_state.json").read_text())["done"] == [
        "split", "rm", "judge", "dpo", "best_of", "eval"]
    dpo_pool = [json.loads(line) for line in _lines(dpo_run / "dpo" / "pool.jsonl")]
    assert len(dpo_pool) == 8 and all(len(row["scores"]) == 3 for row in dpo_pool)
    assert {prompt_key(row["prompt"]) for row in dpo_pool} <= keys["train"]
    assert list(csv.DictReader(open(dpo_run / "dpo" / "metrics.csv")))  # it trained
    AutoModelForCausalLM.from_pretrained(dpo_run / "dpo" / "policy")
    dpo_report = json.loads((dpo_run / "eval" / "report.json").read_text())
    assert set(dpo_report["sides"]) == {"start", "dpo", "best-of-2", "best-of-4", "human-top", "human-least",
                                        "looping"}
    assert dpo_report["sides"]["dpo"]["kl"]["lo"] <= dpo_report["sides"]["dpo"]["kl"]["mean"]
    queued = Store(dpo_run / "eval" / "blind.db").comparisons()
    assert ("dpo", "start") in {tuple(sorted(c["metadata"]["blind_sides"])) for c in queued}

    # The numbers all three runs wrote are those they wrote before the last refactor (on this CPU's kernels).
    same_numbers("stories_tiny", {f"{name}/{key}": value for name, run in (("ppo", out), ("expert", tmp_path / "expert"),
                                  ("dpo", dpo_run)) for key, value in run_numbers(run).items()})  # fmt: skip


def test_stories_refuses_bad_settings_before_any_work(wp_data, tmp_path, capsys):
    for flags, words in ((["--best-of", "1,x"], "comma-separated"), (["--judge-fraction", "0.7"], "judge_fraction"),
                         (["--eval-prompts", "0"], "eval_prompts"), (["--lr", "nan"], "lr"),
                         (["--sft-data", "best-of-1"], "sft.data"), (["--reward-extra", "2*nosuch"], "nosuch"),
                         (["--rl", "none", "--no-sft"], "trains nothing"), (["--rl", "rloo"], "rl must be"),
                         (["--dpo-beta", "0"], "dpo.beta")):  # fmt: skip
        assert main(["stories", "--out", str(tmp_path / "r"), "--data", str(wp_data), *flags]) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "r").exists()
    assert main(["stories", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_best_of_picks_the_highest_score_among_the_first_m():
    pool = Pool(["a", "b"], [["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"]],
                __import__("numpy").array([[0.1, 0.5, 0.9, 0.2], [0.7, 0.7, 0.1, 0.8]]))  # fmt: skip
    assert pool.best(2) == (["a1", "b0"], [0.5, 0.7])  # b: equal scores, the earlier sample
    assert pool.best(4) == (["a2", "b3"], [0.9, 0.8])
    assert kl_bound(1) == 0 and kl_bound(4) == pytest.approx(math.log(4) - 0.75)


def test_sample_best_of_writes_the_best_first(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dragon\na ship\n")
    out = tmp_path / "bo.jsonl"
    assert main(["sample", "--policy", "tiny", "--prompts", str(prompts), "--best-of", "4", "--reward", "length",
                 "--max-new-tokens", "12", "--out", str(out)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in _lines(out)]
    assert len(rows) == 2
    for row in rows:
        assert len(row["responses"]) == 4 and row["best_of"] == 4 and row["reward"] == "length"
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert row["scores"][0] == pytest.approx(min(len(row["responses"][0].split()) / 100, 1.0))
    assert main(["sample", "--policy", "tiny", "--prompts", str(prompts), "--best-of", "4", "--out", str(out)]) == 2
    assert "--reward" in capsys.readouterr().err


@pytest.mark.parametrize("response, verdict", [
    ("What a great concept! Here's a story about a dragon who learns to fly. I hope you enjoy it, and let me know.",
     "assistant"),
    ("Sure! The dragon in your story could be a metaphor for growing up, which is a common theme in fiction.",
     "assistant"),
    ("1. The dragon wakes up.\n2. The dragon eats.\n3. The dragon sleeps and dreams of the sea again.", "markup"),
    ("A dragon who is afraid of fire has to save the village from a flood, and it does so in the end.", "restated"),
    ("asdf qwer zxcv 123 456 ### $$$ %%% @@@ !!! ??? asdf qwer zxcv 123 456", "broken"),
    ("the the the the the the the the the the the the the the", "broken"),
    ("\"Get back,\" Mira hissed, pulling the boy behind the barrel as the first ember drifted down over the docks. "
     "Nobody in Harrow had seen the old dragon in forty years.", "story"),
])  # fmt: skip
def test_story_rule_names_each_failure(response, verdict):
    assert story_verdict("[WP] A dragon who is afraid of fire has to save the village from a flood", response) == verdict


def _tiny_policy(path, seed):
    from wprlhf.models import load_policy

    model, tokenizer = load_policy("tiny", seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_blind_pairs_through_the_page_give_the_hand_counted_win_rate(tmp_path, capsys):
    from wprlhf.labeling.app import BackgroundServer, create_app
    from wprlhf.labeling.store import Store

    alpha, beta = _tiny_policy(tmp_path / "alpha-policy", 1), _tiny_policy(tmp_path / "beta-policy", 2)
    prompts = tmp_path / "eval_prompts.txt"
    prompts.write_text("".join(f"[WP] prompt {i} about the sea\n" for i in range(8)))
    db, report = tmp_path / "blind.db", tmp_path / "eval.json"
    Store(db, labels_per_comparison=2)
    assert main(["eval", "--policy", str(alpha), "--against", str(beta), "--prompts", str(prompts), "--judge", "length",
                 "--response-length", "10", "--min-response-length", "1", "--blind-db", str(db), "--out",
                 str(report)]) == 0  # fmt: skip
    written = json.loads(report.read_text())
    assert written["blind_queued"] == 8 and "judge" in written["sides"]["policy"] and written["sides"]["policy"]["kl"]
    for side in ("policy", "against"):  # lengths vary (min 1 of 10): the share cut at the cap, with its CI
        share = written["sides"][side]["truncated_share"]
        assert 0 <= share["lo"] <= share["mean"] <= share["hi"] <= 1, share
    texts = {json.loads(line)["prompt"]: json.loads(line) for line in _lines(tmp_path / "eval-pairs.jsonl")}

    # Two people label through the HTTP API: ann picks the longer response (a tie when equal); bob agrees except on
    # the first comparison he sees, where he picks the other one.
    seen: list[str] = []
    with BackgroundServer(create_app(db, min_read_seconds=0)) as url, httpx.Client(base_url=url) as client:
        seen.append(client.get("/").text)
        for labeler in ("ann", "bob"):
            session = client.post("/api/session", json={"labeler": labeler}).json()["session"]
            first = True
            while True:
                answer = client.post("/api/next", json={"session": session})
                seen.append(answer.text)
                comparison = answer.json()["comparison"]
                if comparison is None:
                    break
                a, b = (len(t) for t in comparison["responses"])
                choice = "tie" if a == b else int(b > a)
                if labeler == "bob" and first and choice != "tie":
                    choice, first = 1 - choice, False
                done = client.post("/api/label", json={"session": session, "comparison_id": comparison["id"],
                                                       "choice": choice})  # fmt: skip
                seen.append(done.text)
            seen.append(client.get("/api/stats", params={"session": session}).text)
    # Nothing the page received names a policy or says which side is which.
    for body in seen:
        assert "alpha-policy" not in body and "beta-policy" not in body and "blind_sides" not in body

    hand = []
    for row in texts.values():  # ann's rule from the texts alone, counted for the policy side
        x, y = len(row["policy"]), len(row["against"])
        hand.append(0.5 if x == y else float(x > y))
    bob_flipped = next((i for i, v in enumerate(_queue_order(db, texts)) if v != 0.5), None)
    bob = [v if i != bob_flipped else 1 - v for i, v in enumerate(_queue_order(db, texts))]
    expected = (sum(hand) + sum(bob)) / (2 * len(hand))
    assert main(["eval", "--blind-results", str(db)]) == 0
    printed = capsys.readouterr().out
    from wprlhf.evals.side_by_side import blind_results

    result = blind_results(db)
    (pair,) = result["pairs"].values()
    assert pair[str(alpha)]["win_rate"] == pytest.approx(expected)
    assert pair[str(beta)]["win_rate"] == pytest.approx(1 - expected)
    assert result["labels"] == pair["labels"] == 16
    agree = (len(hand) - (bob_flipped is not None)) / len(hand)
    assert result["agreement"] == pytest.approx(agree)
    assert f"{expected:.1%}" in printed


def _queue_order(db, texts):
    """ann's credit for the policy side, comparison by comparison in queue order (the order bob sees them)."""
    from wprlhf.labeling.store import Store

    out = []
    for c in Store(db).comparisons():
        row = texts[c["prompt"]]
        x, y = len(row["policy"]), len(row["against"])
        out.append(0.5 if x == y else float(x > y))
    return out


def test_blind_order_is_not_predictable_from_any_seed(tmp_path):
    from wprlhf.evals.side_by_side import queue_blind
    from wprlhf.labeling.store import Store

    prompts = [f"prompt {i}" for i in range(40)]
    orders = []
    for name in ("one.db", "two.db"):
        assert queue_blind(tmp_path / name, prompts, ("a", [f"x{i}" for i in range(40)]),
                           ("b", [f"y{i}" for i in range(40)])) == 40  # fmt: skip
        orders.append([c["metadata"]["blind_sides"][0] for c in Store(tmp_path / name).comparisons()])
    assert orders[0] != orders[1]  # equal by chance once in 2**40
    assert 5 < orders[0].count("a") < 35


def test_eval_refuses_bad_response_files_and_settings(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "p1", "responses": ["a b c"]}\n{"prompt": "p2", "response": "d e f"}\n')
    for text, words in (('{"prompt": "p", "responses": 5}\n', "non-empty list of strings"),
                        ('{"prompt": "p", "responses": "abc"}\n', "non-empty list of strings"),
                        ("", "holds no responses"), ("not json\n", "JSON")):  # fmt: skip
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        assert main(["eval", "--policy", str(bad), "--against", str(good)]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    for flags, words in ((["--batch-size", "0"], "batch_size"), (["--temperature", "nan"], "temperature"),
                         (["--response-length", "8", "--min-response-length", "9"], "min_response_length")):  # fmt: skip
        assert main(["eval", "--policy", str(good), "--against", str(good), *flags]) == 2
        assert words in capsys.readouterr().err
    assert main(["eval", "--policy", str(good), "--against", str(good), "--max-prompts", "1", "--out",
                 str(tmp_path / "e.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "e.json").read_text())["prompts"] == 1
    assert main(["sample", "--policy", "tiny", "--best-of", "0", "--reward", "length", "--out", str(tmp_path / "s")]) == 2
    assert "--best-of must be >= 1" in capsys.readouterr().err


def test_blind_results_of_a_missing_or_empty_database_say_what_to_do(tmp_path, capsys):
    assert main(["eval", "--blind-results", str(tmp_path / "none.db")]) == 2
    assert "queue pairs first" in capsys.readouterr().err
    from wprlhf.labeling.store import Store

    Store(tmp_path / "empty.db")
    assert main(["eval", "--blind-results", str(tmp_path / "empty.db")]) == 2
    assert "no labels" in capsys.readouterr().err


def test_the_instruction_travels_with_generation_and_never_reaches_the_reward(tokenizer, tmp_path, monkeypatch):
    """The text a policy reads is token for token the instruction, a blank line and the prompt, wherever prompts are
    tokenized (sampling, PPO, DPO, evaluation: `encode_prompts`; SFT: `chat_ids`); a reward function is given the
    bare prompts."""
    from wprlhf.generation import chat_ids, encode_prompts, instructed
    from wprlhf.methods import onpolicy
    from wprlhf.methods.onpolicy_config import PPOConfig
    from wprlhf.methods.ppo import train

    prompts, told = ["[WP] A door", "[WP] A key"], "Write a story."
    glued = ["Write a story.\n\n[WP] A door", "Write a story.\n\n[WP] A key"]
    assert instructed(prompts, told) == glued and instructed(prompts, "") == prompts
    for a, b in zip(encode_prompts(tokenizer, prompts, instruction=told), encode_prompts(tokenizer, glued)):
        assert torch.equal(a, b)
    assert chat_ids(tokenizer, prompts, ["x", "y"], told) == chat_ids(tokenizer, glued, ["x", "y"])
    encoded, scored = [], []
    real = onpolicy.encode_prompts
    monkeypatch.setattr(onpolicy, "encode_prompts", lambda tok, p, *a: encoded.append(a[-1]) or real(tok, p, *a))

    def reward(given, responses):
        scored.extend(given)
        return [0.0] * len(responses)

    train(PPOConfig(policy="tiny", instruction=told, steps=1, batch_size=2, num_minibatches=1, ppo_epochs=1,
                    response_length=4, device="cpu", mixed_precision="no", log_samples=0), prompts, reward,
          tmp_path / "ppo")  # fmt: skip
    assert encoded == [told] and sorted(scored) == sorted(prompts)


def test_a_run_saved_before_an_option_existed_resumes_with_its_default(tmp_path):
    from wprlhf.errors import UserError
    from wprlhf.pipelines.runner import check_settings
    from wprlhf.pipelines.stories import PHASE_SETTINGS, StoriesConfig

    def check(config, done):
        check_settings(config, saved, done, lambda phase: PHASE_SETTINGS.get(phase, ()))

    saved = {k: v for k, v in dataclasses.asdict(StoriesConfig()).items() if k != "instruction"}
    check(StoriesConfig(), ["split", "sft", "ppo"])  # no error
    with pytest.raises(UserError, match="--instruction '' \\(now 'Write.'\\)"):
        check(StoriesConfig(instruction="Write."), ["split", "sft", "ppo"])
    # PPO killed part-way continues from its checkpoints: its settings hold before it is finished too.
    check(StoriesConfig(instruction="Write."), ["split"])
    with pytest.raises(UserError, match="--instruction"):
        check(StoriesConfig(instruction="Write."), ["split", "ppo"])  # `started` counts as finished
    # A run saved by an earlier version holds flat keys; each is read where it lives now (StoriesConfig.RENAMED).
    saved = {"sft_lr": 1e-4, "batch_size": 16, "sft": True, "instruction": ""}
    check(StoriesConfig(), ["split", "sft", "ppo"])
    saved = {"batch_size": 8, "sft": False}
    with pytest.raises(UserError, match="--ppo-batch-size 8 \\(now 16\\), --sft-enabled False \\(now True\\)"):
        check(StoriesConfig(), ["sft", "ppo"])


def test_over_optimisation_draws_ppos_steps_only_where_their_kl_is_to_the_start(tmp_path):
    """Every side with a KL is a point; PPO's steps are a line only without SFT: with it, their KL is to the SFT
    policy, another origin, and the figure's note says where they are plotted instead."""
    from wprlhf.pipelines.stories import SFTSettings, StoriesConfig, over_optimisation_curves

    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "metrics.csv").write_text("step,score_mean,judge_mean,kl\n1,0.5,0.1,0.0\n2,1.5,0.3,4.0\n")
    sides = {"start": {"kl": {"mean": 0.0}, "reward": {"mean": 0.5}, "judge": {"mean": 0.0}},
             "ppo": {"kl": {"mean": 9.0}, "reward": {"mean": 2.0}, "judge": {"mean": 0.4}},
             "human-top": {"reward": {"mean": 1.0}, "judge": {"mean": 1.0}}}  # fmt: skip
    curves, note = over_optimisation_curves(StoriesConfig(rl="ppo"), tmp_path, {"sides": sides})
    assert [(c.name, c.steps) for c in curves] == [("ppo", False)] and "SFT policy" in note
    no_sft = StoriesConfig(rl="ppo", sft=SFTSettings(enabled=False))
    curves, note = over_optimisation_curves(no_sft, tmp_path, {"sides": sides})
    assert [(c.name, c.steps) for c in curves] == [("ppo", False), ("ppo", True)] and not note
    assert list(curves[1].kl) == [0.0, 4.0] and list(curves[1].proxy) == [0.0, 1.0]


def test_a_pool_sampled_elsewhere_is_scored_by_the_task_reward_and_kept(tmp_path, monkeypatch):
    """`wprlhf sample -k N` over the queries (e.g. on a GPU) gives distillation or DPO its pool: read, scored on the
    bare prompts, rewritten with bare prompts and scores; a pool of the wrong size is sampled again."""
    import wprlhf.models
    from wprlhf.generation import instructed, write_samples
    from wprlhf.pipelines import stories

    config = stories.StoriesConfig(instruction="Tell a story.")
    prompts = ["[WP] a door", "[WP] a key"]
    path = tmp_path / "pool.jsonl"
    write_samples(path, instructed(prompts, config.instruction), [["x", "good good", "good"], ["good", "y", "z"]],
                  "smollm2")  # fmt: skip
    seen = []

    def reward(queries, responses):
        seen.extend(queries)
        return [float(r.count("good")) for r in responses]

    monkeypatch.setattr(stories, "task_reward", lambda config, rm_dir: reward)

    def no_sampling(*args, **kwargs):
        raise RuntimeError("sampled again")

    monkeypatch.setattr(wprlhf.models, "load_policy", no_sampling)
    pool = stories.own_pool(config, "smollm2", prompts, 3, "rm", path, seed=0)
    assert pool.best(3)[0] == ["good good", "good"] and pool.scores.tolist() == [[0, 2, 1], [1, 0, 0]]
    assert seen == [p for p in prompts for _ in range(3)]
    rows = [json.loads(line) for line in _lines(path)]
    assert [r["prompt"] for r in rows] == prompts and [r["scores"] for r in rows] == [[0, 2, 1], [1, 0, 0]]
    seen.clear()
    assert stories.own_pool(config, "smollm2", prompts, 3, "rm", path, seed=0).scores.tolist() == pool.scores.tolist()
    assert not seen  # scored once
    with pytest.raises(RuntimeError, match="sampled again"):
        stories.own_pool(config, "smollm2", prompts, 4, "rm", path, seed=0)


@pytest.mark.parametrize("precision, sampled_in", [("bf16", torch.bfloat16), ("no", None)])
def test_pools_are_sampled_under_the_runs_precision_and_scored_outside_it(tmp_path, monkeypatch, precision, sampled_in):
    """--mixed-precision bf16 samples the own-sample pool under bf16 autocast (most of a DPO run's time on a CPU);
    the reward scores outside it, in the precision it was trained in; 'no' samples in fp32. Pools are drawn
    pool_batch_size rows a batch, not evaluation's eval_batch_size."""
    import wprlhf.methods.best_of
    from wprlhf.pipelines import stories

    seen = {}

    def fake_generate_k(model, tokenizer, prompts, k, config, **kwargs):
        seen["sampled"] = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        seen["batch_size"] = kwargs["batch_size"]
        kwargs["finished"].extend([True] * (k * len(prompts)))  # every story ended itself
        return [[f"story {i}" for i in range(k)] for _ in prompts]

    def reward(queries, responses):
        seen["scored"] = torch.is_autocast_enabled("cpu")
        return [float(r[-1]) for r in responses]

    monkeypatch.setattr(wprlhf.methods.best_of, "generate_k", fake_generate_k)
    monkeypatch.setattr(stories, "task_reward", lambda config, rm_dir: reward)
    config = stories.StoriesConfig(policy="tiny", device="cpu", mixed_precision=precision, response_length=4,
                                   pool_batch_size=5, eval=stories.EvalSettings(batch_size=7))  # fmt: skip
    pool = stories.own_pool(config, "tiny", ["[WP] a door"], 3, "rm", tmp_path / "pool.jsonl", seed=0)
    assert pool.best(3)[0] == ["story 2"]
    assert seen == {"sampled": sampled_in, "scored": False, "batch_size": 5}


def test_eval_with_an_instruction_asks_the_policies_and_judges_the_bare_prompt(tmp_path, monkeypatch):
    """`wprlhf eval --instruction`: the sampled policies and their KL read instruction + prompt, the judges, the
    pairs file and the blind queue the bare prompt."""
    from wprlhf.evals import side_by_side, sides
    from wprlhf.generation import instructed

    alpha, beta = _tiny_policy(tmp_path / "alpha-policy", 1), _tiny_policy(tmp_path / "beta-policy", 2)
    prompts = tmp_path / "eval_prompts.txt"
    prompts.write_text("[WP] a lighthouse\n[WP] a key\n")
    read = {"sampled": [], "scored": [], "judged": []}

    def spy(module, name, what, at, told=None):  # record what module.name is asked to read, then call it
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: read[what].extend(
            instructed(a[at], a[told]) if told else a[at]) or real(*a, **k))  # fmt: skip

    spy(side_by_side, "_sample_side", "sampled", 2, 4), spy(sides, "response_logprobs", "scored", 2, 9)
    spy(side_by_side, "judge_sides", "judged", 0)
    assert main(["eval", "--policy", str(alpha), "--against", str(beta), "--prompts", str(prompts), "--judge", "length",
                 "--response-length", "6", "--instruction", "Tell a story.", "--out", str(tmp_path / "e.json")]) == 0  # fmt: skip
    asked = ["Tell a story.\n\n[WP] a lighthouse", "Tell a story.\n\n[WP] a key"]
    assert read["sampled"] == asked * 2 and read["scored"] == asked * 2
    assert read["judged"] == ["[WP] a lighthouse", "[WP] a key"]
    assert [json.loads(line)["prompt"] for line in _lines(tmp_path / "e-pairs.jsonl")] == read["judged"]
    assert json.loads((tmp_path / "e.json").read_text())["instruction"] == "Tell a story."


def test_eval_compares_an_instructed_system_with_the_model_asked_the_bare_prompt(tmp_path, monkeypatch):
    """`--against-instruction ''`: one model asked two ways is two systems. --policy reads the instruction, --against
    (the same model) the bare prompt, and the KL reference reads what --against read; the blind queue names the
    two sides apart."""
    from wprlhf.evals import side_by_side, sides
    from wprlhf.generation import instructed
    from wprlhf.labeling.store import Store

    alpha = _tiny_policy(tmp_path / "alpha-policy", 1)
    prompts = tmp_path / "eval_prompts.txt"
    prompts.write_text("[WP] a lighthouse\n[WP] a key\n")
    read = {"sampled": [], "scored": []}
    for module, name, what, told in ((side_by_side, "_sample_side", "sampled", 4), (sides, "response_logprobs", "scored", 9)):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _w=what, _t=told, **k: read[_w].extend(
            instructed(a[2], a[_t])) or _r(*a, **k))  # fmt: skip
    db = tmp_path / "blind.db"
    assert main(["eval", "--policy", str(alpha), "--against", str(alpha), "--prompts", str(prompts),
                 "--response-length", "6", "--instruction", "Tell a story.", "--against-instruction", "",
                 "--out", str(tmp_path / "e.json"), "--blind-db", str(db)]) == 0  # fmt: skip
    bare = ["[WP] a lighthouse", "[WP] a key"]
    told = ["Tell a story.\n\n" + p for p in bare]
    assert read["sampled"] == told + bare and read["scored"] == told + bare
    report = json.loads((tmp_path / "e.json").read_text())
    assert (report["instruction"], report["against_instruction"]) == ("Tell a story.", "")
    assert report["sides"]["policy"]["kl"]["mean"] != 0.0  # the same weights, two contexts: not the same system
    named = {n for c in Store(db).comparisons() for n in c["metadata"]["blind_sides"]}
    assert named == {f"{alpha} [policy: Tell a story.]", f"{alpha} [against: bare prompt]"}


def test_the_readmes_recipe_file_is_a_valid_stories_config_that_make_demo_runs(tmp_path):
    """examples/stories.yaml (the headline's recipe: whole stories) and examples/openings.yaml (the openings
    result's) load into StoriesConfig, their reward SPEC resolves, and `make demo` passes the first to `wprlhf
    stories`."""
    from pathlib import Path

    from wprlhf.checkpoint import load_config
    from wprlhf.errors import UserError
    from wprlhf.pipelines.stories import StoriesConfig
    from wprlhf.rewards.spec import load_reward

    root = Path(__file__).resolve().parents[1]
    config = load_config(StoriesConfig, root / "examples" / "stories.yaml", {})
    assert (config.sft.enabled, config.rl, config.dpo.samples, config.fixed_length) == (False, "dpo", 6, False)
    assert "short story" in config.instruction and config.response_length == 256
    openings = load_config(StoriesConfig, root / "examples" / "openings.yaml", {})
    assert (openings.dpo.samples, openings.fixed_length, openings.response_length) == (16, True, 64)
    # A config file of an earlier version, flat keys, means the same.
    flat = tmp_path / "flat.yaml"
    flat.write_text("sft: false\nrl: dpo\ndpo_samples: 12\nbatch_size: 8\nppo:\n  steps: 3\n")
    old = load_config(StoriesConfig, flat, {"ppo": {"lr": 2e-5}})
    assert (old.sft.enabled, old.dpo.samples, old.ppo.batch_size, old.ppo.steps, old.ppo.lr) == (False, 12, 8, 3, 2e-5)
    flat.write_text("ppo: 3\n")
    with pytest.raises(UserError, match="ppo is a section of settings"):
        load_config(StoriesConfig, flat, {})
    scores = load_reward(config.reward_extra, "reward_extra")(["[WP] p"], ["and so on and so on and so on"])
    assert len(scores) == 1 and math.isfinite(scores[0])
    assert "--config examples/stories.yaml" in (root / "Makefile").read_text()


@pytest.mark.learning
def test_whole_stories_with_two_rounds_of_dpo_on_tiny_models(wp_data, tmp_path, capsys):
    """Whole responses (end-of-turn allowed, cut at the cap), two rounds of iterative DPO with DivPO pairs, then a
    third round added on a resume: what every phase writes about lengths, cut shares, length control and rounds."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from wprlhf.labeling.store import Store

    out = tmp_path / "run"
    flags = ["--data", str(wp_data), "--quick", "--policy", "tiny", "--reward-model", "tiny", "--cache-dir",
             str(tmp_path / "cache"), "--eval-prompts", "8", "--sft-examples", "6", "--response-length", "16",
             "--no-sft", "--rl", "dpo", "--dpo-samples", "4", "--dpo-pairs", "divpo", "--eval-best-of", "2,4",
             "--eval-diversity-prompts", "4", "--eval-diversity-samples", "2", "--eval-equal-words", "5",
             "--missing-eos-penalty", "3", "--seed", str(seed(0))]  # fmt: skip
    assert main(["stories", "--out", str(out), *flags, "--rounds", "2"]) == 0, capsys.readouterr().err[-2000:]
    state = json.loads((out / "stories_state.json").read_text())
    assert state["done"] == ["split", "rm", "judge", "dpo", "dpo-r2", "best_of", "eval"]
    assert {"dpo", "dpo-r2"} <= set(state["timings_s"])  # each round timed

    # Each round's pool: its own train prompts, the cut ones penalised, and its lengths and cut share stated.
    pools = {r: [json.loads(line) for line in _lines(out / r / "pool.jsonl")] for r in ("dpo", "dpo-r2")}
    assert not {row["prompt"] for row in pools["dpo"]} & {row["prompt"] for row in pools["dpo-r2"]}
    for name, rows in pools.items():
        stats = json.loads((out / name / "pool_stats.json").read_text())
        cut = [not f for row in rows for f in row["finished"]]
        assert stats["cut_share"] == pytest.approx(np.mean(cut)) and stats["samples"] == len(cut) == 24
        assert stats["words"]["p10"] <= stats["words"]["p50"] <= stats["words"]["p90"] <= 16
        assert 0 < stats["pairs"] <= 6 and stats["pool_s"] > 0  # the pool's own time, apart from training
    assert json.loads((out / "dpo-r2" / "config.json").read_text())["policy"] == str(out / "dpo" / "policy")
    AutoModelForCausalLM.from_pretrained(out / "dpo-r2" / "policy")

    # The report: every round's policy, the length-only baseline, both human stories, LC beside every win rate.
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["final"] == "dpo-r2" and report["fixed_length"] is False
    assert {"start", "dpo", "dpo-r2", "best-of-4", "longest-of-4", "human-top", "human-least",
            "looping"} <= set(report["sides"])  # fmt: skip
    assert {"looping vs start", "longest-of-4 vs start", "dpo-r2 vs start", "dpo vs start", "dpo-r2 vs dpo", "dpo-r2 vs best-of-4", "dpo-r2 vs longest-of-4",
            "dpo-r2 vs human-top", "dpo-r2 vs human-least"} <= set(report["win_rates"])  # fmt: skip
    for key, win in report["win_rates"].items():
        assert 0 <= win["lc_win_rate_lo"] <= win["lc_win_rate"] <= win["lc_win_rate_hi"] <= 1, (key, win)
        assert math.isfinite(win["length_coef"])
    pairs = [json.loads(line) for line in _lines(out / "eval" / "pairs.jsonl")]
    for name in ("start", "dpo", "dpo-r2"):  # the cut share is what the sampled ids say
        side = report["sides"][name]
        assert 0 <= side["truncated_share"]["mean"] <= 1 and side["kl_per_token"]["lo"] <= side["kl_per_token"]["hi"]
        assert side["spread"]["lo"] <= side["spread"]["mean"] <= side["spread"]["hi"]
        assert side["length_words"]["p50"] <= 16 and "distinct_2_eq" in side
    longest = [max(row["responses"], key=lambda r: len(r.split())) for row in
               (json.loads(line) for line in _lines(out / "best_of" / "pool.jsonl"))]  # fmt: skip
    assert [len(p["longest-of-4"].split()) for p in pairs] == [len(t.split()) for t in longest]
    human = [p["human-top"] for p in pairs]  # cut to the final policy's words, never longer
    assert all(len(h.split()) <= max(len(p["dpo-r2"].split()), 1) for h, p in zip(human, pairs))
    queued = Store(out / "eval" / "blind.db").comparisons()
    assert {tuple(sorted(c["metadata"]["blind_sides"])) for c in queued} == {
        ("dpo-r2", "start"), ("best-of-4", "dpo-r2"), ("dpo-r2", "human-top"), ("dpo-r2", "human-least")}
    assert "dpo-r2 vs dpo" in (out / "eval" / "table.md").read_text()
    summary = (out / "eval" / "table.md").read_text()
    assert "Judge check, looping (should not win)" in summary and "Judge check, longest-of-4" in summary
    assert [len(p["looping"].split()) for p in pairs] == [len(p["start"].split()) for p in pairs]

    # A third round on a resume: only it and the evaluation run again.
    capsys.readouterr()
    assert main(["stories", "--out", str(out), *flags, "--rounds", "3", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "== dpo-r3 done" in printed and "== eval done" in printed and "== dpo-r2 done" not in printed
    assert json.loads((out / "eval" / "report.json").read_text())["final"] == "dpo-r3"


def test_the_looping_baseline_repeats_each_opening_to_the_texts_own_length():
    from wprlhf.evals.measures import looped

    assert looped(["a b c d e f g", "x", ""], span=3) == ["a b c a b c a", "x", ""]


def test_length_controlled_win_rate_removes_a_judge_that_only_counts_words():
    """A judge that sees nothing but length (it picks the longer response with probability sigmoid(3 tanh(delta /
    std))), the new side longer in 80 % of 400 pairs: the raw win rate is about 70 %, the length-controlled one
    near 50 %; with equal lengths LC is the raw rate."""
    import numpy as np

    from wprlhf.evals.measures import lc_win_rate

    rng = np.random.default_rng(0)
    old = rng.integers(100, 200, 400).astype(float)
    sign = np.where(np.arange(400) < 320, 1, -1)
    new = old + sign * rng.integers(5, 60, 400)
    delta = new - old
    credits = (rng.random(400) < 1 / (1 + np.exp(-3 * np.tanh(delta / delta.std())))).astype(float)
    lc = lc_win_rate(credits, new, old, [str(i) for i in range(400)])
    assert credits.mean() > 0.65 and abs(lc["lc_win_rate"] - 0.5) < 0.12 and lc["length_coef"] > 1, lc  # seeds 0-5: 0.48-0.60
    assert lc["lc_win_rate_lo"] <= lc["lc_win_rate"] <= lc["lc_win_rate_hi"]
    same = lc_win_rate([1, 0, 1, 0.5, 1, 1], [50] * 6, [50] * 6, list("abcdef"))
    assert same["lc_win_rate"] == pytest.approx(4.5 / 6, abs=1e-3) and same["length_coef"] == 0


def test_divpo_pairs_take_the_most_diverse_good_sample_and_the_least_diverse_bad_one(monkeypatch):
    """Scores 3, 2, 1, 0 split at the median into {0, 1} and {2, 3}; sample 1 lies far from the others and samples
    2 and 3 near each other, 3 nearer the rest: chosen 1, rejected 3. best-worst takes 0 and 3."""
    import numpy as np

    from wprlhf.pipelines import stories
    from wprlhf.rewards.judges import Relevance

    vectors = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0], [0, 0, 1.0], [1.0, 0.6, 0], [1.0, 0.4, 0]]), dim=-1)
    monkeypatch.setattr(Relevance, "embed", lambda self, texts: vectors.repeat(len(texts) // 4, 1))
    pool = Pool(["p"], [["a", "b", "c", "d"]], np.array([[3.0, 2.0, 1.0, 0.0]]))
    config = stories.StoriesConfig(rl="dpo", dpo=stories.DPOSettings(pairs="divpo"))
    assert [c.responses for c in stories.dpo_pairs(config, pool)] == [["b", "d"]]
    assert [c.responses for c in stories.dpo_pairs(stories.StoriesConfig(rl="dpo"), pool)] == [["a", "d"]]


def test_human_stories_are_cut_to_the_policys_words_at_a_sentence_end_where_one_is_near():
    from wprlhf.pipelines.stories import cut_to

    story = "One two three. Four five six seven eight. Nine ten."
    assert cut_to([story, story, story], [8, 5, 2]) == ["One two three. Four five six seven eight.", "One two three. Four five",
                                                         "One two"]  # fmt: skip


def test_the_split_caps_each_reward_models_pairs_a_prompt_by_its_own_setting(wp_data, tmp_path):
    from collections import Counter

    out = tmp_path / "run"
    assert main(["stories", "--data", str(wp_data), "--out", str(out), "--quick", "--until", "split",
                 "--judge-pairs-per-prompt", "1", "--rm-pairs-per-prompt", "0"]) == 0  # fmt: skip
    rm = Counter(json.loads(line)["prompt"] for line in _lines(out / "split" / "rm_comparisons.jsonl"))
    judge = Counter(json.loads(line)["prompt"] for line in _lines(out / "split" / "judge_comparisons.jsonl"))
    assert set(judge.values()) == {1} and max(rm.values()) == 5  # 4 stories of karma 400/90/12/1: 5 qualify
