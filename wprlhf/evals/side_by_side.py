"""Policies side by side on held-out prompts, by judges none of them trained on: `wprlhf eval` and the
evaluation phase of `wprlhf stories`; blind pairs for people on the labeling page, and their results.

A *side* is one response per prompt from one policy (sampled here, or read from a `wprlhf sample` file: best-of-n
writes one). Every side is measured the same way, each number with a 95 % CI that resamples prompts
(`core.bootstrap_ci`):

- `judge`: a judge reward model's mean score and its win rate against the baseline side (ties count 1/2, the one
  tie rule `core.choice_credit`);
- `story`: the share of responses that are stories (`judges.story_verdict`, a stated rule);
- `relevance`: MiniLM cosine of prompt and response (beside the human stories' own, when given: an assistant that
  restates the prompt scores high on relevance alone);
- `distinct_1`, `distinct_2` (over chunks of 10 responses: `chunked_ci`), `repetition` (a 4-gram said twice),
  `meta` (a Reddit meta line: links, "Edit:", thanks for gold; karma rewards those, so a policy that learns them
  is gaming a karma-trained reward), `words`;
- `kl`: the KL of the side's policy to a reference, in nats per response, where known.

Blind mode queues, per prompt, one response of each of two sides in random order; which side wrote which stays in
the database (the comparison's metadata), which the page never sends. `blind_results` turns the labels into each
side's win rate with a CI and the agreement between labelers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core import bootstrap_ci
from ..data import prompt_key
from ..errors import UserError, check_numbers
from ..files import iter_jsonl, write_json_atomic, write_text_atomic
from ..generation import check_bare_prompts
from ..rewards.judges import story_verdict
from ..signatures import RewardFn
from ..text import has_meta
from . import measures
from .measures import cut_words, distinct_n, lc_win_rate, repetition_rate, scored_win_rate
from .sides import Side, sample_side, side_kl

# ==========================================================================================================
# numbers of one side


def prompt_ci(values: Sequence[float], prompts: Sequence[str]) -> dict:
    """`measures.mean_ci` with prompts grouped by `data.prompt_key`, so reposts of one prompt resample together."""
    return measures.mean_ci([float(v) for v in values], [prompt_key(p) for p in prompts])


def chunked_ci(texts: Sequence[str], stat: Callable[[Sequence[str]], float], chunk: int = 10) -> dict:
    """A corpus-level statistic (distinct-n) over consecutive chunks of `chunk` responses (one per prompt, in
    prompt order): its mean over chunks with a 95 % CI resampling chunks.

    Distinct-n falls as a corpus grows, and resampling prompts with replacement repeats texts, which lowers it
    further, so a plain bootstrap's interval would not even hold the estimate. Chunks of a fixed size give every
    side the same yardstick and independent pieces to resample."""
    pieces = [texts[i : i + chunk] for i in range(0, len(texts), chunk)]
    if len(pieces) > 1 and len(pieces[-1]) < chunk:
        pieces = pieces[:-1]  # a short last chunk would read as more diverse
    values = [stat(p) for p in pieces]
    return measures.mean_ci(values, list(range(len(values))))


def describe(prompts: list[str], responses: list[str], judge_scores: Sequence[float] | None = None,
             relevance: Sequence[float] | None = None, kl: Sequence[float] | None = None,
             equal_words: int = 0) -> dict:  # fmt: skip
    """Every per-side number with its CI over prompts: story, relevance, distinct_1/2, repetition, meta, words,
    judge (mean score), kl; with equal_words, distinct_2_eq: distinct-2 of every response cut to its first
    equal_words words (`measures.cut_words`), which a side cannot raise by stopping sooner. Plus, per response,
    'verdicts' (the story rule's) and 'judge_scores' (with a judge): those go beside each response in a pairs file,
    not into a report (`without_verdicts`)."""
    verdicts = [story_verdict(p, r) for p, r in zip(prompts, responses)]
    out = {"n": len(responses), "story": prompt_ci([v == "story" for v in verdicts], prompts),
           "distinct_1": chunked_ci(responses, lambda t: distinct_n(t, 1)),
           "distinct_2": chunked_ci(responses, lambda t: distinct_n(t, 2)),
           "repetition": prompt_ci([repetition_rate([r]) for r in responses], prompts),
           "meta": prompt_ci([has_meta(r) for r in responses], prompts),
           "words": prompt_ci([len(r.split()) for r in responses], prompts), "verdicts": verdicts}  # fmt: skip
    if equal_words:
        out["distinct_2_eq"] = chunked_ci(cut_words(responses, equal_words), lambda t: distinct_n(t, 2))
    for name, values in (("judge", judge_scores), ("relevance", relevance), ("kl", kl)):
        if values is not None:
            out[name] = prompt_ci([float(v) for v in values], prompts)
    if judge_scores is not None:
        out["judge_scores"] = [float(v) for v in judge_scores]
    return out


# ==========================================================================================================
# sides side by side


def judge_sides(prompts: list[str], sides: dict[str, list[str]], judge: RewardFn | None, baseline: str,
                relevance: RewardFn | None = None, kls: dict[str, Sequence[float]] | None = None,
                human: list[str] | None = None, pairs: Sequence[tuple[str, str]] = (),
                equal_words: int = 0) -> dict:  # fmt: skip
    """The report of several sides on the same prompts: {'sides': {name: describe(...)}, 'win_rates': {'A vs B':
    win_rate}, 'human': describe(human) and 'judge_prefers_human': the judge's win rate of the human stories over
    the baseline side's responses (is the judge fit to judge this kind of text?)}.

    sides: name -> one response per prompt, in prompt order. Win rates are every side against `baseline` and
    each (A, B) of `pairs`, each with its length-controlled rate. kls: name -> per-response KL (nats) where known.
    equal_words: see `describe`.
    """
    if baseline not in sides:
        raise UserError(f"baseline side {baseline!r} is not among the sides {sorted(sides)}")
    for name, responses in sides.items():
        if len(responses) != len(prompts):
            raise UserError(f"side {name!r} has {len(responses)} responses for {len(prompts)} prompts; each side needs "
                            "one response per prompt, in the prompts' order")  # fmt: skip
    kls = kls or {}
    scored = dict(sides, **({"human": human} if human is not None else {}))
    judge_scores = {name: [float(s) for s in judge(prompts, texts)] for name, texts in scored.items()} if judge else {}
    for name, values in judge_scores.items():
        if not np.isfinite(values).all():
            raise UserError(f"the judge gave non-finite scores to side {name!r}; check the judge model")
    rel = {name: relevance(prompts, texts) for name, texts in scored.items()} if relevance else {}
    report = {"prompts": len(prompts), "baseline": baseline, "sides": {}, "win_rates": {}}
    for name, texts in scored.items():
        described = describe(prompts, texts, judge_scores.get(name), rel.get(name), kls.get(name), equal_words)
        if name == "human":
            report["human"] = described
        else:
            report["sides"][name] = described
    if judge:
        for a, b in [(name, baseline) for name in sides if name != baseline] + list(pairs):
            report["win_rates"][f"{a} vs {b}"] = _win(prompts, judge_scores[a], judge_scores[b], scored[a], scored[b])
        if human is not None:
            report["judge_prefers_human"] = _win(prompts, judge_scores["human"], judge_scores[baseline],
                                                 scored["human"], scored[baseline])  # fmt: skip
    return report


def _win(prompts: list[str], new: Sequence[float], old: Sequence[float], new_texts: Sequence[str],
         old_texts: Sequence[str]) -> dict:  # fmt: skip
    """The win rate of `new` over `old` scores (the judge is called once per side), reposts resampled together,
    beside its length-controlled rate (`measures.lc_win_rate`, lengths in words)."""
    groups = [prompt_key(p) for p in prompts]
    raw = scored_win_rate(new, old, groups)
    credits = raw.pop("credits")
    words = lambda texts: [len(t.split()) for t in texts]  # noqa: E731
    return {**raw, **lc_win_rate(credits, words(new_texts), words(old_texts), groups)}


ROWS = (("judge", "judge score", "{:+.2f}"), ("story", "stories", "{:.0%}"), ("relevance", "relevance", "{:.3f}"),
        ("distinct_2", "distinct-2", "{:.3f}"), ("distinct_2_eq", "distinct-2, equal length", "{:.3f}"),
        ("spread", "spread of k answers", "{:.3f}"), ("distinct_1", "distinct-1", "{:.3f}"),
        ("repetition", "repetition", "{:.0%}"), ("meta", "meta lines", "{:.0%}"), ("kl", "KL (nats)", "{:.1f}"),
        ("kl_to_sft", "KL to SFT (nats)", "{:.1f}"), ("reward", "training reward", "{:+.2f}"),
        ("words", "words", "{:.0f}"), ("truncated_share", "cut at the cap", "{:.0%}"),
        ("kl_per_token", "KL per token", "{:.3f}"))  # fmt: skip


def _cell(stat: dict | None, fmt: str) -> str:
    if not stat:
        return "-"
    return f"{fmt.format(stat['mean'])} [{fmt.format(stat['lo'])}, {fmt.format(stat['hi'])}]"


def _rate(win: dict | None, key: str) -> str:
    if not win or key not in win:
        return "-"
    return f"{win[key]:.1%} [{win[key + '_lo']:.1%}, {win[key + '_hi']:.1%}]"


def win_text(win: dict) -> str:
    """A win rate for people: '62.0% [53.0%, 71.0%], length-controlled 60.1% [51.2%, 69.0%]'."""
    lc = f", length-controlled {_rate(win, 'lc_win_rate')}" if "lc_win_rate" in win else ""
    return _rate(win, "win_rate") + lc


def table_markdown(report: dict, extra: dict[str, dict[str, str]] | None = None) -> str:
    """The report as a Markdown table: a row per side, a column per judge, 95 % CIs in brackets. extra: side ->
    {column: text}, columns appended after the judges' (e.g. training time)."""
    names = list(report["sides"]) + (["human"] if report.get("human") else [])
    extra = extra or {}
    added = list(dict.fromkeys(k for cells in extra.values() for k in cells))
    rows = [row for row in ROWS if any(row[0] in side for side in list(report["sides"].values()) + [report.get("human") or {}])]
    columns = [f"judge win rate vs {report['baseline']}", "length-controlled"] + [label for _, label, _ in rows] + added
    lines = ["| side | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in names:
        stats = report["sides"].get(name) or report.get("human")
        win = report["win_rates"].get(f"{name} vs {report['baseline']}")
        cells = [_rate(win, "win_rate"), _rate(win, "lc_win_rate")]
        cells += [_cell(stats.get(key), fmt) for key, _, fmt in rows]
        cells += [extra.get(name, {}).get(k, "-") for k in added]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ==========================================================================================================
# blind pairs for people


def queue_blind(db: str | Path, prompts: list[str], a: tuple[str, list[str]], b: tuple[str, list[str]]) -> int:
    """Queue one comparison per prompt of side a's and side b's responses, in random order, on the labeling page's
    database. The side names are stored as the comparison's metadata, server-side; the page receives only the
    prompt and the two texts. The order comes from the operating system's randomness (`SystemRandom`), so no seed
    in the source predicts it. Returns the number queued (a prompt whose two responses are equal is left out)."""
    from ..labeling.store import LabelingError, Store

    if a[0] == b[0]:
        raise UserError(f"both sides are named {a[0]!r}; blind pairs need two different policies")
    rng = random.SystemRandom()
    rows = []
    for prompt, x, y in zip(prompts, a[1], b[1]):
        if x == y:
            continue
        order = [(a[0], x), (b[0], y)]
        rng.shuffle(order)
        rows.append((prompt, [t for _, t in order], {"blind_sides": [n for n, _ in order]}))
    try:
        added, _ = Store(db).add(rows)
    except LabelingError as err:
        raise UserError(str(err)) from err
    return added


def blind_results(db: str | Path) -> dict:
    """People's labels of the blind pairs in a database, per pair of policies: each side's win rate over the other
    (a pick counts 1, a tie 1/2, a skip nothing) with a 95 % CI resampling prompts, its length-controlled rate
    (`measures.lc_win_rate`) and mean words, the labels, and the agreement
    between labelers on those comparisons (over every two labels of one comparison, the share that are the same
    answer; None when no comparison has two)."""

    from ..labeling.agreement import fleiss_kappa
    from ..labeling.store import Store

    if not Path(db).is_file():
        raise UserError(f"--blind-results {db}: no such database; queue pairs first with wprlhf eval ... --blind-db {db}")
    store = Store(db)
    blind = {c["id"]: (c["prompt"], c["metadata"]["blind_sides"], [len(r.split()) for r in c["responses"]])
             for c in store.comparisons()
             if isinstance(c["metadata"].get("blind_sides"), list) and len(c["metadata"]["blind_sides"]) == 2}
    by_pair: dict[tuple[str, str], dict] = {}
    answers: dict[int, list] = {}
    for label in store.labels():
        if label["comparison_id"] not in blind or label["kind"] == "skip":
            continue
        prompt, sides, words = blind[label["comparison_id"]]
        pair = by_pair.setdefault(tuple(sorted(sides)), {"credit": {}, "prompts": [], "words": {}})
        pair["prompts"].append(prompt_key(prompt))
        for i, name in enumerate(sides):
            pair["credit"].setdefault(name, []).append(0.5 if label["kind"] == "tie" else float(label["best"] == i))
            pair["words"].setdefault(name, []).append(words[i])
        answers.setdefault(label["comparison_id"], []).append(
            "tie" if label["kind"] == "tie" else sides[label["best"]])  # the answer as the side picked
    if not by_pair:
        raise UserError(f"{db} holds no labels of blind pairs yet; serve it with `wprlhf label serve --db {db}`")
    overall = fleiss_kappa(list(answers.values()))  # raw: equal answers over every two labels of one comparison
    out = {"pairs": {}, "labels": sum(len(g) for g in answers.values()), "comparisons": len(blind),
           "agreement": overall["raw"], "agreement_pairs": overall["pairs"]}  # fmt: skip
    for (a, b), pair in by_pair.items():
        entry = {"labels": len(pair["prompts"])}
        for name, other in ((a, b), (b, a)):
            lo, hi = bootstrap_ci(pair["credit"][name], pair["prompts"])
            entry[name] = {"win_rate": float(np.mean(pair["credit"][name])), "win_rate_lo": lo, "win_rate_hi": hi,
                           **lc_win_rate(pair["credit"][name], pair["words"][name], pair["words"][other],
                                         pair["prompts"]),
                           "words": float(np.mean(pair["words"][name]))}  # fmt: skip
        out["pairs"][f"{a} vs {b}"] = entry
    return out


# ==========================================================================================================
# `wprlhf eval`


@dataclass
class EvalConfig:
    """`wprlhf eval`: one policy against another on held-out prompts, by every judge."""

    policy: str = ""
    """The policy to judge: a model ('smollm2', a directory, a hub id) sampled here, or a `wprlhf sample` JSONL file
    (its first response per prompt; `wprlhf sample --best-of N` writes the chosen one first)."""
    against: str = "smollm2"
    """The policy to compare with (the baseline of every win rate), in the same forms."""
    prompts: str = ""
    """Held-out prompts (one per line, or CSV/JSONL with a prompt column). Use prompts no model trained on (a
    `wprlhf stories` run's split/eval_prompts.txt). Empty: the prompts of a side given as a JSONL file."""
    judge: str = ""
    """The judge reward: a SPEC (rm:DIR of a judge reward model, or any reward SPEC). Empty: no judge win rate."""
    reference: str = ""
    """KL of a sampled --policy's responses is measured to this model ('' = --against when it is a model)."""
    response_length: int = 64
    """New tokens of each sampled response."""
    min_response_length: int | None = None
    """End-of-turn is forbidden before this many tokens (None = response_length: fixed-length responses, so that
    length cannot decide a comparison); 0 lets responses stop when they like."""
    temperature: float = 0.7
    """Sampling temperature; the KL column's log-probs use the same one."""
    greedy: bool = False
    """The most likely token at every step instead of sampling (the KL column is then the log-ratio of those
    responses at --temperature, not an average over samples)."""
    max_prompts: int = 0
    """Use only the first N prompts (0 = all)."""
    instruction: str = ""
    """Put, with a blank line, before each prompt in what the sampled policies read (as with `wprlhf stories
    --instruction`, whose policies expect it); judges read the bare prompt. Response files are keyed by the bare
    prompt."""
    against_instruction: str | None = None
    """What --against reads before each prompt instead (None = the same as --instruction; '' = the bare prompt).
    It compares two whole systems, e.g. an instructed policy with SmolLM2 as shipped asked the bare prompt: KL is
    then log pi(y | instruction, prompt) - log ref(y | against-instruction, prompt), the distance between what the
    two systems write for a prompt, not between two models under one context."""
    seed: int = 0
    """Seeds the sampling (and the tiny init)."""
    batch_size: int = 16
    """Responses sampled or scored at once."""
    device: str = "auto"
    """'auto' (a GPU where there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""

    def __post_init__(self):
        check_numbers(self)
        if self.greedy and self.temperature == 0:
            self.temperature = 1.0  # argmax needs no temperature; the KL column's log-probs are the model's own
        for name in ("response_length", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}; set --{name.replace('_', '-')}")
        if not self.temperature > 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}; set --temperature (0.7 is usual)")
        if self.max_prompts < 0:
            raise UserError(f"max_prompts must be >= 0 (0 = all), got {self.max_prompts}")
        if self.min_response_length is None:
            self.min_response_length = self.response_length
        if not 0 <= self.min_response_length <= self.response_length:
            raise UserError(f"min_response_length {self.min_response_length} must lie in [0, response_length "
                            f"{self.response_length}]")  # fmt: skip


def read_side(spec: str) -> dict[str, str]:
    """prompt -> its first response, from a `wprlhf sample` JSONL file ({"prompt", "responses": [...]}, or a
    "response" string); the first line of a prompt wins. UserError naming the file and line for anything else."""
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{spec}: no such file; give a `wprlhf sample` JSONL file or a model")
    rows: dict[str, str] = {}
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f"{spec} line {where}: expected {{\"prompt\": \"...\", \"responses\": [\"...\"]}} with a prompt")
        responses = row["responses"] if "responses" in row else [row.get("response")]
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            raise UserError(f"{spec} line {where}: 'responses' must be a non-empty list of strings (or 'response' a "
                            "string)")
        rows.setdefault(row["prompt"], responses[0])
    if not rows:
        raise UserError(f"{spec} holds no responses; write one {{\"prompt\", \"responses\"}} line per prompt")
    return rows


def _sample_side(name: str, spec: str, prompts: list[str], config: EvalConfig, instruction: str):
    """(side, model, tokenizer, gen): a model loaded from `spec` and sampled on the prompts, each read after
    `instruction` (`sides.sample_side`)."""
    from ..distributed import resolve_device
    from ..generation import generation_config
    from ..models import load_policy

    model, tokenizer = load_policy(spec, seed=config.seed)
    check_bare_prompts(tokenizer, prompts)  # every prompt, before any sampling
    model.to(resolve_device(config.device))
    gen = generation_config(None, response_length=config.response_length,
                            min_response_length=config.min_response_length, temperature=config.temperature,
                            instruction=instruction)  # fmt: skip
    gen.greedy = config.greedy
    return sample_side(name, model, tokenizer, prompts, gen, config.seed, config.batch_size), model, tokenizer, gen


def run_eval(config: EvalConfig, out: str | Path, blind_db: str | None = None) -> dict:
    """`wprlhf eval`: sample (or read) both sides on the prompts, judge them, write out (JSON) beside a Markdown
    table (out with .md) and the pairs (out's stem + -pairs.jsonl), and queue blind pairs in blind_db when given."""
    from ..data import load_prompts
    from ..models import load_policy
    from ..rewards.judges import Relevance
    from ..rewards.spec import load_reward

    if not config.policy:
        raise UserError("wprlhf eval needs --policy (a model or a responses JSONL file)")
    files = {spec: read_side(spec) for spec in (config.policy, config.against) if spec.endswith(".jsonl")}
    if config.prompts:
        prompts = load_prompts(config.prompts)
    elif files:
        prompts = list(next(iter(files.values())))
    else:
        raise UserError("--prompts is needed when neither side is a JSONL file of responses")
    if config.max_prompts:
        prompts = prompts[: config.max_prompts]
    if not prompts:
        raise UserError("no prompts to evaluate on; give --prompts a file with at least one prompt")
    judge = load_reward(config.judge, what="judge") if config.judge else None  # a bad SPEC fails before sampling
    # What each side's policy reads (the KL reference reads --against's); judges read the bare prompts.
    heads = {"policy": config.instruction,
             "against": config.instruction if config.against_instruction is None else config.against_instruction}
    specs = {"policy": config.policy, "against": config.against}
    sides, models = {}, {}
    for name, spec in specs.items():
        if spec in files:
            missing = [p for p in prompts if p not in files[spec]]
            if missing:
                raise UserError(f"{spec} has no response to {len(missing)} of the {len(prompts)} prompts, e.g. "
                                f"{missing[0][:80]!r}; sample it on the same --prompts")  # fmt: skip
            sides[name] = Side(name, [files[spec][p] for p in prompts])
        else:
            sides[name], *models[name] = _sample_side(name, spec, prompts, config, heads[name])
    new, old = sides["policy"].texts, sides["against"].texts
    kls = {}
    reference = config.reference or (config.against if "against" in models else "")
    if reference and "policy" in models:
        model, tokenizer, gen = models["policy"]
        if "against" in models and reference == config.against:
            ref_model = models["against"][0]
        else:
            ref_model = load_policy(reference)[0]
        ref_model.to(next(model.parameters()).device)
        kls["policy"] = side_kl(sides["policy"], model, ref_model, tokenizer, prompts, gen, heads["against"],
                                config.batch_size)  # fmt: skip
    report = judge_sides(prompts, {"policy": new, "against": old}, judge, "against", relevance=Relevance(), kls=kls)
    report.update(policy=config.policy, against=config.against, judge=config.judge, reference=reference,
                  instruction=heads["policy"], against_instruction=heads["against"])
    if config.min_response_length < config.response_length:  # not fixed-length: how many ran into the cap unfinished
        for name in models:
            report["sides"][name]["truncated_share"] = prompt_ci([0.0 if d else 1.0 for d in sides[name].finished],
                                                                 prompts)  # fmt: skip
    if blind_db:
        # One model under two instructions is two systems: the blind store must tell its sides apart.
        names = (config.policy, config.against) if config.policy != config.against else tuple(
            f"{config.policy} [{side}: {heads[side][:40] or 'bare prompt'}]" for side in ("policy", "against"))
        report["blind_queued"] = queue_blind(blind_db, prompts, (names[0], new), (names[1], old))
    out = Path(out)
    write_json_atomic(out, without_verdicts(report))
    write_text_atomic(out.with_suffix(".md"), table_markdown(report))
    pairs = [{"prompt": p, "policy": a, "against": b} for p, a, b in zip(prompts, new, old)]
    write_text_atomic(out.with_name(out.stem + "-pairs.jsonl"), "".join(json.dumps(x) + "\n" for x in pairs))
    return report


def without_verdicts(report: dict) -> dict:
    """The report without the per-response lists, verdicts and judge scores (those go beside each response in the
    pairs file)."""
    def strip(d):
        return {k: v for k, v in d.items() if k not in ("verdicts", "judge_scores")}

    out = dict(report, sides={k: strip(v) for k, v in report["sides"].items()})
    if report.get("human"):
        out["human"] = strip(report["human"])
    return out
