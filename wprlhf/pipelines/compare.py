"""`wprlhf compare`: PPO, RLOO, GRPO, DPO and best-of-n on the same preferences, the same budget and the same judge.

The run, in one directory (each phase resumable: compare_state.json lists the finished ones):

    split        prompts into train and eval parts by `prompt_key` (reposts together): prompts/train.txt, eval.txt
    labels       the start policy writes 2 responses to each of n_comparisons train prompts; the labeler (a simulated
                 one over a reward SPEC, or your comparisons file) picks the better: comparisons.jsonl
    rm           a reward model trained on those comparisons (rm/): the reward of PPO, RLOO, GRPO and best-of-n
    <method>     each method trained from the start policy with the same budget of responses: PPO, RLOO and GRPO
                 sample `budget` responses (steps = budget / batch_size); DPO reads the comparisons' pairs, 2
                 responses each, for as many epochs as fit in the budget (at least one); best-of-n trains nothing
    eval         every method against the start policy on the eval prompts by the judge (never trained on):
                 report.json, table.md, over_optimisation.png (the reward model's and the judge's scores against
                 √KL to the start policy, each method a point, PPO's, RLOO's and GRPO's training steps a line:
                 `report.plot_over_optimisation`), samples.jsonl (each eval prompt with every side's response)

The budget counts responses a method learns from, so the methods see the same amount of text, and PPO, RLOO and
GRPO take the same optimizer steps (2 epochs x 2 minibatches a batch); time per method is measured and reported
beside it, since a DPO pair costs no sampling and a PPO episode costs a value model (the reward model's time,
shared by all but DPO, is reported apart).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import load_comparisons, load_prompts, prompt_key, split_by_prompt, write_comparisons
from ..distributed import check_mixed_precision, resolve_device
from ..errors import UserError, check_numbers
from ..evals.side_by_side import judge_sides, prompt_ci, table_markdown, without_verdicts
from ..evals.sides import Side, sample_side, side_kl
from ..files import write_json_atomic, write_text_atomic
from ..generation import generate_k, generation_config
from ..methods.best_of import kl_bound, sample_pool
from ..methods.dpo import pairs_from
from ..metrics import read_metrics
from ..models import load_policy
from ..report import Curve, curve_from_steps, curves_from_sides, write_over_optimisation
from ..rewards.judges import Relevance, SimulatedLabeler
from ..rewards.reward_model import RewardConfig, reward_fn_from_model
from ..rewards.reward_model import train as rm_train
from ..rewards.spec import load_reward
from .runner import Runner

STATE_FILE = "compare_state.json"
METHODS = ("ppo", "rloo", "grpo", "dpo")
INPUTS = ("policy", "prompts", "eval_file", "labeler", "comparisons", "judge", "reward_model")
"""Inputs whose content a resume compares (`files.fingerprint`): a changed file or model is refused."""


@dataclass
class CompareConfig:
    """`wprlhf compare`. Defaults: the sentiment labeler on the shipped prompts, about an hour on 2 CPU cores."""

    methods: str = "ppo,rloo,grpo,dpo,best-of-4,best-of-16"
    """Comma-separated: ppo, rloo, grpo, dpo and best-of-N for any N >= 2."""
    policy: str = "smollm2"
    """The start policy: every method starts from it, and every KL is measured to it."""
    prompts: str = ""
    """Prompt file or prompt/response data set (its prompts); empty = the prompts shipped with wprlhf."""
    eval_prompts: int = 40
    """Prompts (groups of reposts) held out for the judge; none is trained on."""
    eval_file: str = ""
    """A prompt file of the eval prompts (its first eval_prompts), e.g. `wprlhf stories`' split/eval_prompts.txt, so
    that a judge trained on that run's judge prompts never sees them; --prompts then gives the train prompts (any of
    them that is an eval prompt, repost or not, is dropped). Empty: eval prompts are held out of --prompts."""
    labeler: str = "sentiment"
    """Reward SPEC whose scores a simulated labeler turns into preferences (Bradley-Terry, labeler_temperature)."""
    labeler_temperature: float = 0.1
    """Noise of the simulated labeler, in the labeler score's units (0 = always the higher score)."""
    comparisons: str = ""
    """A comparisons file to use instead of the simulated labeler (the labeling page's export, karma pairs)."""
    n_comparisons: int = 128
    """Train prompts the labeler compares 2 start-policy responses for."""
    judge: str = "sentiment"
    """Reward SPEC of the judge (noiseless): a built-in, or rm:DIR of a judge reward model."""
    relevance: bool = False
    """Also report prompt relevance (MiniLM cosine of prompt and response), a judge of the writing-prompts task."""
    rm_val_fraction: float = 0.1
    """Share of the comparisons held out of the reward model's training, to state its accuracy."""
    reward_model: str = "minilm"
    """Backbone of the reward model trained on the comparisons ('tiny' in tests); or rm:DIR, a reward model already
    trained on exactly these comparisons, used as it is (e.g. `wprlhf stories`' RUN/rm, whose comparisons are its
    split/rm_comparisons.jsonl: pass that file as --comparisons)."""
    budget: int = 512
    """Responses each method learns from (PPO/RLOO/GRPO episodes; DPO: 2 per pair per epoch)."""
    response_length: int = 32
    """Tokens of every response, in training and evaluation (fixed: min = max new tokens)."""
    batch_size: int = 16
    """Episodes per step of PPO, RLOO and GRPO (RLOO and GRPO: 4 responses to each of batch_size / 4 prompts)."""
    lr: float = 1e-5
    """Learning rate of PPO, RLOO and GRPO."""
    dpo_lr: float = 5e-6
    """Learning rate of DPO."""
    dpo_beta: float = 0.1
    """DPO's beta: the strength of its implicit KL penalty to the start policy (Rafailov et al. 2023, eq. 7)."""
    kl_coef: float = 0.05
    """KL coefficient of PPO, RLOO and GRPO, fixed. PPO and RLOO subtract kl_coef x KL from the reward; GRPO adds
    kl_coef x k3 to its loss against standardised advantages, so the same number is not the same price there."""
    temperature: float = 0.7
    """Sampling temperature, in training and evaluation alike."""
    seed: int = 0
    """Seeds the labeler's noise, the sampling and every method's training."""
    device: str = "auto"
    """'auto' (a GPU where there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    mixed_precision: str = "auto"
    """'auto' (bf16 where the device runs it faster than fp32), 'no', 'bf16' or 'fp16'."""

    def __post_init__(self):
        check_mixed_precision(self.mixed_precision)
        check_numbers(self, non_negative=("labeler_temperature", "lr", "dpo_lr", "dpo_beta", "kl_coef", "temperature"))
        if not 0 <= self.rm_val_fraction < 1:
            raise UserError(f"rm_val_fraction must lie in [0, 1), got {self.rm_val_fraction}: the rest is what the "
                            "reward model trains on; set --rm-val-fraction (0.1 is usual)")  # fmt: skip
        for name, low in dict(eval_prompts=1, n_comparisons=2, budget=1, response_length=1, batch_size=4).items():
            if getattr(self, name) < low:
                raise UserError(f"{name} must be >= {low}, got {getattr(self, name)}; set --{name.replace('_', '-')}")
        if self.batch_size % 4:
            raise UserError(f"batch_size {self.batch_size} must be a multiple of 4 (RLOO and GRPO: 4 responses a "
                            "prompt); set --batch-size")  # fmt: skip
        if self.budget < self.batch_size:
            raise UserError(f"budget {self.budget} is less than one step of batch_size {self.batch_size}")
        self.method_list  # parses, or names the problem
        if self.reward_model.startswith("rm:"):  # it stands for the comparisons DPO reads: those must be given
            if not self.comparisons:
                raise UserError("--reward-model rm:DIR needs --comparisons: the comparisons that reward model was "
                                "trained on (DPO learns from the same ones)")  # fmt: skip
            if self.reward_model.strip() == self.judge.strip():
                raise UserError("--judge is the --reward-model itself; judge with a model no method trained on")

    @property
    def method_list(self) -> list[str]:
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        for name in names:
            if name not in METHODS and not (name.startswith("best-of-") and name[8:].isdigit() and int(name[8:]) >= 2):
                raise UserError(f"unknown method {name!r} in --methods; choose from {', '.join(METHODS)} and "
                                "best-of-N (N >= 2)")  # fmt: skip
        if not names:
            raise UserError("--methods is empty; name at least one method")
        return names


# ==========================================================================================================
# phases


def _train_method(name: str, config: CompareConfig, out: Path, train_prompts: list[str], comparisons, reward_fn) -> None:
    """Train one method from the start policy into out (its run directory)."""
    common = dict(policy=config.policy, response_length=config.response_length,
                  min_response_length=config.response_length, temperature=config.temperature, lr=config.lr,
                  kl_coef=config.kl_coef, adaptive_kl=False, batch_size=config.batch_size, ppo_epochs=2,
                  num_minibatches=2,
                  steps=max(1, config.budget // config.batch_size), checkpoint_every=10**6, log_samples=0,
                  seed=config.seed, device=config.device, mixed_precision=config.mixed_precision)  # fmt: skip
    if name == "ppo":
        from ..methods.ppo import PPOConfig, train

        train(PPOConfig(**common), train_prompts, reward_fn, out)
    elif name == "rloo":
        from ..methods.rloo import RLOOConfig, train

        train(RLOOConfig(**common, samples_per_prompt=4), train_prompts, reward_fn, out)
    elif name == "grpo":
        from ..methods.grpo import GRPOConfig, train

        train(GRPOConfig(**common, samples_per_prompt=4), train_prompts, reward_fn, out)
    else:
        from ..methods.dpo import DPOConfig, pairs_from, train

        epochs = max(1, config.budget // (2 * len(pairs_from(comparisons))))
        train(DPOConfig(policy=config.policy, beta=config.dpo_beta, lr=config.dpo_lr, epochs=epochs, batch_size=8,
                        max_pairs=config.budget // 2,
                        max_response_length=config.response_length + 1, val_fraction=0.0, checkpoint_every=10**6,
                        seed=config.seed, device=config.device, mixed_precision=config.mixed_precision), out,
              comparisons=comparisons)  # fmt: skip


def run(config: CompareConfig, out_dir: str | Path, resume: bool = False, allow_changed_inputs: bool = False) -> dict:
    """Run (or resume) the comparison into out_dir; returns the report. A resume whose inputs (INPUTS) changed since
    the run started, or whose settings differ, is refused (unless allow_changed_inputs, for the inputs)."""
    out_dir = Path(out_dir)
    fields = [f.name for f in dataclasses.fields(CompareConfig)]  # every phase depends on every setting
    runner = Runner(out_dir, STATE_FILE, "comparison", config, INPUTS, resume, allow_changed_inputs,
                    depends=lambda phase: fields)  # fmt: skip
    judge = load_reward(config.judge, what="judge")  # a bad SPEC fails before any work
    # A reward model trained already (rm:DIR) is used as it is; it too must load before any work.
    needs_rm = any(m != "dpo" for m in config.method_list)
    given_rm = None
    if needs_rm and config.reward_model.startswith("rm:"):
        given_rm = load_reward(config.reward_model, what="reward model")
    relevance = None
    if config.relevance:  # loaded now: a failure after the evaluation's sampling would lose it
        relevance = Relevance()
        relevance.embed(["a sentence"])

    prompts_dir = out_dir / "prompts"
    if runner.wanted("split"):
        split_prompts(config, prompts_dir)
        runner.finish("split")
    train_prompts, eval_prompts = load_prompts(prompts_dir / "train.txt"), load_prompts(prompts_dir / "eval.txt")
    if runner.wanted("labels"):
        runner.restart_clock()
        write_comparisons(out_dir / "comparisons.jsonl", label(config, train_prompts, eval_prompts))
        runner.finish("labels")
    comparisons = load_comparisons(out_dir / "comparisons.jsonl", keep_meta=True)

    reward_fn = given_rm  # None when no method needs a reward model, or when it is trained below
    if needs_rm and given_rm is None:
        if runner.wanted("rm"):
            runner.restart_clock()
            rm_train(RewardConfig(data=str(out_dir / "comparisons.jsonl"), model=config.reward_model,
                                  val_fraction=config.rm_val_fraction, keep_meta=True, seed=config.seed,
                                  device=config.device, mixed_precision=config.mixed_precision), out_dir / "rm")  # fmt: skip
            runner.finish("rm")
        reward_fn = reward_fn_from_model(out_dir / "rm")

    for name in config.method_list:
        if name.startswith("best-of-") or not runner.wanted(name):
            continue
        runner.restart_clock()
        run_dir = out_dir / name
        if run_dir.exists():  # a method killed half-way starts again: its budget is counted from zero
            shutil.rmtree(run_dir)
        _train_method(name, config, run_dir, train_prompts, comparisons, reward_fn)
        runner.finish(name)

    runner.restart_clock()
    return write_report(config, out_dir, runner, evaluate(config, out_dir, eval_prompts, reward_fn, judge, relevance),
                        len(comparisons))  # fmt: skip


def write_report(config: CompareConfig, out_dir: Path, runner: Runner, report: dict, n_comparisons: int) -> dict:
    """The evaluation's report with the run's facts (judge, labeler, budget, timings) as report.json, table.md (a
    column of each method's training minutes) and over_optimisation.png; the runner's state saved with the eval
    time."""
    timings = runner.state["timings_s"]
    report.update(judge=config.judge, labeler=config.comparisons or f"sim:{config.labeler}",
                  comparisons=n_comparisons, budget=config.budget, timings_s=timings,
                  reward_model_minutes=timings.get("rm", 0.0) / 60, response_length=config.response_length)  # fmt: skip
    timings["eval"] = runner.seconds()
    # Training time of each method; the reward model's (shared by PPO, RLOO, GRPO and best-of-n) is said apart.
    extra = {name: {"train minutes": f"{timings.get(name, 0.0) / 60:.1f}"} for name in report["sides"]}
    write_json_atomic(out_dir / "report.json", without_verdicts(report))
    write_text_atomic(out_dir / "table.md", table_markdown(report, extra))
    write_over_optimisation(over_optimisation_curves(report, out_dir), out_dir / "over_optimisation.png")
    runner.save()
    return report


def split_prompts(config: CompareConfig, prompts_dir: Path) -> None:
    """The split phase: --prompts less the eval prompts (--eval-file's, or a held-out share) -> train.txt, eval.txt."""
    prompts = list(dict.fromkeys(load_prompts(config.prompts)))
    if config.eval_file:
        eval_prompts = list(dict.fromkeys(load_prompts(config.eval_file)))[: config.eval_prompts]
        eval_keys = {prompt_key(p) for p in eval_prompts}
        train_prompts = [p for p in prompts if prompt_key(p) not in eval_keys]
    else:
        train_prompts, eval_prompts = split_by_prompt(prompts, min(0.5, config.eval_prompts / len(prompts)),
                                                      seed=42)  # fmt: skip
    if config.eval_file and len(train_prompts) < 2:
        raise UserError(f"--prompts has {len(train_prompts)} prompts that are not in --eval-file "
                        f"{config.eval_file}; give --prompts the train prompts")  # fmt: skip
    if len(train_prompts) < 2 or not eval_prompts:
        raise UserError(f"{len(prompts)} distinct prompts are too few to hold out {config.eval_prompts} for the "
                        "judge and train on the rest; give --prompts more prompts or lower --eval-prompts")  # fmt: skip
    write_text_atomic(prompts_dir / "train.txt", "".join(p + "\n" for p in train_prompts))
    write_text_atomic(prompts_dir / "eval.txt", "".join(p + "\n" for p in eval_prompts))


def label(config: CompareConfig, train_prompts: list[str], eval_prompts: list[str]) -> list:
    """The labels phase: the train prompts' comparisons of --comparisons, or pairs of the start policy's samples
    labelled by the simulated --labeler. UserError when no comparison has a winner."""
    comparisons = _train_comparisons(config, train_prompts, eval_prompts)
    if not pairs_from(comparisons):
        raise UserError(f"all {len(comparisons)} comparisons are ties: no preference to learn from; lower "
                        "--labeler-temperature or label again")  # fmt: skip
    return comparisons


def _train_comparisons(config: CompareConfig, train_prompts: list[str], eval_prompts: list[str]) -> list:
    if config.comparisons:
        # Only train prompts' comparisons: the eval prompts are the judge's, and no method may learn on them.
        train_keys = {prompt_key(p) for p in train_prompts}
        comparisons = [c for c in load_comparisons(config.comparisons) if prompt_key(c.prompt) in train_keys]
        if not comparisons:
            raise UserError(f"{config.comparisons}: no comparison is of a train prompt (--prompts, less the "
                            f"{len(eval_prompts)} held out); give --prompts the prompts the comparisons are of")  # fmt: skip
        return comparisons
    policy, tokenizer = load_policy(config.policy, seed=config.seed)
    policy.to(resolve_device(config.device))
    labelled = train_prompts[: config.n_comparisons]
    responses = generate_k(policy, tokenizer, labelled, 2, _generation(config), seed=config.seed + 10_000,
                           progress=True)  # fmt: skip
    labeler = SimulatedLabeler(load_reward(config.labeler, what="labeler"), name=f"sim:{config.labeler}",
                               temperature=config.labeler_temperature, seed=config.seed)  # fmt: skip
    return labeler.label(labelled, responses)


def _generation(config: CompareConfig):
    """Every side's sampling: fixed-length responses, so no method wins by length."""
    return generation_config(None, response_length=config.response_length, min_response_length=config.response_length,
                             temperature=config.temperature)  # fmt: skip


def evaluate(config: CompareConfig, out_dir: Path, eval_prompts: list[str], reward_fn, judge, relevance) -> dict:
    """Every method against the start policy on the eval prompts, by the judge: samples.jsonl and the report, each
    side with its reward model score ('reward', mean with a CI) where a method trained on one (reward_fn)."""
    device, gen = resolve_device(config.device), _generation(config)
    start, tokenizer = load_policy(config.policy, seed=config.seed)
    start.to(device)
    sides = {"start": sample_side("start", start, tokenizer, eval_prompts, gen, config.seed + 30_000)}
    kls: dict[str, list[float]] = {"start": [0.0] * len(eval_prompts)}

    ns = [int(m[8:]) for m in config.method_list if m.startswith("best-of-")]
    if ns:
        pool = sample_pool(start, tokenizer, eval_prompts, max(ns), reward_fn, gen, seed=config.seed + 20_000)
        for n in ns:
            sides[f"best-of-{n}"] = Side(f"best-of-{n}", pool.best(n)[0])
            kls[f"best-of-{n}"] = [kl_bound(n)] * len(eval_prompts)
    for name in (m for m in config.method_list if m in METHODS):
        model, _ = load_policy(str(out_dir / name / "policy"))
        model.to(device)
        sides[name] = sample_side(name, model, tokenizer, eval_prompts, gen, config.seed + 40_000)
        # On the sampled ids, as stories and `wprlhf eval` measure a side's KL.
        kls[name] = side_kl(sides[name], model, start, tokenizer, eval_prompts, gen, progress=False)
        del model
    texts = {name: side.texts for name, side in sides.items()}
    # Every side's response to each eval prompt, to read (and to hand a blind reader as shuffled pairs).
    write_text_atomic(out_dir / "samples.jsonl", "".join(
        json.dumps({"prompt": p, **{name: responses[i] for name, responses in texts.items()}}) + "\n"
        for i, p in enumerate(eval_prompts)))  # fmt: skip
    report = judge_sides(eval_prompts, texts, judge, "start", relevance=relevance, kls=kls)
    if reward_fn is not None:  # the proxy every method but DPO trained on, beside the judge: over-optimisation
        for name, responses in texts.items():
            scores = [float(s) for s in reward_fn(eval_prompts, responses)]
            if not np.isfinite(scores).all():
                raise UserError(f"the reward model gave non-finite scores to side {name!r}; check or retrain it")
            report["sides"][name]["reward"] = prompt_ci(scores, eval_prompts)
    return report


def over_optimisation_curves(report: dict, out_dir: Path) -> list[Curve]:
    """The over-optimisation plot's curves: every method a point on the eval prompts (`report.curves_from_sides`),
    and PPO's, RLOO's and GRPO's training steps (their metrics.csv: KL to the start policy, their reference, and
    the reward model's score of each batch; no judge scores a training batch here). DPO logs no KL per step."""
    curves = curves_from_sides(report["sides"])
    for name in (m for m in report["sides"] if m in ("ppo", "rloo", "grpo")):
        if (out_dir / name / "metrics.csv").is_file():
            curves.append(curve_from_steps(name, read_metrics(out_dir / name / "metrics.csv")))
    return curves
