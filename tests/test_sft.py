"""SFT: the collator's masks by hand, chat formatting as generation encodes it, the loss against a plain masked
cross-entropy, padding and packing invariances, learning a toy set, the CLI's files, and bad inputs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import learned, seed
from wprlhf.cli import main
from wprlhf.core import linear_schedule
from wprlhf.errors import UserError
from wprlhf.methods.sft import (
    Example,
    SFTConfig,
    collate,
    encode_examples,
    pack,
    sft_loss,
    token_logprobs,
    train,
)
from wprlhf.metrics import SFT_METRIC_NAMES, read_metrics

STORY = "The cat sat on the mat. The dog sat on the log. "


def write_responses(path, n_prompts=12, columns=("prompt_id", "prompt", "response_id", "response",
                                                 "response_score", "response_rank")):  # fmt: skip
    """A responses CSV in the shared data's columns: per prompt a repetitive best story (rank 0) and a worse one."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i in range(n_prompts):
            prompt = f"[WP] Prompt number {i} about animals"
            rows = [
                (f"p{i:02d}", prompt, f"p{i:02d}_r0", STORY * 3, 50, 0),
                (f"p{i:02d}", prompt, f"p{i:02d}_r1", f"Meh {i}.", 1, 1),
            ]
            for row in rows:
                writer.writerow(row[: len(columns)])
    return path


@pytest.fixture()
def stories_csv(tmp_path):
    return write_responses(tmp_path / "responses.csv")


def batch_of(examples):
    return collate([[e] for e in examples], pad_token_id=0)


# ------------------------------------------------------------------------------------------ collation


def test_collate_masks_prompts_and_padding_out_of_the_loss():
    """Worked by hand: row 0 = prompt [5, 6], response [7, 2]; row 1 = prompt [9], response [8], padded by 2."""
    batch = batch_of([Example([5, 6], [7, 2]), Example([9], [8])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [9, 8, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]
    assert batch["attention_mask"].tolist() == [[True, True, True, True], [True, True, False, False]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    # The loss counts exactly the 3 response tokens: 7, 2 and 8.
    assert batch["input_ids"][batch["loss_mask"]].tolist() == [7, 2, 8]


def test_chat_examples_match_generation_and_end_with_end_of_turn(tokenizer):
    from wprlhf.generation import encode_prompts

    prompt = "[WP] A dragon opens a bakery"
    ((short, long_),) = [encode_examples(tokenizer, [prompt, prompt], ["The oven was warm.", STORY * 40], 96)]
    queries, query_mask = encode_prompts(tokenizer, [prompt])
    # The prompt is tokenized exactly as sampling sees it, so the fine-tuned model continues the same context.
    assert short.prompt_ids == queries[0][query_mask[0]].tolist()
    assert tokenizer.decode(short.prompt_ids).endswith("<|im_start|>assistant\n")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert short.response_ids[-1] == end_of_turn and tokenizer.decode(short.response_ids[:-1]) == "The oven was warm."
    # A story cut at max_length keeps its start and gets no end-of-turn token: it did not end there.
    assert len(long_) == 96 and end_of_turn not in long_.response_ids
    assert tokenizer.decode(long_.response_ids).startswith("The cat sat on the mat.")


def test_plain_text_format_without_chat_template(tokenizer):
    (example,) = encode_examples(tokenizer, ["A prompt"], ["A story."], 32, chat_template=False)
    assert tokenizer.decode(example.prompt_ids) == "A prompt\n\n"
    assert example.response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.response_ids[:-1]) == "A story."


# ------------------------------------------------------------------------------------------ the loss


def test_loss_equals_manual_masked_cross_entropy(tiny):
    examples = [Example([1, 20, 30], [40, 50, 2]), Example([1, 21], [41, 2])]
    batch = batch_of(examples)
    loss, nll_sum, n_tokens = sft_loss(tiny, batch)
    # Reference: labels = -100 on prompts and padding, shifted by one, plain cross-entropy.
    labels = batch["input_ids"].masked_fill(~batch["loss_mask"], -100)
    logits = tiny(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert n_tokens == 5
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert nll_sum == pytest.approx(5 * expected.item(), rel=1e-5)
    # Micro-batches divided by the whole batch's token count add up to the whole batch's loss.
    parts = [sft_loss(tiny, batch_of([e]), n_tokens)[0] for e in examples]
    assert sum(parts).item() == pytest.approx(loss.item(), abs=1e-5)


def test_padded_batch_gives_each_example_its_own_logprobs(tiny):
    examples = [Example([1, 20, 30, 31], [40, 50, 2]), Example([1, 21], [41])]
    together = token_logprobs(tiny, batch_of(examples))
    for i, example in enumerate(examples):
        alone = token_logprobs(tiny, batch_of([example]))
        torch.testing.assert_close(together[i, : len(example)], alone[0], atol=1e-5, rtol=1e-5)


def test_packing_keeps_the_same_loss_tokens_and_loss(tiny, tokenizer):
    prompts = [f"[WP] prompt {i}" for i in range(5)]
    stories = ["Short.", STORY, STORY * 2, "A door opened.", STORY[:20]]
    examples = encode_examples(tokenizer, prompts, stories, 96)
    rows = pack(examples, 96)
    assert len(rows) < len(examples) and all(sum(len(e) for e in row) <= 96 for row in rows)
    unpacked, packed = batch_of(examples), collate(rows, tokenizer.pad_token_id)

    def loss_tokens(batch):  # the response tokens of each example, as a sorted list of tuples
        ids, mask, seg = batch["input_ids"], batch["loss_mask"], batch["segment_ids"]
        return sorted(tuple(ids[b][mask[b] & (seg[b] == k)].tolist()) for b in range(len(ids))
                      for k in range(1, int(seg[b].max()) + 1))  # fmt: skip

    assert loss_tokens(packed) == loss_tokens(unpacked) == sorted(tuple(e.response_ids) for e in examples)
    # Each packed example attends only to itself, at its own positions: the same loss as unpacked.
    _, nll_unpacked, n_unpacked = sft_loss(tiny, unpacked)
    _, nll_packed, n_packed = sft_loss(tiny, packed)
    assert n_packed == n_unpacked and nll_packed == pytest.approx(nll_unpacked, rel=1e-5)


def test_linear_schedule_warms_up_then_decays():
    assert [linear_schedule(s, 6, 2) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert linear_schedule(0, 3, 0) == 1.0


# ------------------------------------------------------------------------------------------ training


@pytest.mark.learning
def test_training_lowers_held_out_loss(stories_csv, tmp_path, tokenizer):
    """Held-out prompts' stories share the training stories' text, so learning it must lower their loss: by more
    than 1 nat per token (a random tiny model starts near ln 49152 = 10.8; the held-out loss is a deterministic
    function of the weights, so only the training trajectory moves it)."""
    from wprlhf.models import load_policy

    config = SFTConfig(policy="tiny", data=str(stories_csv), max_length=96, batch_size=4, gradient_accumulation_steps=2,
                       lr=3e-3, epochs=4, eval_every=100, val_fraction=0.25, n_samples=0, warmup=0.0,
                       seed=seed(0))  # fmt: skip
    policy, _ = load_policy("tiny", seed=seed(0))  # as the `tiny` fixture, at the test's seed
    result = train(config, tmp_path / "run", policy=policy.eval(), tokenizer=tokenizer, progress=False)
    assert result["n_train_examples"] == 9 and result["n_val_examples"] == 3  # rank-0 stories only
    learned("held-out loss drop (nats/token)", result["val_loss_before"] - result["val_loss_after"], 1.0)


@pytest.mark.learning
def test_cli_writes_every_file(stories_csv, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sft", "--policy", "tiny", "--data", stories_csv, "--out", out, "--max-examples", 6, "--batch-size", 2,
            "--gradient-accumulation-steps", 2, "--max-length", 64, "--eval-every", 2, "--epochs", 1,
            "--val-fraction", 0.25, "--n-samples", 1, "--sample-tokens", 4, "--packing"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "held-out loss" in err and "->" in err

    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == list(SFT_METRIC_NAMES)
    rows = read_metrics(out / "metrics.csv")
    config = json.loads((out / "config.json").read_text())
    steps = config["steps"]
    assert [r["step"] for r in rows] == list(range(steps + 1))
    assert "loss" not in rows[0] and rows[0]["val_loss"] > 0  # step 0: the untuned model's held-out loss only
    assert all(r["loss"] > 0 and r["tokens"] > 0 and "lr" in r for r in rows[1:])
    assert [r["step"] for r in rows if "val_loss" in r] == [0, *range(2, steps + 1, 2), *([steps] if steps % 2 else [])]

    result = json.loads((out / "eval.json").read_text())
    assert result["val_loss_before"] == pytest.approx(rows[0]["val_loss"])
    assert result["val_loss_after"] == pytest.approx(rows[-1]["val_loss"])
    assert result["n_val_examples"] == 3 and result["n_train_examples"] == 6

    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {(s["stage"], s["decoding"]) for s in samples} == {(a, b) for a in ("before", "after")
                                                              for b in ("greedy", "sampled")}  # fmt: skip
    assert all(s["prompt"].startswith("[WP] Prompt number") and s["reference"].startswith("The cat") for s in samples)
    assert all(isinstance(s["finished"], bool) for s in samples)  # False: cut at --sample-tokens
    assert list((out / "tb").glob("events.out.tfevents.*"))

    # policy/ is what `wprlhf ppo --policy OUT/policy` and plain from_pretrained load.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wprlhf.models import load_policy

    _, tok = load_policy(str(out / "policy"))
    assert AutoTokenizer.from_pretrained(out / "policy").chat_template == tok.chat_template
    assert AutoModelForCausalLM.from_pretrained(out / "policy").config.num_hidden_layers == 2
    assert json.loads((out / "policy" / "sft_config.json").read_text())["max_examples"] == 6

    # A second run into the same directory does not overwrite it silently.
    assert main([str(a) for a in argv]) == 2
    assert "already holds a run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "sft needs --data"),
        (["--data", "missing.csv"], "missing.csv does not exist"),
        (["--data", "EMPTY"], "holds no stories"),
        (["--data", "NORANK"], "has no response_rank column"),
        (
            ["--data", "STORIES", "--batch-size", "6", "--gradient-accumulation-steps", "4"],
            "batch_size 6 is not divisible by gradient_accumulation_steps 4",
        ),
        (["--data", "STORIES", "--batch-size", "0"], "batch_size must be >= 1"),
        (["--data", "STORIES", "--val-fraction", "0"], "val_fraction must lie in (0, 1)"),
        (["--data", "STORIES", "--max-length", "8"], "max_length 8 is too short"),
    ],
)
def test_bad_inputs_fail_with_a_clear_message(tmp_path, stories_csv, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt_id,prompt,response_id,response\n")
    files = {"EMPTY": empty, "STORIES": stories_csv,
             "NORANK": write_responses(tmp_path / "norank.csv", columns=("prompt_id", "prompt", "response_id",
                                                                          "response"))}  # fmt: skip
    args = [str(files.get(a, a)) for a in args]
    code = main(["sft", "--policy", "tiny", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    if not args:
        assert "../shared/data/writing_prompts" in err


def test_config_rejects_unknown_keys(tmp_path):
    from wprlhf.methods.sft import load_config

    path = tmp_path / "c.yaml"
    path.write_text("batch_sise: 4\n")
    with pytest.raises(UserError, match=r"unknown SFTConfig keys \['batch_sise'\]"):
        load_config(path, {})


def test_a_task_run_takes_its_examples_from_the_caller(tmp_path):
    """SFT imports no task (docs/architecture.md): `wprlhf sft --task` builds the examples and passes them in."""
    with pytest.raises(UserError, match=r"pass its examples, .*stories=tasks.sft_stories\('sentiment-control', data\)"):
        train(SFTConfig(policy="tiny", task="sentiment-control", data="reviews.csv"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
