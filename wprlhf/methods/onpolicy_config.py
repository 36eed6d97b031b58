"""The configs of the on-policy methods, each setting with its default and meaning: `OnPolicyConfig` (what PPO, RLOO
and GRPO share), `KLPenaltyConfig` (the KL as a per-token penalty in the reward: PPO, RLOO), `PPOConfig` (plus the
value model and GAE); the paper's presets, and the rules for reading a config (file + flags) and for resuming.

The defaults are sized for a laptop CPU; `PRESETS["ziegler2019"]` holds the settings of Ziegler et al. 2019.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint as ckpt
from ..distributed import check_mixed_precision
from ..errors import UserError, check_numbers
from ..generation import GenerationConfig, generation_config

# The least temperature PPO, RLOO and GRPO train at: their log-probs are those of softmax(logits / temperature).
MIN_TEMPERATURE = 0.05


@dataclass
class OnPolicyConfig:
    """What every on-policy method (PPO, RLOO, GRPO) reads: the run, the rollout, the optimizer, the policy-ratio
    clip, the KL controller, memory and plumbing. Defaults are sized for a laptop CPU. Each method's config extends
    it with the settings only it reads, so none holds a setting it would ignore."""

    # --- what to train, on what, for how long
    policy: str = "smollm2"
    """Policy to start from: 'smollm2' (embedded), 'tiny' (random, tests), a local directory or a hub id."""
    reward: str = "vowels"
    """Reward SPEC (`spec.load_reward`; the default 'vowels', a mock reward, only tries the machinery): a built-in
    ('vowels', 'length', 'sentiment', 'relevance'), 'rm:DIR',
    'module:function', 'path/to/file.py:function', or a weighted sum such as '0.7*sentiment+0.3*relevance'. Read
    by `wprlhf ppo`; `train()` takes a reward_fn, and config.json records its SPEC or Python name."""
    prompts: str = ""
    """Prompt file (empty = the built-in prompts): .txt (one a line), .jsonl / .csv / .csv.gz with a 'prompt' field."""
    task: str = ""
    """A named task that brings its prompts, reward and judge (`wprlhf.pipelines.sentiment`): 'positive-reviews' or
    'sentiment-control'. It replaces `reward`; `prompts` then names reviews to take openings from (a directory
    such as ../shared/data/imdb, a text,label CSV or a .txt of openings; empty = the shipped openings). Read by
    `wprlhf ppo`; `train()` takes prompts and reward_fn as arguments."""
    classifier: str = ""
    """With `task`: a directory written by `wprlhf classifier train`, whose log-odds of positive is the reward."""
    steps: int = 20
    """PPO steps; one step = one rollout batch and one PPO update on it."""
    seed: int = 0
    """Seeds the tiny init, prompt order, sampling noise and minibatch order."""

    # --- rollout
    batch_size: int = 16
    """Episodes (prompt -> response) per PPO step."""
    samples_per_prompt: int = 1
    """k: responses sampled to each prompt of a step, so a step takes batch_size / k prompts. RLOO and GRPO
    compare a prompt's k responses with each other and need k >= 2; PPO's value model needs none."""
    num_minibatches: int = 2
    """Optimizer steps per PPO epoch; each sees batch_size / num_minibatches episodes."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch (trades memory for time; the update is the same)."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    max_prompt_length: int = 128
    """Prompts longer than this keep their last tokens (the chat template's assistant header is at the end). A prompt
    also keeps only as many as leave room for response_length in the model's positions (GPT-2: 1024), with a
    warning; a response_length that leaves no room is an error before the first step."""
    response_length: int = 64
    """Maximum response tokens."""
    min_response_length: int = 0
    """Stop tokens are forbidden before this many tokens. Log-probs (ratios, the KL penalty, the logged `kl`) are then
    those of the distribution sampled from, stop tokens masked and the rest renormalised, so `kl` stays a KL."""
    temperature: float = 0.7
    """Sampling temperature; log-probs in the loss use the same one. At least MIN_TEMPERATURE (0.05)."""
    top_k: int = 0
    """Top-k sampling (0 = full vocabulary, as PPO's log-probs assume)."""
    top_p: float = 1.0
    """Nucleus sampling (1.0 = off, as PPO's log-probs assume)."""
    stop_at_eos: bool = True
    """False = fixed-length responses of response_length tokens (benchmarks)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of each response cut at response_length without a stop token (trl's name), so
    the policy learns to finish; score_mean includes it. 0 = off. Refused in fixed-length mode (stop_at_eos False,
    or min_response_length = response_length), where every response reaches the cap by design."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template where it has one (instruct models)."""
    instruction: str = ""
    """Put before each prompt, with a blank line, in what the policy reads ('' = the bare prompt); the reward
    function is given the bare prompt (`generation.instructed`)."""

    # --- optimisation
    lr: float = 1.41e-5
    """AdamW learning rate of the policy."""
    weight_decay: float = 0.0
    """AdamW weight decay of the policy and the value model (0 = none, as trl's PPO)."""
    adam_eps: float = 1e-8
    """AdamW's epsilon: the floor of its per-weight step denominator."""
    lr_schedule: str = "constant"
    """'constant' or 'linear' (decay to 0 over `steps`, stepped once per PPO step)."""
    max_grad_norm: float | None = 1.0
    """Clip each network's gradient norm to this on its own: the policy's and the separate value model's, so that
    the value model's gradients, when the larger, never shrink the policy's step (as OpenRLHF clips its actor and
    critic); with a shared value head the policy and head are one network, clipped together. Under DeepSpeed its
    own config's gradient_clipping (the joint norm) applies instead. None = off."""

    # --- the update
    cliprange: float = 0.2
    """Policy ratio clip, PPO's epsilon."""
    target_approxkl: float | None = None
    """Stop the epochs of a step early once a minibatch's approx-KL to the rollout policy exceeds this."""

    # --- rewards and KL
    kl_coef: float = 0.2
    """Initial coefficient of the per-token KL penalty (beta in Ziegler et al. 2019)."""
    adaptive_kl: bool = True
    """Adapt kl_coef towards kl_target (Ziegler et al. 2019, sec. 2.2); False = a fixed kl_coef."""
    kl_target: float = 6.0
    """Target KL per response, nats."""
    kl_horizon: int = 512
    """Episodes over which kl_coef moves by up to a factor e^0.2; small enough to move within a short CPU run."""
    score_clip: float | None = None
    """Clip scores to [-score_clip, score_clip] after normalisation; None = off."""

    # --- memory and speed
    mixed_precision: str = "auto"
    """'auto' (bf16 where the device runs it faster than fp32: a GPU with bf16, a CPU with AVX-512 BF16 or AMX;
    else fp32), 'no' (fp32), 'bf16' or 'fp16': autocast for every forward (accelerate's); weights and AdamW stay
    fp32. Without LoRA the frozen reference then stores its matmul weights in that dtype (`models.matmuls_in`: the
    values autocast computes with, so the same log-probs in less memory). The choice is printed and saved in
    config.json; --resume keeps the saved one."""
    lora_r: int = 0
    """LoRA rank of the policy's adapters (peft, on every linear layer); 0 = train all weights. With LoRA the
    reference is the same network with its adapters off, so the base weights are held once."""
    lora_alpha: float = 16.0
    """LoRA scale numerator (the update is alpha / r * B A)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory, ~30 % more time."""
    optimizer: str = "adamw"
    """'adamw' (torch, fused) or 'adamw8bit' (bitsandbytes' 8-bit AdamW, where bitsandbytes is installed)."""

    # --- run plumbing
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'. Under `accelerate launch`, each process's own device."""
    checkpoint_every: int = 10
    """Steps between checkpoints (the last step always saves)."""
    log_samples: int = 2
    """Decoded samples printed every sample_every steps, and written to samples.jsonl."""
    sample_every: int = 5
    """Log samples to samples.jsonl every this many steps (and at step 1)."""

    def __post_init__(self):
        check_numbers(self, non_negative=("lr", "weight_decay", "adam_eps", "cliprange", "kl_coef", "score_clip",
                                          "max_grad_norm", "missing_eos_penalty"))  # fmt: skip
        if self.score_clip == 0:
            raise UserError("score_clip 0 would clip every score to 0 and train on nothing; set --score-clip above 0 "
                            "(5 is usual) or none to switch it off")  # fmt: skip
        # Ranges first: the divisibility checks below divide by these sizes.
        at_least = dict(steps=1, batch_size=1, num_minibatches=1, gradient_accumulation_steps=1, ppo_epochs=1,
                        max_prompt_length=1, response_length=1, samples_per_prompt=1, min_response_length=0, top_k=0,
                        kl_horizon=1, checkpoint_every=1, sample_every=1, log_samples=0, lora_r=0)  # fmt: skip
        for name, low in at_least.items():
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            if value < low:
                raise UserError(f"{name} must be >= {low}, got {value}; set {flag} to {low} or more")
        if not self.kl_target > 0:  # it divides the KL; `not >` also refuses NaN
            raise UserError(f"kl_target must be > 0, got {self.kl_target}; set --kl-target to a positive number")
        if not self.temperature >= MIN_TEMPERATURE:  # `not >=` also refuses NaN
            # log-probs at T are logits / T: far below 1 they saturate float32 and the ratio and KL lose all meaning.
            raise UserError(f"temperature must be at least {MIN_TEMPERATURE} (the least an RL method trains at: its "
                            f"log-probs are logits / temperature), got {self.temperature}; set --temperature to a "
                            "value from 0.1 to 1.0")  # fmt: skip
        if self.min_response_length > self.response_length:
            raise UserError(f"min_response_length {self.min_response_length} exceeds response_length "
                            f"{self.response_length}; lower --min-response-length")  # fmt: skip
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must lie in (0, 1], got {self.top_p}; set --top-p in that range (1 = off)")
        if self.batch_size % self.samples_per_prompt:
            raise UserError(f"batch_size {self.batch_size} is not divisible by samples_per_prompt "
                            f"{self.samples_per_prompt}; make --batch-size a multiple of it")  # fmt: skip
        if self.batch_size % self.num_minibatches:
            raise UserError(
                f"batch_size {self.batch_size} is not divisible by num_minibatches {self.num_minibatches}; "
                f"pick a divisor of {self.batch_size}"
            )
        if self.minibatch_size % self.gradient_accumulation_steps:
            raise UserError(
                f"minibatch size {self.minibatch_size} (batch_size / num_minibatches) is not divisible by "
                f"gradient_accumulation_steps {self.gradient_accumulation_steps}"
            )
        check_mixed_precision(self.mixed_precision)
        if self.missing_eos_penalty and self.generation().fixed_length:
            raise UserError(f"--missing-eos-penalty {self.missing_eos_penalty} penalises responses cut at the cap, but "
                            "in fixed-length mode (--no-stop-at-eos, or --min-response-length equal to "
                            "--response-length) every response is cut there by design; drop the penalty")  # fmt: skip
        check_choices(self, lr_schedule=("constant", "linear"), optimizer=("adamw", "adamw8bit"))

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def micro_batch_size(self) -> int:
        return self.minibatch_size // self.gradient_accumulation_steps

    def generation(self) -> GenerationConfig:
        """How this run samples (response_length -> max_new_tokens, ...)."""
        return generation_config(self)


@dataclass
class KLPenaltyConfig(OnPolicyConfig):
    """OnPolicyConfig plus how scores and the KL to the reference become per-token rewards (Ziegler et al. 2019):
    PPO's and RLOO's. (GRPO standardises scores within a group and adds the KL as a loss term instead.)"""

    kl_estimator: str = "k1"
    """Per-token KL in the reward's penalty: 'k1' (log pi - log ref, Ziegler et al.'s; the only one accepted). 'k3'
    (r - 1 - log r, r = ref / pi) is refused: a reward's gradient is the score function's, and that of E_pi[k3] is
    grad KL(pi||ref) - grad KL(ref||pi), which has no pull back to the reference (a one-token bandit with score 0
    collapses onto one token under k3 and returns to the reference under k1). k3 is logged as `kl_k3` either way;
    GRPO uses it as a loss term, where its gradient does pull back (grpo.py)."""
    score_norm: str = "none"
    """'none' or 'batch' (standardise scores within each batch before adding them)."""

    def __post_init__(self):
        super().__post_init__()
        check_choices(self, kl_estimator=("k1", "k3"), score_norm=("none", "batch"))
        if self.kl_estimator == "k3":
            raise UserError("kl_estimator 'k3' cannot be the KL penalty in the reward: the score-function gradient of "
                            "E[k3] is grad KL(pi||ref) - grad KL(ref||pi), with no pull back to the reference; use "
                            "--kl-estimator k1 (the default; k3 is logged as kl_k3 either way)")  # fmt: skip
        if self.score_norm == "batch" and self.batch_size < 2:
            # The standard deviation of one score is undefined (NaN), and would reach every weight.
            raise UserError(f"score_norm 'batch' standardises scores over the batch and needs batch_size >= 2, got "
                            f"{self.batch_size}; raise --batch-size or use --score-norm none")  # fmt: skip


@dataclass
class PPOConfig(KLPenaltyConfig):
    """Everything `wprlhf ppo` needs: KLPenaltyConfig plus PPO's value model and GAE (Stiennon et al. 2020's
    separate value network by default). `ziegler2019` holds the paper's settings."""

    value_lr: float | None = None
    """Learning rate of the value model (None = lr)."""
    gamma: float = 1.0
    """Discount; 1 because an episode is one response."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange_value: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    shared_value_head: bool = False
    """False: the value model is a separate network initialised from the policy (Stiennon et al. 2020); True: a
    scalar head on the policy's last hidden states (one backbone for both, as in Ziegler et al. 2019)."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance over the batch (keeping their mean)."""

    def __post_init__(self):
        super().__post_init__()
        check_numbers(self, non_negative=("value_lr", "cliprange_value", "vf_coef", "gamma", "lam"))


def check_choices(config, **choices: tuple[str, ...]) -> None:
    """UserError unless each named setting of `config` is one of its allowed values."""
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise UserError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}; set "
                            f"--{name.replace('_', '-')}")  # fmt: skip


def check_group(config: OnPolicyConfig, method: str) -> None:
    """UserError unless `config` of RLOO or GRPO (`method`) has k >= 2 responses a prompt."""
    if config.samples_per_prompt < 2:
        raise UserError(f"{method} needs samples_per_prompt >= 2 (it compares a prompt's responses with each other), "
                        f"got {config.samples_per_prompt}; set --samples-per-prompt 2 or more")  # fmt: skip


PRESETS = {
    # trl v0.1's defaults after Ziegler et al. 2019, the seed's settings. trl v0.1 trained on one episode at a
    # time (minibatch size 1), hence 256 minibatches.
    "ziegler2019": dict(
        lr=1.41e-5, kl_coef=0.2, adaptive_kl=True, kl_target=6.0, kl_horizon=10000, gamma=1.0, lam=0.95,
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, batch_size=256, num_minibatches=256, ppo_epochs=4,
    ),  # fmt: skip
}


def upgrade(values: dict) -> dict:
    """A config dict of an earlier version (a config file, a checkpoint) in today's keys: `value_model:
    separate|shared` became `shared_value_head: bool`."""
    values = dict(values)
    if "value_model" in values and "shared_value_head" not in values:
        values["shared_value_head"] = values.pop("value_model") == "shared"
    return values


# Fields that may differ between a run and its resumption; any other difference is a different experiment.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "log_samples", "sample_every", "device"}


def check_resumable(saved: dict, config: OnPolicyConfig) -> None:
    """UserError unless `config` differs from the checkpoint's saved config only in RESUMABLE_CHANGES."""
    current, saved = dataclasses.asdict(config), upgrade(saved)
    # A field added since the checkpoint was written is missing from it; it ran with that field's default.
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    changed = [k for k in current if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != current[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k, defaults[k])!r} -> {current[k]!r}" for k in changed)
        raise UserError(f"the checkpoint was made with other settings ({diffs}); resume with the same settings or "
                        "start a new run in another --out directory")  # fmt: skip


def load_config(path: str | Path | None, overrides: dict, preset: str | None = None, config_cls=PPOConfig) -> OnPolicyConfig:
    """config_cls (PPOConfig, RLOOConfig, GRPOConfig) from a preset, then a YAML/JSON file, then explicit
    overrides; unknown keys are errors."""
    if preset and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return ckpt.load_config(config_cls, path, overrides, PRESETS.get(preset or ""), upgrade)


def dump_config(config: OnPolicyConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)
