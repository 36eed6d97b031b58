"""The iterative RLHF loop: sample from the policy -> people (or a simulated labeler) compare -> the reward model
retrains on every label so far -> PPO against it -> the judge measures the new policy against the start.

One run directory holds it all, one sub-directory per round:

    loop_state.json          the phases finished so far (a killed loop resumes after the last one)
    eval_prompts.txt         held-out prompts for the judge, never used for training
    start_responses.jsonl    the start policy's responses to them (sampled once)
    round-1/responses.jsonl  k responses per prompt from the current policy (`wprlhf sample`'s format; a
                             training run's samples.jsonl is another thing: its log of one response a line)
    round-1/questions.jsonl  what labelers are asked: each prompt's k responses at once, or every pair of them
    round-1/labels.jsonl     the comparisons collected this round (comparisons JSONL)
    round-1/rm/              the reward model trained on all labels of rounds 1..r (HF format)
    round-1/eval.json        judge win rate of the policy after this round over the start policy
    ppo/                     one PPO run continued round after round (its reference stays the start policy)
    loop_metrics.csv         one row per round: labels, RM held-out accuracy, reward, KL, win rate and CI
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint as ckpt
from ..data import Comparison, builtin_prompts, load_comparisons, load_prompts, load_responses, write_comparisons
from ..distributed import check_mixed_precision, resolve_device
from ..errors import UserError, check_numbers
from ..evals.side_by_side import judge_sides, without_verdicts
from ..evals.sides import sample_side, side_kl
from ..files import iter_jsonl, write_json_atomic, write_text_atomic
from ..generation import generate_k, generation_config, write_samples
from ..methods.onpolicy_config import PPOConfig
from ..methods.ppo import train as ppo_train
from ..metrics import read_metrics
from ..models import load_policy, make_reference
from ..rewards.judges import SimulatedLabeler, agreement
from ..rewards.reward_model import RewardConfig, reward_fn_from_model
from ..rewards.reward_model import train as rm_train
from ..rewards.spec import load_reward
from .runner import Runner

STATE_FILE = "loop_state.json"
# The settings a resumed loop may change: more rounds, and how it waits for people and where it runs. Every
# other one shaped the phases already done, and a change is refused, naming it.
RESUMABLE = ("rounds", "poll_s", "web_labels", "db", "device")
LOOP_METRICS = ("round", "labels", "agreement", "rm_accuracy", "score_mean", "kl", "kl_coef", "eval_kl",
                "judge_new", "judge_start", "win_rate", "win_rate_lo", "win_rate_hi", "distinct_2", "start_distinct_2",
                "elapsed_s")  # fmt: skip


@dataclass
class LoopConfig:
    """`wprlhf loop`: rounds of sample -> label -> reward model -> PPO, judged against the start policy."""

    policy: str = "smollm2"
    """The start policy (and the PPO reference): 'smollm2', 'tiny', a directory or a hub id."""
    prompts: str = ""
    """Prompt file (one per line, or CSV/JSONL with a prompt column), a prompt/response data set (directory, CSV or
    hub id; its distinct prompts are used); empty = the 200 prompts shipped with wprlhf."""
    eval_prompts: int = 12
    """Prompts held out of every round for the judge's win rate."""
    rounds: int = 3
    """Rounds of sample -> label -> reward model -> PPO."""
    labeler: str = "sim:sentiment"
    """Who compares: 'sim:SPEC' (see wprlhf.rewards.spec: sentiment, relevance, rm:DIR, weighted sums) or 'web'
    (the labeling page: responses are queued in --db and the loop waits for --web-labels labels a round)."""
    judge: str = ""
    """The true score used for win rates; empty = the simulated labeler's own score without noise. A web
    labeler has no hidden score, so a run with 'web' needs one (e.g. 'sentiment' or 'rm:DIR')."""
    labeler_temperature: float = 0.05
    """Bradley-Terry temperature of simulated labelers, in the judge's units (VADER compound spans -1..1)."""
    labelers: int = 1
    """Independent simulated labelers answering each comparison (their agreement is logged)."""
    k: int = 4
    """Responses per prompt per round."""
    questions: str = "best-of-k"
    """What a labeler is asked about each prompt's k responses: 'best-of-k' (one k-way comparison, as in
    lm-human-preferences) or 'pairs' (each of the k(k-1)/2 pairs on its own: more labels from the same samples,
    which is what a small reward model needs when sampling is the expensive part)."""
    prompts_per_round: int = 24
    """Prompts whose k responses are compared each round."""
    response_length: int = 48
    """New tokens per response, in sampling and PPO alike. Prompts keep only as many tokens as leave room for them
    in the policy's positions (a warning says when a prompt loses some)."""
    min_response_length: int = 0
    """Stop tokens are forbidden before this many tokens, in sampling, PPO and evaluation alike. Equal to
    response_length gives fixed-length responses, as in Ziegler et al.'s sentiment task: a policy can then
    gain reward only by what it writes, not by stopping early (which also saves it KL penalty)."""
    temperature: float = 0.7
    """Sampling temperature, in the labeled samples, PPO and evaluation alike."""
    reward_model: str = "minilm"
    """Backbone of the reward model, retrained from it each round on all labels so far."""
    rm_epochs: int = 4
    """Passes of each round's reward-model training over all labels so far."""
    rm_lr: float = 5e-5
    """Learning rate of each round's reward model."""
    rm_max_length: int = 256
    """Tokens of prompt and response the reward model reads."""
    rm_batch_size: int = 8
    """Comparisons per optimizer step of each round's reward model."""
    rm_val_fraction: float = 0.2
    """Share of each round's labels held out of its reward model's training, to state its accuracy."""
    eval_samples: int = 2
    """Responses per held-out prompt in each round's evaluation: two halve the noise of the win rate at little
    cost."""
    ppo_steps: int = 8
    """PPO steps per round."""
    batch_size: int = 8
    """PPO episodes per step."""
    lr: float = 2e-5
    """PPO learning rate (policy and value model)."""
    kl_target: float = 6.0
    """Adaptive-KL target, nats per response."""
    ppo_config: str = ""
    """YAML/JSON file of further PPOConfig settings (batch size, lr, KL target, ...); the loop sets policy,
    steps, response lengths, temperature and seed itself."""
    db: str = ""
    """SQLite database of the labeling page (labeler 'web')."""
    web_labels: int = 0
    """Labels to wait for per round with labeler 'web' (0 = one per queued comparison)."""
    poll_s: float = 5.0
    """Seconds between looks at the labeling database while waiting for web labels."""
    seed: int = 0
    """Seeds the sampling, the simulated labelers, the reward models and PPO."""
    device: str = "auto"
    """'auto' (a GPU where there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    mixed_precision: str = "auto"
    """'auto' (bf16 where the device runs it faster than fp32: a GPU with bf16, a CPU with AVX-512 BF16 or AMX; else
    fp32; the choice is printed and saved), 'no' (fp32), 'bf16' or 'fp16': autocast (accelerate's) for the training forwards of the reward model and PPO; weights and AdamW stay
    fp32. bf16 pays on a GPU and on CPUs with AVX-512 BF16 or AMX; on AVX2-only CPUs it is several times slower."""

    def __post_init__(self):
        check_mixed_precision(self.mixed_precision)
        check_numbers(self, non_negative=("lr", "rm_lr", "labeler_temperature", "poll_s"))
        # Every size is checked here, before the first phase: a bad one must not surface after an hour of sampling.
        at_least = dict(rounds=1, k=2, prompts_per_round=1, ppo_steps=1, response_length=1, eval_prompts=1,
                        labelers=1, rm_epochs=1, rm_max_length=16, rm_batch_size=1, batch_size=1, web_labels=0,
                        min_response_length=0, eval_samples=1)  # fmt: skip
        for name, low in at_least.items():
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            if value < low:
                why = " (a comparison needs at least two responses)" if name == "k" else ""
                raise UserError(f"{name} must be >= {low}, got {value}{why}; set {flag} to {low} or more")
        for name in ("temperature", "rm_lr", "lr", "kl_target", "poll_s"):
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            if not value > 0:  # `not >` also refuses NaN
                raise UserError(f"{name} must be > 0, got {value}; set {flag} to a positive number")
        if not self.labeler_temperature >= 0:
            raise UserError(f"labeler_temperature must be >= 0, got {self.labeler_temperature}; set "
                            "--labeler-temperature to 0 (noiseless) or more")  # fmt: skip
        if not 0 < self.rm_val_fraction < 1:
            raise UserError(f"rm_val_fraction must lie in (0, 1), got {self.rm_val_fraction}; set --rm-val-fraction")
        if self.min_response_length > self.response_length:
            raise UserError(f"min_response_length {self.min_response_length} must lie in [0, response_length]; "
                            "lower --min-response-length")  # fmt: skip
        if self.questions not in ("best-of-k", "pairs"):
            raise UserError(f"questions must be 'best-of-k' or 'pairs', got {self.questions!r}")
        if self.labeler == "web" and not self.judge:
            raise UserError("labeler 'web' has no hidden true score: give --judge (e.g. sentiment or rm:DIR)")
        if self.labeler != "web" and not self.labeler.startswith("sim:"):
            raise UserError(f"labeler {self.labeler!r}: use 'sim:SPEC' (e.g. sim:sentiment) or 'web'")
        if self.labeler == "web" and not self.db:
            raise UserError("labeler 'web' needs --db, the labeling page's database")


RESUMED_AS_IS = tuple(f.name for f in dataclasses.fields(LoopConfig) if f.name not in RESUMABLE)


# `wprlhf demo`: the whole pipeline offline on the embedded models (two rounds of the loop). Sizes are set for
# 2 CPU cores: the default run takes about 25 minutes, --quick about 4. Responses of 64 tokens (~45 words) are
# the opening of a story: long enough to set a tone, short enough to sample hundreds on a CPU.
DEMO = dict(policy="smollm2", labeler="sim:sentiment", rounds=2, eval_prompts=32, prompts_per_round=40, k=4,
            questions="pairs", response_length=64, ppo_steps=10, batch_size=8, rm_epochs=8, rm_lr=1e-4)  # fmt: skip
DEMO_QUICK = dict(DEMO, rounds=1, eval_prompts=8, prompts_per_round=12, k=2, response_length=32, ppo_steps=3,
                  batch_size=4, rm_epochs=2, rm_max_length=128)  # fmt: skip


# ==========================================================================================================
# phases


def sample_responses(policy_name: str, prompts: list[str], k: int, config: LoopConfig, seed: int) -> list[list[str]]:
    """k responses per prompt from a policy; (P, k) nested list."""
    policy, tokenizer = load_policy(policy_name, seed=config.seed)
    policy.to(resolve_device(config.device))
    return generate_k(policy, tokenizer, prompts, k, generation_config(config), seed=seed, progress=True)


def round_ppo_config(config: LoopConfig, overrides: dict, rounds_done: int) -> PPOConfig:
    """The PPO settings after round `rounds_done`: the loop's own fields win over the --ppo-config file's."""
    return PPOConfig(**{"batch_size": config.batch_size, "lr": config.lr, "kl_target": config.kl_target,
                        "num_minibatches": 2 if config.batch_size % 2 == 0 else 1,
                        **overrides, "policy": config.policy, "steps": rounds_done * config.ppo_steps,
                        "response_length": config.response_length, "temperature": config.temperature,
                        "min_response_length": config.min_response_length,
                        "seed": config.seed, "device": config.device, "mixed_precision": config.mixed_precision,
                        "reward": "loop: this round's reward model"})  # fmt: skip


def questions(prompts: list[str], responses: list[list[str]], kind: str) -> tuple[list[str], list[list[str]]]:
    """The comparisons to ask about each prompt's responses: all of them at once, or every pair."""
    if kind == "best-of-k":
        return prompts, responses
    pairs = [(p, [rs[i], rs[j]]) for p, rs in zip(prompts, responses) for i in range(len(rs)) for j in range(i + 1, len(rs))]
    return [p for p, _ in pairs], [rs for _, rs in pairs]


def _read_samples(path: Path) -> tuple[list[str], list[list[str]]]:
    rows = [row for _, row in iter_jsonl(path)]
    return [r["prompt"] for r in rows], [r["responses"] for r in rows]


def web_labels(config: LoopConfig, samples: Path, round_dir: Path) -> list[Comparison]:
    """Queue a round's samples on the labeling page and wait until enough of them are labelled; returns the
    labels given to this round's comparisons (exported from the database as comparisons JSONL)."""
    from ..labeling.store import LabelingError, Store, read_samples

    try:
        store = Store(config.db)
        rows = read_samples(samples)
        store.add([(p, r, {**m, "loop_round": round_dir.name}) for p, r, m in rows])
    except LabelingError as err:
        raise UserError(str(err)) from err
    # order-blind, as the store keys comparisons: one queued earlier with these responses in another order is ours
    ours = {(p, tuple(sorted(r))) for p, r, _ in rows}
    wanted = config.web_labels or len(rows)
    print(f"queued {len(rows)} comparisons in {config.db}; waiting for {wanted} labels "
          f"(serve the page with `wprlhf label serve --db {config.db}`)", flush=True)  # fmt: skip
    export = round_dir / "web_export.jsonl"
    while True:
        try:
            store.export(export)
            labels = [c for c in load_comparisons(export, keep_meta=True) if (c.prompt, tuple(sorted(c.responses))) in ours]
        except LabelingError:  # the store holds no labels yet
            labels = []
        if len(labels) >= wanted:
            return labels
        print(f"  {len(labels)}/{wanted} labels", flush=True)
        time.sleep(config.poll_s)


# ==========================================================================================================
# the loop


def load_prompt_source(source: str) -> list[str]:
    """Prompts from a prompt file, or the distinct prompts of a prompt/response data set (a directory such as
    ../shared/data/writing_prompts, a CSV of stories, or a hub id); '' = the prompts shipped with wprlhf."""
    if not source:
        return builtin_prompts()
    path = Path(source)
    if path.is_file() and path.suffix == ".txt":
        return load_prompts(path)
    if path.is_file():
        try:
            return load_prompts(path)
        except UserError:
            pass  # not a prompt file: maybe a story file with a prompt column
    responses = load_responses(source)
    return list(dict.fromkeys(r.prompt for r in responses))


# Inputs whose content a resume compares (`files.fingerprint`): a changed file or model is refused.
INPUTS = ("policy", "prompts", "labeler", "judge", "reward_model", "ppo_config")


def run(config: LoopConfig, out_dir: str | Path, resume: bool = False,
        allow_changed_inputs: bool = False) -> list[dict]:  # fmt: skip
    """Run (or resume) the loop; returns one row of loop metrics per round. A resume whose inputs (INPUTS) changed
    since the loop started is refused unless allow_changed_inputs."""
    out_dir = Path(out_dir)
    runner = Runner(out_dir, STATE_FILE, "loop run", config, INPUTS, resume, allow_changed_inputs, quiet=True,
                    depends=lambda phase: RESUMED_AS_IS)  # fmt: skip
    wanted, finish = runner.wanted, runner.finish
    write_json_atomic(out_dir / "loop_config.json", dataclasses.asdict(config))

    prompts = load_prompt_source(config.prompts)
    if len(prompts) <= config.eval_prompts:
        raise UserError(f"{len(prompts)} prompts leave none for training after {config.eval_prompts} held out; "
                        "give more prompts or lower --eval-prompts")  # fmt: skip
    eval_prompts, train_prompts = prompts[: config.eval_prompts], prompts[config.eval_prompts :]
    judge = load_reward(config.judge or config.labeler, what="judge")
    labeler = None
    if config.labeler != "web":
        labeler = SimulatedLabeler(judge, name=config.labeler, temperature=config.labeler_temperature,
                                   labelers=config.labelers, seed=config.seed)  # fmt: skip
    ppo_overrides = ckpt.read_config_file(config.ppo_config) if config.ppo_config else {}
    round_ppo_config(config, ppo_overrides, rounds_done=1)  # a bad PPO setting fails now, not after hours of sampling

    if wanted("start"):
        write_text_atomic(out_dir / "eval_prompts.txt", "\n".join(eval_prompts) + "\n")
        start = sample_responses(config.policy, eval_prompts, config.eval_samples, config, seed=config.seed + 10_000)
        write_samples(out_dir / "start_responses.jsonl", eval_prompts, start, config.policy)
        finish("start")
    _, start_responses = _read_samples(_written(out_dir / "start_responses.jsonl", "start_samples.jsonl"))

    rows = _read_loop_metrics(out_dir)
    for r in range(1, config.rounds + 1):
        round_dir = out_dir / f"round-{r}"
        round_dir.mkdir(exist_ok=True)
        current = config.policy if r == 1 else str(out_dir / "ppo" / "policy")
        if wanted(f"{r}:sample"):
            sample_round(config, round_dir, r, train_prompts, current)
            finish(f"{r}:sample")
        if wanted(f"{r}:label"):
            label_round(config, round_dir, current, labeler)
            finish(f"{r}:label")
        if wanted(f"{r}:rm"):
            train_round_rm(config, out_dir, round_dir, r)
            finish(f"{r}:rm")
        if wanted(f"{r}:ppo"):
            round_ppo = round_ppo_config(config, ppo_overrides, rounds_done=r)
            ppo_round(round_ppo, out_dir / "ppo", train_prompts, round_dir / "rm", judge, allow_changed_inputs)
            finish(f"{r}:ppo")
        if wanted(f"{r}:eval"):
            row = evaluate_round(config, out_dir, round_dir, r, eval_prompts, start_responses, judge)
            row["elapsed_s"] = runner.elapsed()
            rows = [x for x in rows if x["round"] != r] + [row]
            _write_loop_metrics(out_dir, rows)
            print(f"round {r}: {row['labels']} labels, RM accuracy {row['rm_accuracy']:.3f}, KL {row['eval_kl']:.2f}, "
                  f"win rate {row['win_rate']:.3f} [{row['win_rate_lo']:.3f}, {row['win_rate_hi']:.3f}]", flush=True)  # fmt: skip
            finish(f"{r}:eval")
    return rows


def sample_round(config: LoopConfig, round_dir: Path, r: int, train_prompts: list[str], current: str) -> None:
    """Round r's samples: k responses of the current policy to each of prompts_per_round train prompts, taken in
    turn from where the last round stopped; round_dir/responses.jsonl."""
    offset = ((r - 1) * config.prompts_per_round) % len(train_prompts)
    chosen = [train_prompts[(offset + i) % len(train_prompts)] for i in range(config.prompts_per_round)]
    responses = sample_responses(current, chosen, config.k, config, seed=config.seed + r)
    write_samples(round_dir / "responses.jsonl", chosen, responses, current)


def label_round(config: LoopConfig, round_dir: Path, current: str, labeler) -> None:
    """Round r's labels: the questions asked of its samples (questions.jsonl), answered by the simulated labelers or
    by people on the labeling page (labeler None: 'web'); round_dir/labels.jsonl."""
    asked = questions(*_read_samples(_written(round_dir / "responses.jsonl", "samples.jsonl")), config.questions)
    write_samples(round_dir / "questions.jsonl", *asked, current)
    labels = web_labels(config, round_dir / "questions.jsonl", round_dir) if labeler is None else labeler.label(*asked)
    write_comparisons(round_dir / "labels.jsonl", labels)


def train_round_rm(config: LoopConfig, out_dir: Path, round_dir: Path, r: int) -> None:
    """Round r's reward model, from the backbone again, on every label of rounds 1..r (all_labels.jsonl), every one
    of them (max_examples 0, whatever `rm train`'s subsampling default); round_dir/rm."""
    all_labels = [c for i in range(1, r + 1) for c in load_comparisons(out_dir / f"round-{i}" / "labels.jsonl")]
    write_comparisons(round_dir / "all_labels.jsonl", all_labels)
    rm_config = RewardConfig(data=str(round_dir / "all_labels.jsonl"), model=config.reward_model, epochs=config.rm_epochs,
                             lr=config.rm_lr, max_length=config.rm_max_length, max_examples=0,
                             batch_size=config.rm_batch_size, val_fraction=config.rm_val_fraction, eval_every=10**9,
                             seed=config.seed, keep_meta=True, device=config.device,
                             mixed_precision=config.mixed_precision)  # fmt: skip
    rm_train(rm_config, round_dir / "rm")


def ppo_round(config: PPOConfig, ppo_dir: Path, train_prompts: list[str], rm_dir: Path, judge,
              allow_changed_inputs: bool) -> None:  # fmt: skip
    """A round's PPO against its reward model. One PPO run across rounds: each round resumes it with the new reward
    model, so the optimizer, the KL controller and the reference (the start policy) carry over. A PPO run killed
    before its first checkpoint resumes too: it fails with the way out below, not with "already holds a run"."""
    resume = (ppo_dir / "metrics.csv").exists() or ckpt.latest_checkpoint(ppo_dir) is not None
    try:
        ppo_train(config, train_prompts, reward_fn_from_model(rm_dir), ppo_dir, resume=resume, judge_fn=judge,
                  allow_changed_inputs=allow_changed_inputs)  # fmt: skip
    except ckpt.NoUsableCheckpoint as err:  # its advice names `wprlhf ppo` flags; this is the loop's
        restart = (f"move {ppo_dir} aside (e.g. to {ppo_dir}.broken) and rerun with --resume "
                   "(its PPO starts again from the start policy)")  # fmt: skip
        raise ckpt.NoUsableCheckpoint(err.root, err.problems, restart) from None


def evaluate_round(config: LoopConfig, out_dir: Path, round_dir: Path, r: int, eval_prompts: list[str],
                   start_responses: list[list[str]], judge) -> dict:
    """The policy after round r against the start policy on held-out prompts; writes round_dir/eval.json and
    eval_pairs.jsonl (each prompt's start and new response side by side, with judge and reward-model scores)."""
    flat_prompts = [p for p in eval_prompts for _ in range(config.eval_samples)]
    start = [t for rs in start_responses for t in rs]
    new, kls = _sample_new(config, out_dir, flat_prompts)
    report = judge_sides(flat_prompts, {"start": start, "new": new.texts}, judge, "start", kls={"new": kls})
    win, sides = report["win_rates"]["new vs start"], report["sides"]
    reward_fn = reward_fn_from_model(round_dir / "rm")
    rewards_new, rewards_start = reward_fn(flat_prompts, new.texts), reward_fn(flat_prompts, start)
    ppo_rows = read_metrics(out_dir / "ppo" / "metrics.csv")
    labels = list(load_comparisons(round_dir / "all_labels.jsonl"))
    rm_eval = json.loads((round_dir / "rm" / "eval-heldout.json").read_text())
    row = {"round": r, "labels": len(labels), "agreement": agreement(labels),
           "rm_accuracy": rm_eval.get("accuracy", float("nan")), "score_mean": ppo_rows[-1]["score_mean"],
           "kl": ppo_rows[-1]["kl"], "kl_coef": ppo_rows[-1]["kl_coef"], "eval_kl": sum(kls) / len(kls),
           "distinct_2": sides["new"]["distinct_2"]["mean"], "start_distinct_2": sides["start"]["distinct_2"]["mean"],
           "judge_new": sides["new"]["judge"]["mean"], "judge_start": sides["start"]["judge"]["mean"],
           **{k: win[k] for k in ("win_rate", "win_rate_lo", "win_rate_hi")}}  # fmt: skip
    pairs = [{"prompt": p, "start": a, "new": b, "judge_start": ja, "judge_new": jb, "reward_start": ra,
              "reward_new": rb, "kl": kl}
             for p, a, b, ja, jb, ra, rb, kl in zip(flat_prompts, start, new.texts, sides["start"]["judge_scores"],
                                                    sides["new"]["judge_scores"], rewards_start, rewards_new, kls)]  # fmt: skip
    write_text_atomic(round_dir / "eval_pairs.jsonl", "".join(json.dumps(x) + "\n" for x in pairs))
    # agreement is NaN with one labeler (no pair of labels to compare), rm_accuracy when no label has a winner
    write_json_atomic(round_dir / "eval.json", {**row, "n": win["n"], "judge": config.judge or config.labeler,
                                                **without_verdicts(report)}, allow_nan=True)  # fmt: skip
    return row


def _sample_new(config: LoopConfig, out_dir: Path, prompts: list[str]) -> tuple:
    """(the side of the PPO policy as it is now, sampled on `prompts`; each response's KL to the start policy)."""
    policy, tokenizer = load_policy(str(out_dir / "ppo" / "policy"))
    policy.to(resolve_device(config.device))
    reference, _ = load_policy(config.policy, seed=config.seed)
    reference = make_reference(reference.to(policy.device))
    gen = generation_config(config)
    new = sample_side("new", policy, tokenizer, prompts, gen, seed=config.seed + 10_000)
    return new, side_kl(new, policy, reference, tokenizer, prompts, gen, progress=False)


def _written(path: Path, old_name: str) -> Path:
    """`path`, or the file of the same folder named `old_name` by loops of earlier versions, when only that exists
    (a loop started before the rename resumes with what it wrote)."""
    old = path.with_name(old_name)
    return old if not path.exists() and old.exists() else path


def _read_loop_metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "loop_metrics.csv"
    if not path.exists():
        return []
    return [{k: (int(v) if k in ("round", "labels") else v) for k, v in row.items()} for row in read_metrics(path)]


def _write_loop_metrics(out_dir: Path, rows: list[dict]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOOP_METRICS)
    writer.writeheader()
    for row in sorted(rows, key=lambda x: x["round"]):
        writer.writerow({k: row[k] for k in LOOP_METRICS})
    write_text_atomic(out_dir / "loop_metrics.csv", buffer.getvalue())
