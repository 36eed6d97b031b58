"""`wprlhf stories`: RLHF on r/WritingPrompts itself, judged by models and rules the policy never trained on.

The pipeline (issue 18), one resumable phase after another, in one run directory:

    split      prompts grouped by `data.prompt_key` (reposts together) into train / judge / eval parts:
               split/train_prompts.txt, judge_prompts.txt, eval_prompts.txt, split.json
    rm         the reward model: karma comparisons of train prompts only (split/rm_comparisons.jsonl)
    judge      the judge reward model: karma comparisons of judge prompts only (split/judge_comparisons.jsonl)
    sft        supervised fine-tuning of the start policy on the top-voted story of each train prompt, or
               (sft_data 'best-of-N') on the start policy's best of N samples by the reward model
    dpo        (rl 'dpo') DPO from the SFT policy on pairs of its own samples: for each train prompt, the best and
               the worst of N by the task's reward (or DivPO's pair); with --rounds N, dpo-r2 .. dpo-rN after it,
               each from the round before (iterative DPO)
    ppo        (rl 'ppo') PPO from the SFT policy against the task's reward, KL-penalised to the SFT policy, on
               train prompts
    best_of    n samples of the SFT policy per eval prompt, scored by the reward model (best-of-4, best-of-16)
    eval       every policy on the eval prompts by every judge (`side_by_side.judge_sides`), each win rate beside
               its length-controlled one: eval/report.json, eval/table.md, eval/samples.md,
               eval/over_optimisation.png, eval/blind.db (final vs start, best-of-n and both human stories, blind)

Responses are whole stories: each ends at the policy's end-of-turn or is cut at response_length tokens, and a cut
one is counted and penalised (missing_eos_penalty); fixed_length gives every side exactly response_length tokens.

What each part is for: SFT, the reward model and PPO see only train prompts; the judge reward model only judge
prompts; evaluation only eval prompts. `stories_state.json` lists the finished phases, so a killed run resumes
after the last one (`--resume`). The SFT policy and both reward models are cached under --cache-dir, keyed by the
data, the split and their settings, and reused by later runs with the same key.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..data import (Response, is_hub_id, karma_pairs, load_prompts, load_responses, prompt_key, read_rows,
                    write_comparisons)
from ..distributed import autocast_dtype, check_mixed_precision, resolve_device
from ..engine import run_precision
from ..errors import UserError, check_at_least, check_numbers
from ..files import iter_jsonl, write_json_atomic, write_text_atomic
from ..metrics import read_metrics
from ..report import Curve, curve_from_steps, curves_from_sides, write_over_optimisation
from ..text import clean_prompt
from .runner import Runner, build_cached, cache_root, model_key

if TYPE_CHECKING:
    from ..methods.best_of import Pool

STATE_FILE = "stories_state.json"
PHASES = ("split", "rm", "judge", "sft", "dpo", "ppo", "best_of", "eval")  # with --rounds N, dpo-r2 .. after dpo
RL_METHODS = ("ppo", "dpo", "none")
PAIR_RULES = ("best-worst", "divpo")
DATA = "../shared/data/writing_prompts"


@dataclass
class SplitSettings:
    """The split: one prompt-level split of the data into train, judge and eval prompts."""

    SECTION: ClassVar[str] = "split"
    eval_prompts: int = 100
    """Eval prompts (prompt groups). Taken from the data first, at most a quarter of its groups; the rest from
    Fan et al.'s prompts (fan_prompts.csv beside the data), detokenised, none of which is a data prompt."""
    judge_fraction: float = 0.2
    """Share of the data's prompt groups whose karma comparisons train the judge reward model."""
    seed: int = 42
    """Seeds the shuffle of prompt groups into parts."""

    def __post_init__(self):
        check_numbers(self)
        check_at_least(self, {"eval_prompts": 1})
        if not 0 < self.judge_fraction < 0.5:
            raise UserError(f"split.judge_fraction must lie in (0, 0.5), got {self.judge_fraction}")


@dataclass
class SFTSettings:
    """The SFT phase (`methods/sft.py`): fine-tune the start policy on stories before RL."""

    SECTION: ClassVar[str] = "sft"
    enabled: bool = True
    """Fine-tune before RL. SmolLM2-Instruct answers a prompt as an assistant; SFT teaches it to answer as a writer
    (docs/results.md: story share before and after)."""
    data: str = "human"
    """What SFT imitates: 'human', each train prompt's top-voted story; or 'best-of-N' (e.g. 'best-of-8'), the start
    policy's best of N samples by the task's reward (the reward model, plus reward_extra's terms; best-of-n
    distillation, one round of expert iteration): text the start policy itself writes, so the fine-tuned policy
    stays near it in KL."""
    examples: int = 384
    """Train prompts to fine-tune on, one example each (0 = all); also the prompts of DPO's pairs, one pair each."""
    max_length: int = 160
    """Tokens of chat template + prompt + story opening per SFT example: the opening is what PPO continues."""
    lr: float = 1e-4
    """Learning rate of the SFT phase."""
    epochs: int = 1
    """Passes of the SFT phase over its examples."""
    batch_size: int = 16
    """SFT examples per optimizer step."""
    eval_every: int = 8
    """Optimizer steps between the SFT phase's held-out loss and samples."""
    samples: int = 2
    """Held-out prompts the SFT phase samples a response to at each evaluation, for the log."""

    def __post_init__(self):
        check_numbers(self, non_negative=("lr",))
        check_at_least(self, {"examples": 0, "max_length": 32, "epochs": 1, "batch_size": 1, "eval_every": 1,
                              "samples": 0})
        if not self.lr > 0:
            raise UserError(f"sft.lr must be > 0, got {self.lr}; set --sft-lr")
        self.best_of  # parses, or names the problem

    @property
    def best_of(self) -> int:
        """N of data 'best-of-N'; 0 for 'human'."""
        if self.data == "human":
            return 0
        n = self.data[len("best-of-"):]
        if not self.data.startswith("best-of-") or not n.isdigit() or int(n) < 2:
            raise UserError(f"sft.data must be 'human' or 'best-of-N' with N >= 2 (e.g. best-of-8), got {self.data!r}")
        return int(n)


@dataclass
class RewardSettings:
    """A reward model trained on karma comparisons (`rewards/reward_model.py`): the task's (rm) or the judge's."""

    SECTION: ClassVar[str] = "rm"
    examples: int = 6000
    """Karma comparisons (of train prompts) the reward model trains on; `rm train`'s recipe otherwise."""
    val_fraction: float = 0.05
    """Share of its prompts held out of its training to state its accuracy."""
    pairs_per_prompt: int = 20
    """Karma pairs a prompt (0 = every qualifying pair) in the split's comparisons it trains on; 20 is the shared
    data's own cap."""

    def __post_init__(self):
        check_numbers(self)
        check_at_least(self, {"examples": 0, "pairs_per_prompt": 0})
        if not 0 < self.val_fraction < 0.5:
            raise UserError(f"{self.SECTION}.val_fraction must lie in (0, 0.5), got {self.val_fraction}")


@dataclass
class JudgeSettings(RewardSettings):
    """The judge reward model: trained on the judge prompts' karma comparisons, never on anything a policy trains on."""

    SECTION: ClassVar[str] = "judge"
    examples: int = 6000
    """Karma comparisons (of judge prompts) the judge reward model trains on."""
    val_fraction: float = 0.15
    """Share of judge prompts held out of the judge's training to state its accuracy."""


@dataclass
class DPOSettings:
    """The DPO phase (`methods/dpo.py`, --rl dpo): pairs of the RL start policy's own samples."""

    SECTION: ClassVar[str] = "dpo"
    samples: int = 16
    """DPO's pairs: for each of sft.examples train prompts, the best and the worst of this many samples of the RL
    start policy by the task's reward: one round of Dong et al. 2024's iterative DPO ("RLHF Workflow: From Reward
    Modeling to Online RLHF", best-of-n against worst-of-n by a reward model; DPO is Rafailov et al. 2023)."""
    beta: float = 0.1
    """DPO's β: the strength of the implicit KL penalty to the RL start policy (eq. 7)."""
    lr: float = 5e-6
    """Learning rate of the DPO phase."""
    epochs: int = 2
    """Passes of the DPO phase over its pairs."""
    batch_size: int = 8
    """Pairs per optimizer step of the DPO phase."""
    max_prompt_length: int = 256
    """Prompt tokens DPO reads (the instruction included); a longer prompt keeps its end."""
    response_slack: int = 16
    """Response tokens DPO reads beyond response_length: a sampled response's text, tokenized again, can take a few
    more tokens than were sampled."""
    eval_every: int = 12
    """Optimizer steps between the DPO phase's held-out accuracy checks."""
    pairs: str = "best-worst"
    """How a prompt's samples make its pair: 'best-worst' (the task reward's best against its worst) or 'divpo'
    (Lanchantin et al. 2025, "Diverse Preference Optimization", sec. 3: chosen = the most diverse sample whose
    reward is in the top divpo_quantile of the prompt's samples, rejected = the least diverse of the rest;
    diversity = mean MiniLM embedding distance to the prompt's other samples)."""
    divpo_quantile: float = 0.5
    """DivPO's quality threshold: the share of a prompt's samples, best first by the task's reward, that may be
    chosen."""

    def __post_init__(self):
        check_numbers(self)
        check_at_least(self, {"samples": 2, "epochs": 1, "batch_size": 1, "max_prompt_length": 8, "response_slack": 0,
                         "eval_every": 1})  # fmt: skip
        if self.pairs not in PAIR_RULES:
            raise UserError(f"dpo.pairs must be one of {', '.join(PAIR_RULES)}, got {self.pairs!r}")
        if not 0 < self.divpo_quantile < 1:
            raise UserError(f"dpo.divpo_quantile must lie in (0, 1), got {self.divpo_quantile}")
        for name in ("beta", "lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"dpo.{name} must be > 0, got {getattr(self, name)}; set --dpo-{name}")


@dataclass
class PPOSettings:
    """The PPO phase (`methods/ppo.py`, --rl ppo): online against the task's reward, adaptive KL to the RL start."""

    SECTION: ClassVar[str] = "ppo"
    steps: int = 40
    """Steps of the PPO phase."""
    batch_size: int = 16
    """PPO episodes per step."""
    minibatches: int = 2
    """Optimizer steps per PPO epoch; each sees batch_size / minibatches episodes."""
    epochs: int = 2
    """Passes of the PPO phase over each rollout batch."""
    lr: float = 1e-5
    """Learning rate of the PPO phase (policy and value model)."""
    kl_coef: float = 0.2
    """Initial KL penalty β (adaptive towards kl_target). A first run with β 0.05, target 8 and lr 2e-5 found the
    reward model's weakness within 15 steps: repeated lines of dialogue ("Oh, I'm here!" x 6), which both reward
    models score 2-3 standard deviations above the human stories, at KL 7-10 nats (docs/results.md)."""
    kl_target: float = 4.0
    """Adaptive-KL target, nats per response, KL to the SFT policy."""
    score_clip: float | None = None
    """Clip the reward model's scores to [-score_clip, score_clip] (None = off). The reward model is normalised on
    human stories (mean 0, std 1); PPO's gamed samples score 3-6, far outside what it saw, so a clip near 1.5 stops
    paying for going there. Not yet measured (docs/results.md)."""
    checkpoint_every: int = 5
    """PPO steps between checkpoints (a killed phase resumes from the last)."""
    sample_every: int = 5
    """PPO steps between the samples written to ppo/samples.jsonl."""

    def __post_init__(self):
        check_numbers(self, non_negative=("kl_coef",))
        check_at_least(self, {"steps": 1, "batch_size": 2, "minibatches": 1, "epochs": 1, "checkpoint_every": 1,
                         "sample_every": 1})  # fmt: skip
        if self.batch_size % self.minibatches:
            raise UserError(f"ppo.batch_size {self.batch_size} is not divisible by ppo.minibatches {self.minibatches}; "
                            f"pick a multiple of {self.minibatches}")  # fmt: skip
        for name in ("lr", "kl_target"):
            if not getattr(self, name) > 0:
                raise UserError(f"ppo.{name} must be > 0, got {getattr(self, name)}; set --ppo-{name.replace('_', '-')}")


@dataclass
class EvalSettings:
    """The best-of-n baselines and the evaluation: every side on the eval prompts by every judge."""

    SECTION: ClassVar[str] = "eval"
    best_of: str = "4,16"
    """Best-of-n baselines from the RL start policy, with the reward model choosing; one pool of the largest n."""
    batch_size: int = 32
    """Prompts per sampling batch in evaluation (its samples are the same for the same batch size and seed)."""
    diversity_prompts: int = 50
    """Eval prompts on which each policy draws diversity_samples more responses, for the spread of its answers to
    one prompt (mean pairwise MiniLM embedding distance); 0 = not measured."""
    diversity_samples: int = 4
    """Responses per prompt for that spread (k)."""
    equal_words: int = 100
    """distinct-n at equal length: every side's responses cut to their first equal_words words, so a side does not
    look more diverse for stopping sooner."""

    def __post_init__(self):
        check_numbers(self)
        check_at_least(self, {"batch_size": 1, "diversity_prompts": 0, "diversity_samples": 2, "equal_words": 1})
        self.best_of_ns  # parses, or names the problem

    @property
    def best_of_ns(self) -> list[int]:
        try:
            ns = sorted({int(x) for x in self.best_of.split(",") if x.strip()})
        except ValueError:
            raise UserError(f"eval.best_of must be comma-separated integers such as '4,16', got {self.best_of!r}") from None
        if not ns or ns[0] < 2:
            raise UserError(f"eval.best_of needs integers >= 2 (e.g. '4,16'), got {self.best_of!r}")
        return ns


@dataclass
class StoriesConfig:
    """`wprlhf stories`. Defaults: whole stories (docs/stories.md); examples/stories.yaml is the measured recipe of
    docs/results.md (whole stories, 60 minutes on 2 CPU cores from cached reward models), examples/openings.yaml
    the first result's (64-token openings).

    Each phase's settings are a section (`sft`, `rm`, `judge`, `dpo`, `ppo`, `eval`, and `split`): a block of a
    --config file (`ppo: {steps: 40}`) and flags --SECTION-FIELD (`--ppo-steps 40`)."""

    # Flat keys and flags of earlier versions -> where they live now: old config files, old runs' saved settings
    # and old flags (kept as aliases) still mean what they meant.
    RENAMED: ClassVar[dict[str, str]] = {
        "eval_prompts": "split.eval_prompts", "judge_fraction": "split.judge_fraction", "split_seed": "split.seed",
        "sft": "sft.enabled", "sft_data": "sft.data", "sft_examples": "sft.examples", "sft_max_length": "sft.max_length",
        "sft_lr": "sft.lr", "sft_epochs": "sft.epochs", "sft_batch_size": "sft.batch_size",
        "rm_examples": "rm.examples", "judge_examples": "judge.examples", "judge_val_fraction": "judge.val_fraction",
        "dpo_samples": "dpo.samples", "dpo_beta": "dpo.beta", "dpo_lr": "dpo.lr", "dpo_epochs": "dpo.epochs",
        "dpo_batch_size": "dpo.batch_size", "dpo_max_prompt_length": "dpo.max_prompt_length",
        "ppo_steps": "ppo.steps", "batch_size": "ppo.batch_size", "ppo_minibatches": "ppo.minibatches",
        "ppo_epochs": "ppo.epochs", "lr": "ppo.lr", "kl_coef": "ppo.kl_coef", "kl_target": "ppo.kl_target",
        "score_clip": "ppo.score_clip", "best_of": "eval.best_of", "eval_batch_size": "eval.batch_size",
    }  # fmt: skip

    data: str = DATA
    """Karma-scored stories: a directory holding prompt_responses.csv.gz (and optionally fan_prompts.csv), a
    responses file, or a hub id (rewardsignal/reddit_writing_prompts: only when named; nothing is downloaded
    otherwise)."""
    policy: str = "smollm2"
    """The start policy ('smollm2' is SmolLM2-135M-Instruct as shipped): SFT starts from it, and every KL in the
    report is measured to it."""
    reward_model: str = "minilm"
    """Backbone of the reward model and of the judge: 'minilm' (embedded all-MiniLM-L6-v2), 'tiny' (tests), a
    directory or a hub id."""
    rl: str = "ppo"
    """The RL phase after SFT: 'ppo' (online, against the task's reward), 'dpo' (offline, on pairs of the SFT
    policy's own samples ranked by the task's reward) or 'none' (the SFT policy is the final one)."""
    response_length: int = 320
    """The cap on every response's tokens, in the pools, PPO, best-of-n and evaluation alike (320 tokens ~ 240
    words). The policy ends its story itself (end-of-turn); one that reaches the cap is cut: not a whole story, so
    it is penalised (missing_eos_penalty) and counted (the report's truncated share)."""
    fixed_length: bool = False
    """Forbid end-of-turn before response_length tokens, so every response has exactly that many (the openings of
    the first results: length cannot decide a comparison)."""
    missing_eos_penalty: float = 2.0
    """Subtracted from the task's reward of a response cut at the cap (trl's name), wherever that reward ranks or
    trains: the DPO pools' pairs, best-of-n's choice, PPO. In the reward model's units (1 = the spread of its
    scores on human stories). 0 = cut responses are only counted."""
    rounds: int = 1
    """Rounds of iterative DPO (Xiong et al. 2024; Dong et al. 2024): round r + 1 samples its pool from round r's
    policy, on train prompts of its own, and trains from it with it as the reference (dpo-r2/, dpo-r3/, ...). Each
    round is a phase (resumable, timed) and every round's policy is evaluated. --rl dpo only."""
    temperature: float = 0.7
    """Sampling temperature of every phase (pools, PPO, best-of-n, evaluation)."""
    instruction: str = ""
    """Put before each prompt, with a blank line, in every policy's query (start, SFT, PPO, best-of-n, evaluation
    and its KL alike); '' = the bare prompt. Reward models, judges and relevance read the bare prompt. SmolLM2 as
    shipped answers a bare prompt as an assistant (docs/results.md: story share 44 %); told to write a story's opening
    it mostly does, so the start policy is a writer before any training and RL need not pay KL for the register."""
    reward_extra: str = ""
    """A reward SPEC (`rewards/spec.py`) added to the reward model's score in PPO and in best-of-n's choice, '' = none.
    E.g. '3.6*relevance+1.2*story': prompt relevance and the story rule, each weighted to about one standard
    deviation of the reward model's scores per standard deviation of its own. A karma reward model does not ask
    for the prompt to be followed; a reader does (docs/results.md). Relevance and the story rule are then trained on, so
    as judges they are no longer independent: the judge reward model and blind readers still are."""
    pool_batch_size: int = 64
    """Rows per sampling batch of the own-sample and best-of-n pools (64 rows = 4 prompts x 16 samples). On a 2-core
    AVX-512 BF16 CPU in bf16, 64 rows sampled 3.87 responses/s against 3.18 at 32 (128: 3.85), measured before each
    prompt's forward was shared by its samples: the weight matmuls run better on more rows."""
    split: SplitSettings = field(default_factory=SplitSettings)
    sft: SFTSettings = field(default_factory=SFTSettings)
    rm: RewardSettings = field(default_factory=RewardSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    ppo: PPOSettings = field(default_factory=PPOSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    cache_dir: str = ""
    """Where the SFT policy and the reward models are cached across runs ('' = $WPRLHF_CACHE/stories, else
    ~/.cache/wprlhf/stories; 'none' = train them inside the run directory every time)."""
    seed: int = 0
    """Seeds every phase: the samples, the models' initialisation and the training order (the split has split.seed)."""
    device: str = "auto"
    """'auto' (a GPU where there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    mixed_precision: str = "auto"
    """'auto' (bf16 where it is faster), 'no', 'bf16' or 'fp16': training forwards of SFT, reward models, PPO and
    DPO, and the sampling of the best-of-n and own-sample pools (evaluation samples and measures KL in fp32)."""

    def __post_init__(self):
        check_mixed_precision(self.mixed_precision)
        check_numbers(self, non_negative=("temperature", "missing_eos_penalty"))
        check_at_least(self, {"response_length": 1, "pool_batch_size": 1})
        if self.rl not in RL_METHODS:
            raise UserError(f"rl must be one of {', '.join(RL_METHODS)}, got {self.rl!r}")
        if self.rl == "none" and not self.sft.enabled:
            raise UserError("--rl none with --no-sft trains nothing; choose --rl ppo or dpo, or an SFT phase")
        if not self.temperature > 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}; set --temperature")
        check_at_least(self, {"rounds": 1})
        if self.rounds > 1 and self.rl != "dpo":
            raise UserError(f"--rounds {self.rounds} is iterative DPO: it needs --rl dpo (got --rl {self.rl})")

    @property
    def rl_phases(self) -> list[str]:
        """The RL phases in order: 'dpo', then 'dpo-r2' .. one per round; 'ppo'; none for --rl none."""
        if self.rl == "dpo":
            return ["dpo"] + [f"dpo-r{r}" for r in range(2, self.rounds + 1)]
        return ["ppo"] if self.rl == "ppo" else []

    @property
    def min_response_length(self) -> int:
        return self.response_length if self.fixed_length else 0


# A run in minutes on 2 cores, for the test and for trying the command: tiny sizes everywhere.
QUICK = {"response_length": 24, "pool_batch_size": 8, "split": {"eval_prompts": 8},
         "sft": {"examples": 16, "max_length": 96, "batch_size": 8}, "rm": {"examples": 64}, "judge": {"examples": 64},
         "ppo": {"steps": 2, "batch_size": 4}, "eval": {"best_of": "2,4", "batch_size": 8}}  # fmt: skip


def task_reward(config: StoriesConfig, rm_dir: str):
    """What PPO maximises and best-of-n chooses by: the reward model's score of (prompt, response), plus
    config.reward_extra's terms when it names any. It reads the bare prompt: the instruction is the policy's alone
    (it travels in the generation and training configs, `generation.instructed`)."""
    from ..rewards.reward_model import reward_fn_from_model
    from ..rewards.spec import load_reward

    karma = reward_fn_from_model(rm_dir)
    if not config.reward_extra.strip():
        return karma
    extra = load_reward(config.reward_extra, "reward_extra")

    def total(prompts: list[str], responses: list[str]) -> list[float]:
        return [a + b for a, b in zip(karma(prompts, responses), extra(prompts, responses), strict=True)]

    return total


def sft_settings(config: StoriesConfig, data: str | Path, precision: str):
    """The SFTConfig of the task's SFT phase: config.sft's settings, from the start policy, on `data`'s prompts."""
    from ..methods.sft import SFTConfig

    return SFTConfig(policy=config.policy, data=str(data), top_ranked_only=1, instruction=config.instruction,
                     max_examples=config.sft.examples, max_length=config.sft.max_length, epochs=config.sft.epochs,
                     batch_size=config.sft.batch_size, gradient_accumulation_steps=_accumulation(config.sft.batch_size),
                     lr=config.sft.lr, eval_every=config.sft.eval_every, n_samples=config.sft.samples,
                     sample_tokens=config.response_length, seed=config.seed, device=config.device,
                     mixed_precision=precision)  # fmt: skip


def dpo_settings(config: StoriesConfig, policy: str, precision: str):
    """The DPOConfig of the task's DPO phase: config.dpo's settings, from `policy` (the RL start policy)."""
    from ..methods.dpo import DPOConfig

    return DPOConfig(policy=policy, instruction=config.instruction, beta=config.dpo.beta, lr=config.dpo.lr,
                     epochs=config.dpo.epochs, batch_size=config.dpo.batch_size,
                     max_prompt_length=config.dpo.max_prompt_length,
                     max_response_length=config.response_length + config.dpo.response_slack,
                     eval_every=config.dpo.eval_every, seed=config.seed, device=config.device,
                     mixed_precision=precision)  # fmt: skip


def check_phase_settings(config: StoriesConfig) -> None:
    """Build each phase's own config now, so a setting one of them refuses (PPO's score_clip, its temperature floor,
    an instruction in the chat template's markup) fails before any work, not after an hour of SFT."""
    from ..generation import check_instruction
    from ..models import load_tokenizer

    precision = run_precision(config)
    if config.sft.enabled:
        sft_settings(config, config.data, precision)
    if config.rl == "dpo":
        dpo_settings(config, config.policy, precision)
    if config.rl == "ppo":
        ppo_settings(config, config.policy)
    if config.instruction:
        check_instruction(load_tokenizer(config.policy), config.instruction)


def ppo_settings(config: StoriesConfig, policy: str, steps: int | None = None):
    """The PPOConfig of the task's PPO phase, from `policy` (the SFT policy's directory in a run): batch_size episodes
    a step in ppo.minibatches minibatches x ppo.epochs epochs, responses of at most response_length tokens (exactly,
    with fixed_length; a cut one loses missing_eos_penalty), adaptive KL.
    `steps` replaces config.ppo.steps (benchmarks/bench_stories.py times a few)."""
    from ..methods.onpolicy_config import PPOConfig

    return PPOConfig(policy=policy, reward="stories: the reward model", instruction=config.instruction,
                     steps=steps or config.ppo.steps,
                     batch_size=config.ppo.batch_size, num_minibatches=config.ppo.minibatches, ppo_epochs=config.ppo.epochs,
                     response_length=config.response_length, min_response_length=config.min_response_length,
                     temperature=config.temperature, lr=config.ppo.lr, kl_coef=config.ppo.kl_coef, kl_target=config.ppo.kl_target,
                     score_clip=config.ppo.score_clip, checkpoint_every=config.ppo.checkpoint_every,
                     missing_eos_penalty=0.0 if config.fixed_length else config.missing_eos_penalty,
                     sample_every=config.ppo.sample_every, seed=config.seed,
                     device=config.device, mixed_precision=config.mixed_precision)  # fmt: skip


# ==========================================================================================================
# the split


def _fan_prompts(data: str) -> list[tuple[str, str]]:
    """(prompt, story) rows of fan_prompts.csv beside the data, prompts detokenised; [] when there is none."""
    path = Path(data) / "fan_prompts.csv"
    if not path.is_file():
        return []
    rows = read_rows(path, ("prompt", "story"))
    return [(clean_prompt(r["prompt"]), r["story"]) for r in rows if r.get("prompt") and r.get("story")]


def split_prompts(responses: list[Response], config: StoriesConfig) -> dict:
    """{'train', 'judge', 'eval'}: prompt lists; 'eval_stories', a human story for each eval prompt; 'eval_least',
    its least-voted story (None where the prompt has one ranked story, or comes from Fan et al.).

    Groups of prompts with one `prompt_key` (reposts) fall on one side. Groups are ordered by their smallest
    prompt_id, shuffled with random.Random(split_seed); the first go to eval (at most a quarter of the groups),
    the next judge_fraction to judge, the rest to train. Eval is topped up to eval_prompts from Fan et al.'s
    prompts whose key is no data prompt's. A human story of an eval prompt is its top-karma one (Fan's own story).
    """
    groups: dict[str, list[Response]] = {}
    for r in responses:
        groups.setdefault(prompt_key(r.prompt), []).append(r)
    order = sorted(groups, key=lambda k: min((r.prompt_id or r.prompt) for r in groups[k]))
    random.Random(config.split.seed).shuffle(order)
    n_eval = min(config.split.eval_prompts, len(order) // 4)
    n_judge = max(1, round(config.split.judge_fraction * len(order)))
    if n_eval < 1 or len(order) - n_eval - n_judge < 1:
        raise UserError(f"{config.data} has {len(order)} distinct prompts: too few for train, judge and eval parts "
                        "(eval takes at most a quarter); it needs at least 4, and many more for a result")  # fmt: skip
    parts = {"eval": order[:n_eval], "judge": order[n_eval : n_eval + n_judge], "train": order[n_eval + n_judge :]}

    def prompts_of(keys):
        return [p for k in keys for p in dict.fromkeys(r.prompt for r in groups[k])]

    split = {name: prompts_of(keys) for name, keys in parts.items()}
    def rank(r: Response) -> int:  # rank 0 is a thread's top-karma story; unranked ones come last
        return r.rank if r.rank is not None else 10**9

    top: dict[str, Response] = {}  # each eval prompt's top-karma story
    least: dict[str, Response] = {}  # and its least-voted ranked one (the lowest place of its thread)
    for r in (r for k in parts["eval"] for r in groups[k]):
        if r.prompt not in top or rank(r) < rank(top[r.prompt]):
            top[r.prompt] = r
        if r.rank is not None and (r.prompt not in least or r.rank > least[r.prompt].rank):
            least[r.prompt] = r
    split["eval_stories"] = [top[p].response for p in split["eval"]]
    split["eval_least"] = [least[p].response if p in least and least[p] is not top[p] else None for p in split["eval"]]
    split["eval_source"] = ["data"] * len(split["eval"])
    _top_up_from_fan(split, config, set(groups), len(parts["eval"]))
    return split


def _top_up_from_fan(split: dict, config: StoriesConfig, taken: set[str], n_groups: int) -> None:
    """Eval prompts from Fan et al.'s (with their stories) until split.eval_prompts groups, each one whose key is no
    data prompt's; a note when the data has too few to spare. `taken`: the data's prompt keys."""
    for prompt, story in _fan_prompts(config.data):
        if n_groups >= config.split.eval_prompts:
            break
        if prompt_key(prompt) in taken:
            continue
        taken.add(prompt_key(prompt))
        n_groups += 1
        split["eval"].append(prompt)
        split["eval_stories"].append(story)
        split["eval_least"].append(None)  # Fan et al. give one story a prompt
        split["eval_source"].append("fan")
    if len(split["eval"]) < config.split.eval_prompts:
        print(f"note: {len(split['eval'])} eval prompts, fewer than --split-eval-prompts {config.split.eval_prompts}: "
              "the data has no more to spare", flush=True)  # fmt: skip


# ==========================================================================================================
# phases


# Settings each phase's output depends on: a resume that changes one of a finished phase is refused.
PHASE_SETTINGS = {  # a section's name stands for all its settings
    "split": ("data", "split", "rm.pairs_per_prompt", "judge.pairs_per_prompt"),
    "sft": ("policy", "sft", "seed", "instruction", "reward_extra"),
    "rm": ("reward_model", "rm", "seed"),
    "judge": ("reward_model", "judge", "seed"),
    "dpo": ("rl", "dpo", "sft.examples", "response_length", "fixed_length", "temperature", "instruction", "reward_extra",
            "missing_eos_penalty", "seed"),
    # ppo.steps may grow on a resume: a PPO phase stopped at its step count continues to the new one
    "ppo": ("rl", "response_length", "fixed_length", "temperature", "ppo.batch_size", "ppo.minibatches", "ppo.epochs",
            "ppo.lr", "ppo.kl_coef", "ppo.kl_target", "ppo.score_clip", "instruction", "reward_extra",
            "missing_eos_penalty"),
    "best_of": ("eval.best_of", "response_length", "fixed_length", "temperature", "instruction", "reward_extra",
                "missing_eos_penalty"),
    "eval": ("eval", "response_length", "fixed_length", "temperature", "instruction", "seed"),
}


# Inputs whose content a resume compares (`files.fingerprint`): a changed data set or model is refused.
INPUTS = ("data", "policy", "reward_model", "reward_extra")


def run(config: StoriesConfig, out_dir: str | Path, resume: bool = False, until: str = "",
        allow_changed_inputs: bool = False) -> dict:  # fmt: skip
    """Run (or resume) the pipeline into out_dir; returns the evaluation report (or {} when stopped early). A resume
    whose inputs (INPUTS) changed since the run started is refused unless allow_changed_inputs."""
    out_dir = Path(out_dir)
    check_phase_settings(config)
    if config.reward_extra.strip():  # a bad SPEC fails now, not after an hour of SFT and reward models
        from ..rewards.spec import load_reward

        load_reward(config.reward_extra, "reward_extra")
    phases = ("split", "rm", "judge", "sft", *(config.rl_phases if config.rl == "dpo" else ["dpo"]), "ppo", "best_of",
              "eval")  # fmt: skip
    runner = Runner(out_dir, STATE_FILE, "stories run", config, INPUTS, resume, allow_changed_inputs,
                    depends=lambda phase: PHASE_SETTINGS.get(phase.split("-r")[0], ()), phases=phases, until=until,
                    started=("ppo",) if (out_dir / "ppo" / "checkpoints").exists() else ())  # fmt: skip
    state, finish, wanted = runner.state, runner.finish, runner.wanted
    if "eval" in runner.done and any(p not in runner.done for p in config.rl_phases):  # --rounds grew on a resume
        runner.done.remove("eval")
    write_json_atomic(out_dir / "stories_config.json", dataclasses.asdict(config))

    if not Path(config.data).exists() and not is_hub_id(config.data):
        raise UserError(f"no writing-prompts data at {config.data}: pass --data DIR (a folder holding "
                        "prompt_responses.csv.gz) or a hub id (rewardsignal/reddit_writing_prompts, downloaded only "
                        "when named); without data, `wprlhf demo` runs the offline mock task")  # fmt: skip
    responses = load_responses(config.data)  # meta lines cleaned, as `rm train` reads them
    if not responses:
        raise UserError(f"{config.data} holds no stories; it needs rows of prompt_id, prompt, response_id, response")
    split_dir = out_dir / "split"
    # The precision each training runs in, resolved here so a cached model's key names the one it was trained in
    # ('auto' is bf16 on one CPU and fp32 on another).
    precision = run_precision(config)

    if wanted("split"):
        write_split(config, responses, split_dir)
        finish("split")
    train_prompts = load_prompts(split_dir / "train_prompts.txt")
    if (config.sft.enabled and config.sft.best_of) or config.rl == "dpo":
        from ..generation import instructed

        # The queries of the policy's own-sample pools (distillation's, DPO's), for a pool drawn elsewhere (own_pool).
        write_text_atomic(split_dir / "pool_queries.jsonl", "".join(
            json.dumps({"prompt": q}) + "\n" for q in instructed(pool_prompts(config, train_prompts), config.instruction)))  # fmt: skip

    for phase, settings in (("rm", config.rm), ("judge", config.judge)):
        if not wanted(phase):
            continue
        path = train_reward_model(config, out_dir, phase, f"{phase}_comparisons.jsonl", settings, precision)
        finish(phase, **{f"{phase}_dir": str(path)})

    if config.sft.enabled and wanted("sft"):
        finish("sft", sft_dir=str(train_sft(config, out_dir, state, responses, train_prompts, precision)))
    start_of_rl = state_sft_policy(state) if config.sft.enabled and "sft_dir" in state else config.policy

    for round_, phase in enumerate(config.rl_phases if config.rl == "dpo" else [], start=1):
        if wanted(phase):
            policy = start_of_rl if round_ == 1 else str(out_dir / config.rl_phases[round_ - 2] / "policy")
            train_dpo(config, out_dir, phase, round_, train_prompts, policy, state["rm_dir"], precision,
                      allow_changed_inputs)  # fmt: skip
            finish(phase)

    if wanted("ppo") and config.rl == "ppo":
        train_ppo(config, out_dir, state, train_prompts, start_of_rl, allow_changed_inputs)
        finish("ppo")

    if wanted("best_of"):
        own_pool(config, start_of_rl, load_prompts(split_dir / "eval_prompts.txt"), max(config.eval.best_of_ns),
                 state["rm_dir"], out_dir / "best_of" / "pool.jsonl", seed=config.seed + 20_000)  # fmt: skip
        finish("best_of")

    if wanted("eval"):
        report = evaluate_stories(config, out_dir, state)
        finish("eval")
        return report
    return {}


def write_split(config: StoriesConfig, responses: list, split_dir: Path) -> None:
    """The split phase: one prompt-level split into train, judge and eval prompts (`split_prompts`), the eval
    prompts' human stories, and the karma comparisons of the train prompts (the task's reward model) and of the
    judge prompts (the judge's)."""
    split = split_prompts(responses, config)
    for part in ("train", "judge", "eval"):
        write_text_atomic(split_dir / f"{part}_prompts.txt", "".join(p + "\n" for p in split[part]))
    write_text_atomic(split_dir / "eval_stories.jsonl", "".join(
        json.dumps({"prompt": p, "response": s, "least": least, "source": src}) + "\n"
        for p, s, least, src in zip(split["eval"], split["eval_stories"], split["eval_least"], split["eval_source"])))  # fmt: skip
    by_part = {part: {prompt_key(p) for p in split[part]} for part in ("train", "judge")}
    for part, name, settings in (("train", "rm_comparisons.jsonl", config.rm),
                                 ("judge", "judge_comparisons.jsonl", config.judge)):  # fmt: skip
        pairs = karma_pairs([r for r in responses if prompt_key(r.prompt) in by_part[part]],
                            max_pairs_per_prompt=settings.pairs_per_prompt or None)  # fmt: skip
        write_comparisons(split_dir / name, pairs)
    counts = {part: len(split[part]) for part in ("train", "judge", "eval")}
    counts["eval_from_fan"] = split["eval_source"].count("fan")
    write_json_atomic(split_dir / "split.json", {**counts, "data": config.data, "seed": config.split.seed})
    print(f"split: {counts['train']} train, {counts['judge']} judge, {counts['eval']} eval prompts "
          f"({counts['eval_from_fan']} of them Fan et al.'s)", flush=True)  # fmt: skip


def train_reward_model(config: StoriesConfig, out_dir: Path, phase: str, comparisons: str, settings: RewardSettings,
                       precision: str) -> Path:  # fmt: skip
    """The rm or judge phase: a reward model on split/`comparisons` (the train prompts' karma pairs, or the judge
    prompts') with its section's settings, from the cache when one was trained on the same text and settings.
    Returns its directory."""
    from ..rewards.reward_model import RewardConfig
    from ..rewards.reward_model import train as rm_train

    split_dir = out_dir / "split"
    rm_config = RewardConfig(data=str(split_dir / comparisons), model=config.reward_model,
                             max_examples=settings.examples, val_fraction=settings.val_fraction, keep_meta=False, seed=config.seed, device=config.device,
                             mixed_precision=precision)  # fmt: skip
    text = (split_dir / comparisons).read_text(encoding="utf-8")
    key = model_key(text, dataclasses.asdict(rm_config) | {"data": ""})
    return build_cached(cache_root(config.cache_dir), out_dir, phase, key, "eval-heldout.json", lambda d: rm_train(rm_config, d))


def train_sft(config: StoriesConfig, out_dir: Path, state: dict, responses: list, train_prompts: list[str],
              precision: str) -> Path:  # fmt: skip
    """The sft phase: SFT on the train prompts' top stories (or, with sft_best_of, the start policy's best-of-n
    samples by the task's reward), from the cache when trained before on the same text. Returns its directory."""
    from ..methods.sft import train as sft_train

    split_dir = out_dir / "split"
    train_keys = {prompt_key(p) for p in train_prompts}
    stories = [r for r in responses if prompt_key(r.prompt) in train_keys]
    if config.sft.best_of:
        prompts = pool_prompts(config, train_prompts)
        print(f"sft: {config.sft.best_of} samples of the start policy for each of {len(prompts)} train prompts, "
              "the task's reward keeps the best (best-of-n distillation)", flush=True)  # fmt: skip
        pool = own_pool(config, config.policy, prompts, config.sft.best_of, state["rm_dir"],
                        split_dir / "sft_best_of.jsonl", seed=config.seed + 60_000)  # fmt: skip
        stories = [Response(prompt_id=str(i), prompt=p, response_id=f"best-{i}", response=text, rank=0)
                   for i, (p, text) in enumerate(zip(prompts, pool.best(config.sft.best_of)[0]))]  # fmt: skip
    sft_config = sft_settings(config, split_dir / "train_prompts.txt", precision)
    key = model_key([(r.prompt, r.response, r.rank) for r in stories], dataclasses.asdict(sft_config) | {"data": ""})
    return build_cached(cache_root(config.cache_dir), out_dir, "sft", key, "eval.json", lambda d: sft_train(sft_config, d, stories=stories))


def train_dpo(config: StoriesConfig, out_dir: Path, phase: str, round_: int, train_prompts: list[str], policy: str,
              rm_dir: str, precision: str, allow_changed_inputs: bool) -> None:  # fmt: skip
    """A DPO round (phase 'dpo', 'dpo-r2', ...): dpo.samples of `policy`'s own samples for each of its train
    prompts, scored by the task's reward; each prompt's pair by dpo.pairs (`dpo_pairs`); DPO from `policy`, which
    is also its reference (resuming its checkpoints). Round 1's policy is the RL start, round r's is round r-1's."""
    from ..methods.dpo import train as dpo_train

    dpo_dir = out_dir / phase
    prompts = pool_prompts(config, train_prompts, round_)
    print(f"{phase}: {config.dpo.samples} samples of {policy} for each of {len(prompts)} train prompts; pairs by "
          f"{config.dpo.pairs}", flush=True)  # fmt: skip
    stats_file, sampled = dpo_dir / "pool_stats.json", not (dpo_dir / "pool.jsonl").exists()
    clock = time.perf_counter()
    pool = own_pool(config, policy, prompts, config.dpo.samples, rm_dir, dpo_dir / "pool.jsonl",
                    seed=config.seed + 70_000 * round_)  # fmt: skip
    pairs = dpo_pairs(config, pool)
    # The pool's time apart from the round's training (benchmarks/bench_limits.py reads it); a resume that reads
    # the pool back keeps the time it took when it was drawn.
    before = json.loads(stats_file.read_text()) if stats_file.exists() and not sampled else {}
    pool_s = round(time.perf_counter() - clock, 1) if sampled else before.get("pool_s")
    write_json_atomic(stats_file, pool_stats(pool, pairs) | ({"pool_s": pool_s} if pool_s is not None else {}))
    dpo_train(dpo_settings(config, policy, precision), dpo_dir, comparisons=pairs,
              resume=_continue_or_start_over(dpo_dir), allow_changed_inputs=allow_changed_inputs)  # fmt: skip


def dpo_pairs(config: StoriesConfig, pool: Pool) -> list:
    """One pair per prompt of the pool (chosen first), by config.dpo.pairs; a prompt whose chosen response does not
    outscore its rejected one gives none.

    best-worst: the task reward's best and worst. divpo (Lanchantin et al. 2025, Algorithm 1): the samples are split
    by reward into the top divpo_quantile (at least one) and the rest; chosen = the most diverse of the top,
    rejected = the least diverse of the rest, diversity being a sample's mean embedding distance to the prompt's
    other samples (`measures.pairwise_distance`'s cosine distance, MiniLM)."""
    from ..data import Comparison

    if config.dpo.pairs == "best-worst":
        picks = list(zip(pool.scores.argmax(1), pool.scores.argmin(1)))
    else:
        picks = _divpo_picks(pool, config.dpo.divpo_quantile)
    return [Comparison(prompt=p, responses=[rs[c], rs[r]], best=0, prompt_id=str(i))
            for i, (p, rs, (c, r)) in enumerate(zip(pool.prompts, pool.responses, picks))
            if pool.scores[i, c] > pool.scores[i, r]]  # fmt: skip


def _divpo_picks(pool: Pool, quantile: float) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices per prompt by DivPO's rule (`dpo_pairs`)."""
    import torch

    from ..rewards.judges import Relevance

    n = pool.scores.shape[1]
    top = max(1, min(n - 1, round(quantile * n)))  # both sets non-empty
    vectors = Relevance().embed([r for rs in pool.responses for r in rs]).reshape(len(pool.prompts), n, -1)
    picks = []
    for scores, v in zip(pool.scores, vectors):
        spread = (1 - v @ v.T).sum(1) / (n - 1)  # (n,) mean distance to the other samples
        order = np.argsort(-scores, kind="stable")
        good, bad = order[:top], order[top:]
        picks.append((int(good[torch.argmax(spread[good])]), int(bad[torch.argmin(spread[bad])])))
    return picks


def pool_stats(pool: Pool, pairs: list) -> dict:
    """A pool's lengths and cut share, and its pairs' (pool_stats.json beside each DPO round's pool)."""
    words = np.asarray([[len(r.split()) for r in rs] for rs in pool.responses], dtype=np.float64)
    out = {"prompts": len(pool.prompts), "samples": int(words.size), "pairs": len(pairs),
           "words": length_summary(words.ravel()),
           "chosen_words": length_summary([len(c.responses[0].split()) for c in pairs]),
           "rejected_words": length_summary([len(c.responses[1].split()) for c in pairs])}  # fmt: skip
    if pool.finished is not None:
        out["cut_share"] = float(1 - np.mean(pool.finished))
        chosen = {(c.prompt, c.responses[0]) for c in pairs}
        done = {(p, r): f for p, rs, fs in zip(pool.prompts, pool.responses, pool.finished) for r, f in zip(rs, fs)}
        out["chosen_cut_share"] = float(np.mean([not done[k] for k in chosen])) if chosen else 0.0
    return out


def length_summary(lengths) -> dict:
    """Mean and the 10th, 50th and 90th percentiles of lengths (words or tokens)."""
    x = np.asarray(lengths, dtype=np.float64)
    if not x.size:
        return {}
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {"mean": float(x.mean()), "p10": float(p10), "p50": float(p50), "p90": float(p90)}


def train_ppo(config: StoriesConfig, out_dir: Path, state: dict, train_prompts: list[str], start_of_rl: str,
              allow_changed_inputs: bool) -> None:  # fmt: skip
    """The ppo phase: PPO on the train prompts against the task's reward, the judge logged beside it (never
    trained on); a killed PPO resumes from its checkpoints."""
    from ..methods.ppo import train as ppo_train
    from ..rewards.reward_model import reward_fn_from_model

    ppo_config = ppo_settings(config, start_of_rl)
    ppo_dir = out_dir / "ppo"
    ppo_train(ppo_config, train_prompts, task_reward(config, state["rm_dir"]), ppo_dir,
              resume=_continue_or_start_over(ppo_dir),
              allow_changed_inputs=allow_changed_inputs, judge_fn=reward_fn_from_model(state["judge_dir"]))  # fmt: skip


def sampling(config: StoriesConfig):
    """The GenerationConfig of the pools and of evaluation: response_length tokens (exactly, with fixed_length) at
    the run's temperature, each prompt read after the instruction."""
    from ..generation import generation_config

    return generation_config(None, response_length=config.response_length, instruction=config.instruction,
                             min_response_length=config.min_response_length, temperature=config.temperature)


def _continue_or_start_over(phase_dir: Path) -> bool:
    """Whether an RL phase continues from its checkpoints (True) or starts (False). A phase stopped before its first
    checkpoint has nothing to continue from: the metrics and samples of those steps go (its own-sample pool stays),
    so the phase starts over, as any unfinished phase does."""
    import shutil

    if (phase_dir / "checkpoints").exists():
        return True
    if (phase_dir / "metrics.csv").exists():
        print(f"note: {phase_dir} stopped before its first checkpoint; the phase's training starts over", flush=True)
        for name in ("metrics.csv", "samples.jsonl"):
            (phase_dir / name).unlink(missing_ok=True)
        shutil.rmtree(phase_dir / "tb", ignore_errors=True)
    return False


def pool_prompts(config: StoriesConfig, train_prompts: list[str], round_: int = 1) -> list[str]:
    """The train prompts of the own-sample pools (best-of-n distillation's, DPO's): sft.examples of them, a choice
    seeded by config.seed. Round r of iterative DPO takes the next sft.examples of the same shuffle (fresh prompts
    while there are enough; it wraps round where there are not)."""
    n = config.sft.examples
    if not n or len(train_prompts) <= n:
        return list(train_prompts)
    first = random.Random(config.seed).sample(train_prompts, n)
    if round_ == 1:
        return first
    taken = set(first)
    rest = [p for p in train_prompts if p not in taken]
    random.Random(config.seed + 1).shuffle(rest)
    order = first + rest
    start = (n * (round_ - 1)) % len(order)
    return (order + order)[start : start + n]


def pool_autocast(config: StoriesConfig):
    """The autocast the pools are sampled under (None for fp32): config.mixed_precision resolved on config.device
    (rewards score outside it). Sampling the pools is most of a DPO or best-of-n run on a CPU, and bf16 does it about 1.7x faster
    where the CPU has AVX-512 BF16 (docs/results.md). Evaluation's own samples stay fp32."""
    import torch

    dtype = autocast_dtype(run_precision(config))
    return torch.autocast(resolve_device(config.device).type, dtype=dtype) if dtype is not None else None


def own_pool(config: StoriesConfig, policy: str, prompts: list[str], n: int, rm_dir: str, path: Path,
             seed: int) -> Pool:  # fmt: skip
    """n samples of `policy` for each prompt (asked after the instruction), scored by the task's reward: the pool that
    best-of-n distillation takes the best of, DPO the best and the worst, and the best-of-n baselines their picks
    (on the eval prompts).

    The scores are the task's reward less missing_eos_penalty for each response cut at the cap.

    The pool is written to `path` ({"prompt", "responses", "scores", "finished"} a line, bare prompts) and read back from it
    when it answers these prompts with n samples each, so a resumed run does not sample again. A pool put there
    before the phase, from `wprlhf sample -k n --prompts split/pool_queries.jsonl` (its prompts are the queries, and
    it has no scores), is scored and used instead of sampling here: sampling is most of the phase on a CPU, and a
    GPU does it in seconds (docs/stories.md). Anything else at `path` is sampled again, with a note."""
    from ..generation import instructed
    from ..methods.best_of import Pool, sample_pool
    from ..models import load_policy

    lines = [row for _, row in iter_jsonl(path)] if path.exists() else []
    queries = instructed(prompts, config.instruction)  # the prompts of a pool sampled elsewhere
    # A pool of bare prompts was asked with the instruction its rows name (none: the bare prompt).
    asked = all(r.get("instruction", "") == config.instruction for r in lines) or [r["prompt"] for r in lines] == queries
    usable = asked and [r["prompt"] for r in lines] in (prompts, queries) and all(len(r["responses"]) == n for r in lines)
    if usable and all("scores" in r for r in lines) and lines[0]["prompt"] == prompts[0]:
        return Pool.from_rows(prompts, lines)
    if usable:
        print(f"scoring the {len(lines)} x {n} samples of {path}", flush=True)
        pool = _scored_pool(config, rm_dir, prompts, [r["responses"] for r in lines], path)
    else:
        if lines:
            print(f"note: {path} does not hold {n} samples for each of these prompts, asked this way; sampling again",
                  flush=True)  # fmt: skip
        model, tokenizer = load_policy(policy, seed=config.seed)
        model.to(resolve_device(config.device))
        pool = sample_pool(model, tokenizer, prompts, n, task_reward(config, rm_dir), sampling(config), seed=seed,
                           batch_size=config.pool_batch_size, sampling_context=pool_autocast(config),
                           missing_eos_penalty=config.missing_eos_penalty)  # fmt: skip
    write_text_atomic(path, "".join(json.dumps({**row, "instruction": config.instruction}) + "\n" for row in pool.rows()))
    return pool


def _scored_pool(config: StoriesConfig, rm_dir: str, prompts: list[str], responses: list[list[str]], path: Path) -> Pool:
    """The pool of `responses` (n a prompt, sampled elsewhere and read from `path`) scored by the task's reward;
    UserError for a score missing or not finite."""
    from ..methods.best_of import Pool

    n = len(responses[0])
    scores = np.asarray(task_reward(config, rm_dir)([p for p in prompts for _ in range(n)],
                                                    [r for rs in responses for r in rs]), dtype=np.float64)  # fmt: skip
    if scores.shape != (len(prompts) * n,) or not np.isfinite(scores).all():
        raise UserError(f"the task's reward gave {scores.size} scores ({int((~np.isfinite(scores)).sum())} not "
                        f"finite) to the {len(prompts) * n} samples of {path}; check --reward-extra")  # fmt: skip
    return Pool(prompts, responses, scores.reshape(len(prompts), n))


def _accumulation(batch_size: int) -> int:
    """Micro-batches of 8 where the batch divides into them (the memory of 8 rows of 160 tokens), else one."""
    return batch_size // 8 if batch_size > 8 and batch_size % 8 == 0 else 1


# ==========================================================================================================
# evaluation


def cut_to(texts: list[str], words: list[int]) -> list[str]:
    """Each human story cut to the words of the policy's response it is compared with: at the last sentence end
    within the last third of that count (so it reads finished where it can), else at the count."""
    out = []
    for text, n in zip(texts, words):
        cut = text.split()[: max(n, 1)]
        ends = [i for i, w in enumerate(cut) if w.endswith((".", "!", "?", '."', '!"', '?"', "'"))]
        keep = ends[-1] + 1 if ends and ends[-1] + 1 >= len(cut) * 2 / 3 else len(cut)
        out.append(" ".join(cut[:keep]))
    return out


def evaluate_stories(config: StoriesConfig, out_dir: Path, state: dict) -> dict:
    """Every side on the eval prompts by every judge; writes eval/report.json, table.md, samples.md, pairs.jsonl,
    over_optimisation.png, and blind.db (for people: the final policy against the start, the largest best-of-n and
    both human stories).

    Sides (`eval_sides`): start, sft, best-of-n, longest-of-n (where lengths vary: the length-only baseline), every
    RL phase's policy (each DPO round), and two human sides: each eval prompt's top-voted ('human-top') and
    least-voted ('human-least', data prompts with two ranked stories) story, cut to the final policy's length on
    that prompt (`cut_to`), and 'looping' (`measures.looped`: each start response's opening repeated to its
    length), which with longest-of-n checks that the judge prefers neither a policy that only loops nor one that
    only runs long. Win rates: every side against the start, and the final policy against each other side; each
    with its length-controlled rate."""
    from ..evals.measures import looped
    from ..evals.side_by_side import judge_sides, prompt_ci
    from ..rewards.judges import Relevance
    from ..rewards.reward_model import reward_fn_from_model

    rows = [row for _, row in iter_jsonl(out_dir / "split" / "eval_stories.jsonl")]
    prompts = [r["prompt"] for r in rows]
    sides, kls, kl_to_sft, spreads = eval_sides(config, out_dir, state, prompts)
    texts = {name: side.texts for name, side in sides.items()}
    final = final_side(config, texts)
    words = [len(t.split()) for t in texts[final]]
    texts["human-top"] = cut_to([r["response"] for r in rows], words)
    texts["looping"] = looped(texts["start"])  # a check of the judge: it must not prefer a policy that only loops
    least = [i for i, r in enumerate(rows) if r.get("least")]  # the prompts that have a least-voted story
    judge = reward_fn_from_model(state["judge_dir"])
    print("eval: judges", flush=True)
    pairs = [(final, name) for name in texts if name not in (final, "start")]
    if config.sft.enabled:
        pairs += [(name, "sft") for name in sides if name not in ("start", "sft", final)]
    report = judge_sides(prompts, texts, judge, "start", relevance=Relevance(), kls=kls, pairs=pairs,
                         equal_words=config.eval.equal_words)  # fmt: skip
    if least:  # on the prompts that have one: the final policy against the least-voted human story
        human_least = cut_to([rows[i]["least"] for i in least], [words[i] for i in least])
        vs_least = judge_sides([prompts[i] for i in least], {final: [texts[final][i] for i in least],
                               "human-least": human_least}, judge, "human-least", relevance=Relevance(),
                               equal_words=config.eval.equal_words)  # fmt: skip
        report["sides"]["human-least"] = vs_least["sides"]["human-least"]
        report["win_rates"][f"{final} vs human-least"] = vs_least["win_rates"][f"{final} vs human-least"]
        by_prompt = dict(zip(least, human_least))
        texts["human-least"] = [by_prompt.get(i) for i in range(len(prompts))]  # None: no such story
    for name, spread in spreads.items():
        report["sides"][name]["spread"] = spread
    for name, side in sides.items():  # KL per response token, where the sampled tokens are known
        if side.ids is not None and name in kls:
            report["sides"][name]["kl_per_token"] = prompt_ci(
                [kl / max(len(ids), 1) for kl, ids in zip(kls[name], side.ids)], prompts)
    cut = {name: side.finished for name, side in sides.items() if side.finished is not None}
    add_run_facts(report, out_dir, state, prompts, texts, kl_to_sft, {} if config.fixed_length else cut)
    report.update(response_length=config.response_length, fixed_length=config.fixed_length, final=final)
    write_eval(config, out_dir, report, prompts, texts, final)
    return report


def final_side(config: StoriesConfig, sides: dict) -> str:
    """The side the run's result is about: the last RL phase's policy (the last DPO round, or PPO), else the SFT
    policy, else the largest best-of-n."""
    return next(name for name in (*reversed(config.rl_phases), "sft", f"best-of-{max(config.eval.best_of_ns)}")
                if name in sides)  # fmt: skip


def _best_of_pool(out_dir: Path, prompts: list[str]) -> Pool:
    """The best_of phase's pool of the eval prompts (best_of/pool.jsonl), which must answer `prompts` in order."""
    from ..methods.best_of import Pool

    lines = [row for _, row in iter_jsonl(out_dir / "best_of" / "pool.jsonl")]
    if [r["prompt"] for r in lines] != prompts:
        raise UserError(f"{out_dir}/best_of/pool.jsonl does not match split/eval_prompts.txt; rerun from best_of "
                        "(delete 'best_of' and 'eval' from stories_state.json)")  # fmt: skip
    return Pool.from_rows(prompts, lines)


def eval_sides(config: StoriesConfig, out_dir: Path, state: dict, prompts: list[str]) -> tuple:
    """(sides, KL of each to the start policy, KL of the RL sides to the SFT policy, spreads) on the eval prompts.

    start: the start policy's samples; sft: fresh samples of the SFT policy, drawn apart from the best-of-n pool,
    so best-of-n never meets its own sample; best-of-n: the pool's best by the task's reward; longest-of-n (where
    lengths vary): the pool's longest response, a policy rewarded for length alone (Singhal et al. 2023), the
    baseline a real improvement must beat; every RL phase's last-step policy. Sampled sides keep their token ids,
    which their KL is measured on. spreads: side -> the mean pairwise embedding distance of its
    eval.diversity_samples answers to each of the first eval.diversity_prompts prompts (`side_spreads`)."""
    from ..evals.sides import Side, sample_side, side_logprobs
    from ..models import load_policy

    pool, device, gen = _best_of_pool(out_dir, prompts), resolve_device(config.device), sampling(config)

    def draw(name, spec, seed):  # a policy's side, sampled on the eval queries; the model stays for its KL
        models[name] = load_policy(spec)[0].to(device)
        return sample_side(name, models[name], tokenizer, prompts, gen, seed, config.eval.batch_size)

    def logprobs(model, side):  # a sampled side by its token ids (its stop tokens' terms kept); best-of-n by its text
        return side_logprobs(sides[side], model, tokenizer, prompts, gen, config.eval.batch_size)

    start, tokenizer = load_policy(config.policy, seed=config.seed)
    models = {"start": start.to(device)}  # the sampled sides' policies
    sides = {"start": sample_side("start", start, tokenizer, prompts, gen, config.seed + 30_000, config.eval.batch_size)}
    if config.sft.enabled:
        sides["sft"] = draw("sft", state_sft_policy(state), config.seed + 50_000)
    words = np.asarray([[len(r.split()) for r in rs] for rs in pool.responses], dtype=np.float64)  # (P, n)
    pool_sides = [(f"best-of-{n}", n, None) for n in config.eval.best_of_ns]
    if not config.fixed_length:
        pool_sides.append((f"longest-of-{max(config.eval.best_of_ns)}", max(config.eval.best_of_ns), words))
    for name, n, by in pool_sides:
        picks = pool.picks(n, by)
        done = [pool.finished[p][i] for p, i in enumerate(picks)] if pool.finished is not None else None
        sides[name] = Side(name, [rs[i] for rs, i in zip(pool.responses, picks)], finished=done)
    for name in config.rl_phases:  # the RL policies, each DPO round's
        if (out_dir / name / "policy").exists():
            sides[name] = draw(name, str(out_dir / name / "policy"), config.seed + 40_000)
    kls, kl_to_sft = side_kls(config, sides, logprobs, models, len(prompts))
    return sides, kls, kl_to_sft, side_spreads(config, models, tokenizer, prompts, pool, gen)


def side_spreads(config: StoriesConfig, models: dict, tokenizer, prompts: list[str], pool: Pool, gen) -> dict:
    """side -> the mean pairwise cosine distance of MiniLM embeddings (`measures.pairwise_distance`) of k =
    eval.diversity_samples answers to each of the first eval.diversity_prompts eval prompts, with a CI over
    prompts: a diversity that does not reward stopping sooner. Each sampled policy draws its k answers here; the
    policy the best-of-n pool came from takes the pool's first k, and best-of-m (m * k <= the pool's n) the best of
    k disjoint groups of m."""
    from ..evals.measures import pairwise_distance
    from ..evals.side_by_side import prompt_ci
    from ..generation import generate_k
    from ..rewards.judges import Relevance

    m, k = min(config.eval.diversity_prompts, len(prompts)), config.eval.diversity_samples
    if not m:
        return {}
    groups: dict[str, list[list[str]]] = {}
    n = pool.scores.shape[1]
    pooled = "sft" if config.sft.enabled else "start"  # the policy the pool sampled
    if n >= k:
        groups[pooled] = [rs[:k] for rs in pool.responses[:m]]
    for best in config.eval.best_of_ns:
        if best * k <= n:
            groups[f"best-of-{best}"] = [[rs[g * best + int(np.argmax(sc[g * best : (g + 1) * best]))] for g in range(k)]
                                         for rs, sc in zip(pool.responses[:m], pool.scores[:m])]  # fmt: skip
    for name, model in models.items():
        if name not in groups:
            print(f"eval: {k} answers of {name} to {m} prompts, for their spread", flush=True)
            groups[name] = generate_k(model, tokenizer, prompts[:m], k, gen, seed=config.seed + 60_000,
                                      batch_size=config.eval.batch_size)  # fmt: skip
    encoder = Relevance()
    out = {}
    for name, answers in groups.items():
        vectors = encoder.embed([a for group in answers for a in group]).reshape(m, k, -1)
        out[name] = prompt_ci([pairwise_distance(v) for v in vectors], prompts[:m])
    return out


def add_run_facts(report: dict, out_dir: Path, state: dict, prompts: list[str], sides: dict[str, list],
                  kl_to_sft: dict, finished: dict[str, list[bool]]) -> None:  # fmt: skip
    """Add to the judges' report what the run knows: each side's task reward with a CI (on the prompts where the
    side has a response: None = none), its length distribution in words, KL to the SFT policy, the share of
    responses cut unfinished (`finished`: per side, whether each stopped; {} for fixed-length responses), the
    reward models' held-out accuracy, the split and the timings."""
    from ..evals.side_by_side import prompt_ci
    from ..rewards.reward_model import reward_fn_from_model

    reward = reward_fn_from_model(state["rm_dir"])
    for name, texts in sides.items():
        kept = [i for i, t in enumerate(texts) if t is not None]
        scores = np.asarray(reward([prompts[i] for i in kept], [texts[i] for i in kept]), dtype=np.float64)
        if not np.isfinite(scores).all():
            raise UserError(f"the reward model {state['rm_dir']} gave non-finite scores to side {name!r}; retrain it")
        report["sides"][name]["reward"] = prompt_ci(scores, [prompts[i] for i in kept])
        report["sides"][name]["length_words"] = length_summary([len(texts[i].split()) for i in kept])
    for name, values in kl_to_sft.items():
        report["sides"][name]["kl_to_sft"] = prompt_ci(values, prompts)
    for name, done in finished.items():  # the share of each sampled side's responses cut at the cap with no stop
        report["sides"][name]["truncated_share"] = prompt_ci([0.0 if d else 1.0 for d in done], prompts)
    report["judge_heldout"] = json.loads((Path(state["judge_dir"]) / "eval-heldout.json").read_text())
    report["rm_heldout"] = json.loads((Path(state["rm_dir"]) / "eval-heldout.json").read_text())
    report["split"] = json.loads((out_dir / "split" / "split.json").read_text())
    report["timings_s"] = state.get("timings_s", {})
    report["selection_rule"] = "PPO and DPO: the last step (fixed before any judging)"


def write_eval(config: StoriesConfig, out_dir: Path, report: dict, prompts: list[str], sides: dict[str, list],
               final: str) -> None:  # fmt: skip
    """The evaluation's files in out_dir/eval: report.json, table.md, pairs.jsonl, samples.md, blind.db (for people:
    the final policy against the start, the largest best-of-n and the human stories) and over_optimisation.png."""
    from ..evals.side_by_side import table_markdown, without_verdicts

    eval_dir = out_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(eval_dir / "report.json", without_verdicts(report))
    write_text_atomic(eval_dir / "table.md", _summary(report) + "\n" + table_markdown(report))
    out_lines = [json.dumps({"prompt": p, **{name: texts[i] for name, texts in sides.items()},
                             "verdicts": {name: side["verdicts"][i] for name, side in report["sides"].items()
                                          if len(side["verdicts"]) == len(prompts)}})
                 for i, p in enumerate(prompts)]  # fmt: skip
    write_text_atomic(eval_dir / "pairs.jsonl", "\n".join(out_lines) + "\n")
    write_text_atomic(eval_dir / "samples.md", _samples_markdown(prompts, sides, n=6))
    others = ["start", f"best-of-{max(config.eval.best_of_ns)}", "human-top", "human-least"]
    _requeue_blind(eval_dir / "blind.db", prompts, (final, sides[final]),
                   {name: sides[name] for name in others if name in sides and name != final})  # fmt: skip
    curves, note = over_optimisation_curves(config, out_dir, report)
    write_over_optimisation(curves, eval_dir / "over_optimisation.png", note)
    print(_summary(report), flush=True)


def side_kls(config: StoriesConfig, sides: dict, logprobs, models: dict, n_prompts: int) -> tuple[dict, dict]:
    """KL of every side to the start policy, and of the RL sides to the SFT policy, in nats per response: k1 on the
    sampled text, log pi(y) - log start(y), both with end-of-turn forbidden where the sampler forbade it.
    logprobs(model, side) -> (n_prompts,) summed log-probs; models: the sampled sides' policies ('start', 'sft'
    where there is an SFT phase, and the RL ones)."""
    from ..methods.best_of import kl_bound

    print("eval: KL of every side to the start policy", flush=True)
    start, sft = models["start"], models.get("sft")
    rl = {name: model for name, model in models.items() if name in config.rl_phases}
    # Without SFT a best-of-n side is the start policy's own samples: its KL is the closed form, nothing to measure.
    measured_sides = [name for name in sides if name != "start" and (sft is not None or name in rl)]
    start_lp = {name: logprobs(start, name) for name in measured_sides}
    kls, kl_to_sft = {"start": [0.0] * n_prompts}, {}
    rl_lp = {name: logprobs(sft, name) for name in sides if name != "start"} if sft is not None else {}
    if sft is not None:
        kls["sft"] = (rl_lp["sft"] - start_lp["sft"]).tolist()
    for name in (name for name in sides if name.startswith(("best-of-", "longest-of-"))):
        # KL(best-of-n || start) = KL(best-of-n || pool policy) + E_best-of-n[log pool - log start]: the first
        # term has the closed form log n - (n-1)/n (any reward without ties, length too), the second is measured
        # on the chosen samples (0 without SFT).
        n = int(name.rsplit("-", 1)[1])
        measured = rl_lp[name] - start_lp[name] if sft is not None else np.zeros(n_prompts)
        kls[name] = (measured + kl_bound(n)).tolist()
    for name, model in rl.items():
        own = logprobs(model, name)
        kls[name] = (own - start_lp[name]).tolist()
        if sft is not None:
            kl_to_sft[name] = (own - rl_lp[name]).tolist()
    return kls, kl_to_sft


def _requeue_blind(db: Path, prompts: list[str], final: tuple[str, list[str]], others: dict[str, list]) -> None:
    """Queue the blind pairs of this evaluation: the final side against each of `others` (name -> texts, None
    where a side has no response to a prompt), one database for all, the pair of sides stored with each
    comparison. A database from an earlier evaluation is replaced while nobody has labelled it; one with labels is
    kept (people's work is never deleted) with a note."""
    from ..evals.side_by_side import queue_blind
    from ..labeling.store import Store

    if db.exists():
        if Store(db).labels():
            print(f"note: {db} holds labels of an earlier evaluation and is kept; move it aside to queue this one's "
                  "pairs", flush=True)  # fmt: skip
            return
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
    for name, texts in others.items():
        kept = [i for i, t in enumerate(texts) if t is not None]
        queue_blind(db, [prompts[i] for i in kept], (final[0], [final[1][i] for i in kept]),
                    (name, [texts[i] for i in kept]))  # fmt: skip


def state_sft_policy(state: dict) -> str:
    """The SFT policy of a run (its cached folder's policy/)."""
    return str(Path(state["sft_dir"]) / "policy")


def _summary(report: dict) -> str:
    from ..evals.side_by_side import win_text

    j, h = report["judge_heldout"], report["win_rates"].get("human-top vs start")
    length = (f"responses of {report['response_length']} tokens" if report.get("fixed_length", True) else
              f"whole responses, cut at {report['response_length']} tokens")  # fmt: skip
    lines = [f"Eval prompts: {report['prompts']} (none trained on); {length}; final policy: {report.get('final')}.",
             f"Judge reward model (judge prompts only): held-out accuracy {j.get('accuracy', float('nan')):.1%} "
             f"(n {j.get('n', 0)})."]  # fmt: skip
    if h:
        lines.append(f"The judge prefers the top-voted human stories (cut to the final policy's length) to the start "
                     f"policy's responses on {win_text(h)} of eval prompts.")
    checks = [(key, report["win_rates"][key]) for key in report["win_rates"]
              if key.startswith(("looping vs", "longest-of-")) and key.endswith(" vs start")]  # fmt: skip
    for key, win in checks:  # a judge worth quoting prefers neither looping nor mere length to the start
        lines.append(f"Judge check, {key.split(' vs ')[0]} (should not win): preferred to the start on {win_text(win)}.")
    for key, win in report["win_rates"].items():
        lines.append(f"- judge win rate {key}: {win_text(win)}")
    return "\n".join(lines) + "\n"


def _samples_markdown(prompts: list[str], sides: dict[str, list], n: int) -> str:
    out = ["# Before and after, on the same eval prompts (human stories cut to the final policy's length)\n"]
    for i, prompt in enumerate(prompts[:n]):
        out.append(f"## {prompt}\n")
        for name, texts in sides.items():
            if texts[i] is not None:
                out.append(f"**{name}**: {' '.join(texts[i].split())}\n")
    return "\n".join(out)


def over_optimisation_curves(config: StoriesConfig, out_dir: Path, report: dict) -> tuple[list[Curve], str]:
    """The over-optimisation plot's curves and its note: every side of the evaluation with a KL to the start policy
    a point (`report.curves_from_sides`: the reward model's and the judge's mean on the eval prompts), and PPO's
    steps (ppo/metrics.csv: the task's reward and the judge of each training batch) where PPO's KL is to the start
    policy, i.e. without SFT. With SFT, PPO's reference, and so the KL it logged, is the SFT policy's: a distance
    from another origin, which the note names rather than draw it on this axis."""
    curves, note = curves_from_sides(report["sides"]), ""
    metrics = out_dir / "ppo" / "metrics.csv"
    if metrics.is_file() and "ppo" in config.rl_phases:
        if config.sft.enabled:
            note = ("PPO's training steps are not drawn: their KL is to the SFT policy, PPO's reference, not to the "
                    "start (`wprlhf report RUN/ppo` plots them against it).")  # fmt: skip
        else:
            curves.append(curve_from_steps("ppo", read_metrics(metrics)))
    return curves, note
