"""Small helpers shared by tests (import as `from tests.helpers import close, mask_of, t`)."""

import torch


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def mask_of(rows):
    return torch.tensor(rows, dtype=torch.bool)


def close(actual, expected, atol=1e-6):
    """Assert a tensor (or number) equals nested literals, compared in float64 with a small absolute tolerance."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = torch.as_tensor(actual).to(torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def save_tiny_classifier(path):
    """An untrained tiny two-label BERT with the MiniLM tokenizer, saved as `wprlhf classifier train` saves one:
    its log-odds are arbitrary but fixed, which is all the wiring tests need. Returns path."""
    import json

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from wprlhf.models import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a head large enough that log-odds differ clearly between texts
        model.classifier.weight.mul_(50)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "train_config.json").write_text(json.dumps({"max_length": 64}))
    return path


def assert_same_runs(whole, split, steps: int) -> None:
    """A run in one go (directory `whole`) and one killed and resumed (`split`): the same metrics row for row (but
    times) and the same final policy weights."""
    import pytest
    from safetensors.torch import load_file

    from wprlhf.metrics import read_metrics

    rows_whole, rows_split = read_metrics(whole / "metrics.csv"), read_metrics(split / "metrics.csv")
    assert [r["step"] for r in rows_split] == list(range(1, steps + 1))
    skip = {"time_generate", "time_score", "time_train", "episodes_per_s", "elapsed_s"}
    for a, b in zip(rows_whole, rows_split):
        for key in a.keys() - skip:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    wa, wb = (load_file(run / "policy" / "model.safetensors") for run in (whole, split))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


def toy_comparisons(n: int):
    """n pairs on prompts about cats or ships, the better one alternating between A and B."""
    from wprlhf.data import Comparison

    return [Comparison(prompt=f"prompt {i} about {'cats' if i % 2 else 'ships'}",
                       responses=[f"a tale of {i} words " * (1 + i % 3), f"short {i}"], best=i % 2)
            for i in range(n)]  # fmt: skip


# --- learned thresholds: one seed offset for every test that trains, and one line per learned bar ------------------
# A trajectory of sampled optimizer steps is a chaotic function of every rounding, so another CPU's kernels act like
# another seed. WPRLHF_TEST_SEED (default 0) is added to every seed a learning test sets: sweeping it shows whether a
# test's bar holds under a change of seed, which is what it must survive on a CPU nobody here has tried.
def _test_seed_offset() -> int:
    import os

    raw = os.environ.get("WPRLHF_TEST_SEED", "0")
    if not raw.isdigit():
        raise ValueError(f"WPRLHF_TEST_SEED must be a non-negative integer, got {raw!r}")
    return int(raw)


SEED_OFFSET = _test_seed_offset()


def seed(n: int = 0) -> int:
    """The seed a test asked for, plus WPRLHF_TEST_SEED."""
    return n + SEED_OFFSET


LEARNED: list[dict] = []  # every learned bar checked in this process, for conftest's summary table


def learned(what: str, measured: float, bar: float, *, upper: bool = False) -> None:
    """Assert a learned quantity clears its bar, and record it: `measured > bar` (or `measured < bar` with upper=True).

    The margin is measured / bar (bar / measured for an upper bound): a test must clear its bar by >= 1.5 under a
    change of seed (docs/tests.md). Express accuracies near 1 as an error rate with an upper bound, so the margin
    can exceed 1.5 at all. The line is printed at the end of every pytest run (conftest), pass or fail, and appended
    as JSON to $WPRLHF_MARGIN_LOG when that is set (the seed sweep reads it).
    """
    import json
    import math
    import os

    measured, bar = float(measured), float(bar)
    if upper:
        margin = math.inf if measured <= 0 < bar else bar / measured
        ok = measured < bar
    else:
        margin = math.inf if bar <= 0 < measured else measured / bar
        ok = measured > bar
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    row = {"test": test, "what": what, "measured": measured, "bar": bar, "upper": upper, "margin": margin,
           "seed_offset": SEED_OFFSET}  # fmt: skip
    LEARNED.append(row)
    if os.environ.get("WPRLHF_MARGIN_LOG"):  # strict JSON: an infinite margin (a bar of 0 cleared) is written null
        with open(os.environ["WPRLHF_MARGIN_LOG"], "a") as f:
            f.write(json.dumps({**row, "margin": margin if math.isfinite(margin) else None}, allow_nan=False) + "\n")
    sign = "<" if upper else ">"
    assert ok, f"{what}: measured {measured:.4g}, bar {sign} {bar:.4g} (margin {margin:.2f})"


def fixed_rollout_gap_rise(trainer, prompts: list[str], reward_fn, updates: int) -> float:
    """How far `updates` training steps on one fixed rollout move the policy towards its better responses (nats).

    The trainer samples one response per prompt (a prompt repeated k times gives RLOO's and GRPO's groups), the
    reward scores them, and each response's sign is its score against its group's mean (the batch's when k = 1).
    The gap is the mean summed log-prob of the above-mean responses minus that of the below-mean ones; returned is
    its rise over the updates. A property of the update on given samples, not of a sampled trajectory: another
    CPU's kernels change which tokens are drawn (as another seed would), not whether the update follows the scores.
    """
    from wprlhf.core import masked_sum
    from wprlhf.forwards import policy_forward

    samples = trainer.generate(prompts)
    scores = torch.tensor([float(s) for s in reward_fn(samples.prompts, samples.texts)])
    gen, k = samples.generation, trainer.config.samples_per_prompt
    q, qm, r, rm = samples.queries, samples.query_mask, gen.responses, gen.response_mask
    groups = scores.view(-1, k) if k > 1 else scores.view(1, -1)
    sign = (groups - groups.mean(1, keepdim=True)).reshape(-1)

    def gap() -> float:
        with torch.no_grad():
            logprobs = policy_forward(trainer.policy, q, qm, r, rm, trainer.config.temperature)[0]
        summed = masked_sum(logprobs, rm, dim=1)
        return float(summed[sign > 0].mean() - summed[sign < 0].mean())

    before = gap()
    for _ in range(updates):
        trainer.step_batch(q, qm, r, rm, scores)
    return gap() - before


TIMES = ("time", "elapsed", "per_s", "seconds", "timings", "minutes")


def json_numbers(value, prefix: str = "") -> dict[str, float]:
    """Every finite number in a JSON value that does not measure time, keyed by where it stands ('sides/ppo/kl/mean')."""
    import math

    out: dict[str, float] = {}
    if any(word in prefix.rsplit("/", 1)[-1] for word in TIMES):
        return out
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(json_numbers(item, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.update(json_numbers(item, f"{prefix}/{i}"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        out[prefix] = float(value)
    return out


def run_numbers(run) -> dict[str, float]:
    """Every number a stories run wrote that does not measure time: its eval/report.json and each training phase's
    metrics.csv ('eval/sides/ppo/kl/mean', 'ppo/metrics/3/loss')."""
    import json
    from pathlib import Path

    from wprlhf.metrics import read_metrics

    run = Path(run)
    out = json_numbers(json.loads((run / "eval" / "report.json").read_text()), "eval")
    for phase in ("ppo", "dpo"):
        if (run / phase / "metrics.csv").is_file():
            out.update(json_numbers(read_metrics(run / phase / "metrics.csv"), f"{phase}/metrics"))
    return out


def same_numbers(name: str, numbers: dict[str, float], rel: float = 1e-6) -> None:
    """The numbers of a pipeline run on tiny models are those it wrote before a refactor (tests/golden/NAME.json,
    one entry per CPU kernel set, thread count and test seed: kernels round differently, so sampling differs).

    WPRLHF_WRITE_GOLDEN=1 records this machine's entry (do it at the commit before a change, then run the change);
    without an entry for this machine it warns and checks nothing, and says so."""
    import json
    import os
    import warnings
    from pathlib import Path

    import pytest
    import torch

    key = f"{torch.backends.cpu.get_cpu_capability()}|threads={torch.get_num_threads()}|seed={SEED_OFFSET}"
    path = Path(__file__).parent / "golden" / f"{name}.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if os.environ.get("WPRLHF_WRITE_GOLDEN") == "1":
        stored[key] = numbers
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(stored, indent=0, sort_keys=True) + "\n")
        return
    if key not in stored:
        warnings.warn(f"{path.name} has no numbers for {key}; the same-numbers check did not run here (record them "
                      "with WPRLHF_WRITE_GOLDEN=1 at the commit before a change)", stacklevel=2)
        return
    expected = stored[key]
    assert sorted(numbers) == sorted(expected), sorted(set(numbers) ^ set(expected))[:20]
    wrong = {k: (numbers[k], expected[k]) for k in expected if numbers[k] != pytest.approx(expected[k], rel=rel, abs=1e-6)}
    assert not wrong, f"{len(wrong)} of {len(expected)} numbers changed, e.g. {dict(list(wrong.items())[:8])}"
