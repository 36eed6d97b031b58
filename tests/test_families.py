"""Every model family, every length (issue 16, item 4).

Families: learned absolute positions (GPT-2, whose tokenizer has no pad token), rotary positions (Llama: the
`tiny` model, SmolLM2's architecture) and a BERT encoder (the MiniLM-style backbone of reward models and
classifiers), each built tiny and random from a config. For each, every model that reads a batch gives a
left-padded (or right-padded) row what the row gives alone; prompts longer than a position table are clipped to
fit; and a size of 0 in any config is a UserError that names its flag, never a ZeroDivisionError.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from tests.helpers import save_tiny_classifier
from wprlhf.cli import main
from wprlhf.core import pad_sequences
from wprlhf.errors import UserError
from wprlhf.forwards import policy_forward, value_forward
from wprlhf.generation import GenerationConfig, encode_prompts, fit_positions, generate, sample
from wprlhf.methods.ppo import PPOConfig, train
from wprlhf.metrics import read_metrics
from wprlhf.models import (
    ValueHead,
    load_policy,
    load_reward_backbone,
    make_reference,
    make_value_model,
    minilm_dir,
    stop_token_ids,
    tiny_config,
)
from wprlhf.rewards import classifier, reward_model

POSITIONS = 64  # the tiny GPT-2's position table
TEXTS = ["A dragon opens a bakery.", "The moon files a complaint about the sun and the stars.", "Hi"]
# Scored (prompt, response) pairs of different lengths; the empty response is what a collapsed policy writes.
PAIRS = [("Write about a cat.", "The cat sailed the seven seas and came home."), ("Hi", ""),
         ("The moon files a complaint.", "Nobody answers.")]  # fmt: skip
ATOL = 1e-5


def _gpt2_tokenizer():
    """A byte-level BPE trained in milliseconds on a few sentences, with GPT-2's special-token set: one
    <|endoftext|> that is BOS, EOS and UNK, and no pad token (the case the load paths must handle)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(TEXTS * 5, trainer)
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=end, eos_token=end, unk_token=end)


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    """{'lm', 'rm', 'classifier'}: directories of a 2-layer GPT-2 (64 positions) as a causal LM, a one-output reward
    model and a two-label classifier, each saved with the pad-less BPE tokenizer."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    tokenizer = _gpt2_tokenizer()
    assert tokenizer.pad_token is None
    root = tmp_path_factory.mktemp("gpt2")
    dirs = {}
    for kind, cls, labels in (("lm", GPT2LMHeadModel, 1), ("rm", GPT2ForSequenceClassification, 1),
                              ("classifier", GPT2ForSequenceClassification, 2)):  # fmt: skip
        end = tokenizer.eos_token_id
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=POSITIONS, n_embd=32, n_layer=2, n_head=2,
                            num_labels=labels, bos_token_id=end, eos_token_id=end)  # fmt: skip
        torch.manual_seed(0)
        dirs[kind] = root / kind
        cls(config).save_pretrained(dirs[kind])
        tokenizer.save_pretrained(dirs[kind])
    return dirs


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    """{'rm', 'classifier'}: a tiny random BERT with the MiniLM tokenizer, as a reward model and a classifier."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a head large enough that scores differ clearly between texts
        model.classifier.weight.mul_(50)
    model.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    return {"rm": root / "rm", "classifier": save_tiny_classifier(root / "classifier")}


@pytest.fixture(scope="module")
def llama_classifier_dir(tmp_path_factory):
    """A two-label classifier on the `tiny` Llama architecture (rotary positions), with the SmolLM2 tokenizer."""
    from transformers import LlamaForSequenceClassification

    from wprlhf.models import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    path = tmp_path_factory.mktemp("llama") / "classifier"
    config = tiny_config(len(tokenizer))
    config.num_labels, config.pad_token_id = 2, tokenizer.pad_token_id
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _policy(family: str, gpt2_dirs):
    """(policy, tokenizer) of a decoder family, through the same loader `--policy` uses."""
    return load_policy(str(gpt2_dirs["lm"]) if family == "gpt2" else "tiny", seed=0)


def _rows(tokenizer, texts: list[str]) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


# ----------------------------------------------------------------------------------------------------------
# padding changes no number


def test_gpt2_load_paths_set_a_pad_token(gpt2_dirs):
    """GPT-2's tokenizer has no pad: every loader gives it one, and the model's config learns its id."""
    policy, tokenizer = load_policy(str(gpt2_dirs["lm"]))
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"  # generation appends on the right
    assert policy.config.pad_token_id == tokenizer.pad_token_id
    for kind in ("rm", "classifier"):
        model, tokenizer = load_reward_backbone(str(gpt2_dirs[kind]), num_labels=1 if kind == "rm" else 2)
        assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
        assert tokenizer.padding_side == "right"  # scoring pads on the right (see load_reward_backbone)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_policy_reference_and_value_forwards_ignore_padding(family, gpt2_dirs):
    """policy_forward (policy and frozen reference, with the shared value head) and value_forward give each row of
    a batch with left-padded queries and right-padded responses what the row gives alone."""
    policy, tokenizer = _policy(family, gpt2_dirs)
    reference, value_model = make_reference(policy), make_value_model(policy)
    value_head = ValueHead(policy.config.hidden_size)
    query_rows = _rows(tokenizer, TEXTS)
    # Ragged responses: the shorter ones' masks end early, as after a stop token.
    response_rows = _rows(tokenizer, ["Once upon a time", "Yes", "The sun rose over the quiet sea"])
    pad = tokenizer.pad_token_id
    queries, query_mask = pad_sequences(query_rows, pad, side="left")
    responses, response_mask = pad_sequences(response_rows, pad, side="right")
    assert len({len(r) for r in query_rows}) == 3 and len({len(r) for r in response_rows}) == 3

    def forwards(q, qm, r, rm):
        with torch.no_grad():
            logprobs, values, entropy = policy_forward(policy, q, qm, r, rm, 0.7, value_head, with_entropy=True)
            ref_logprobs = policy_forward(reference, q, qm, r, rm, 0.7)[0]
            return logprobs, values, entropy, ref_logprobs, value_forward(value_model, q, qm, r, rm)

    batch = forwards(queries, query_mask, responses, response_mask)
    for i, (q, r) in enumerate(zip(query_rows, response_rows)):
        ones = lambda x: torch.ones((1, len(x)), dtype=torch.bool)  # noqa: E731
        alone = forwards(q[None], ones(q), r[None], ones(r))
        for batched, single in zip(batch, alone):
            torch.testing.assert_close(batched[i, : len(r)], single[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sampling_ignores_padding(family, gpt2_dirs):
    """Greedy KV-cached sampling of a left-padded batch gives each prompt the tokens and log-probs it gets alone."""
    policy, tokenizer = _policy(family, gpt2_dirs)
    config = GenerationConfig(max_new_tokens=6, greedy=True, stop_at_eos=False)
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    queries, query_mask = encode_prompts(tokenizer, TEXTS, chat_template=False)
    batch = sample(policy, queries, query_mask, config, stops, pad)
    for i, text in enumerate(TEXTS):
        alone = sample(policy, *encode_prompts(tokenizer, [text], chat_template=False), config, stops, pad)
        assert batch.responses[i].tolist() == alone.responses[0].tolist()
        torch.testing.assert_close(batch.logprobs[i], alone.logprobs[0], rtol=0, atol=ATOL)


def _scorer(family: str, kind: str, gpt2_dirs, encoder_dirs, llama_classifier_dir):
    """(score(prompts, responses, batch_size) -> (N,) tensor) of a reward model or classifier of one family."""
    if kind == "rm":
        if family == "llama":
            model, tokenizer = load_reward_backbone("tiny")
        else:
            model, tokenizer = reward_model.load_reward_model((gpt2_dirs if family == "gpt2" else encoder_dirs)["rm"])
        return lambda p, r, b: reward_model.score(model, tokenizer, p, r, max_length=64, batch_size=b)
    path = {"gpt2": gpt2_dirs["classifier"], "bert": encoder_dirs["classifier"], "llama": llama_classifier_dir}[family]
    model, tokenizer = classifier.load_classifier(path)
    texts = lambda p, r: [classifier.join_review(a, b) for a, b in zip(p, r)]  # noqa: E731
    return lambda p, r, b: classifier.log_odds(model, tokenizer, texts(p, r), max_length=64, batch_size=b)


@pytest.mark.parametrize("kind", ["rm", "classifier"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_scores_ignore_padding(family, kind, gpt2_dirs, encoder_dirs, llama_classifier_dir):
    """A reward model's or classifier's score of a (prompt, response) is the same in a padded batch as alone, and
    finite for an empty response. GPT-2 read left-padded rows at shifted positions before scoring padded right."""
    score = _scorer(family, kind, gpt2_dirs, encoder_dirs, llama_classifier_dir)
    prompts, responses = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    together = score(prompts, responses, len(PAIRS))
    alone = torch.cat([score([p], [r], 1) for p, r in PAIRS])
    assert torch.isfinite(together).all()
    assert together.std() > 1e-4, "texts must score differently, or equal scores would prove nothing"
    torch.testing.assert_close(together, alone, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# prompt + response longer than the position table


LONG_PROMPT = " ".join(TEXTS * 6)  # ~200 BPE tokens: longer than the 64-position table on its own


def test_generate_clips_prompts_to_the_position_table(gpt2_dirs):
    """`--max-prompt-length 60 --response-length 8` on 64 positions: prompts keep their last 56 tokens, with a
    warning, where they raised a raw IndexError in the position embedding."""
    policy, tokenizer = _policy("gpt2", gpt2_dirs)
    config = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    with pytest.warns(UserWarning, match="exceed the model's 64 positions: prompts keep their last 56 tokens"):
        texts = generate(policy, tokenizer, [LONG_PROMPT, "Hi"], config, max_prompt_length=60, chat_template=False)
    assert len(texts) == 2
    # The clipped query is the end of the full one.
    queries, query_mask = encode_prompts(tokenizer, [LONG_PROMPT], 60, chat_template=False)
    with pytest.warns(UserWarning):
        clipped, clipped_mask = fit_positions(policy, queries, query_mask, 8)
    assert clipped.tolist() == [queries[0, -56:].tolist()] and clipped_mask.all()
    # A query that already fits comes back as it was, without a warning.
    short, short_mask = encode_prompts(tokenizer, ["Hi"], chat_template=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit_positions(policy, short, short_mask, 8)[0] is short


def test_too_long_for_the_position_table_is_a_user_error_before_any_work(gpt2_dirs, tmp_path):
    policy, tokenizer = _policy("gpt2", gpt2_dirs)
    # Unclipped queries are refused by sample itself, which never clips: the caller's later forwards must see the
    # same queries as sampling did.
    queries, query_mask = encode_prompts(tokenizer, [LONG_PROMPT], 60, chat_template=False)
    with pytest.raises(UserError, match="prompt of 60 tokens plus 8 response tokens exceeds the model's 64 positions"):
        sample(policy, queries, query_mask, GenerationConfig(max_new_tokens=8), stop_token_ids(tokenizer), 0)
    # A response that alone fills the table leaves no room for any prompt.
    with pytest.raises(UserError, match="leave no room for a prompt in the model's 64 positions"):
        generate(policy, tokenizer, ["Hi"], GenerationConfig(max_new_tokens=64), chat_template=False)
    config = PPOConfig(policy=str(gpt2_dirs["lm"]), batch_size=2, num_minibatches=1, ppo_epochs=1, steps=1,
                       response_length=64, chat_template=False, log_samples=0, device="cpu")  # fmt: skip
    with pytest.raises(UserError, match="ask for at most 63 new tokens"):
        train(config, ["Hi", "Ho"], lambda p, r: [0.0] * len(r), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.learning
def test_ppo_clips_prompts_to_the_position_table(gpt2_dirs, tmp_path):
    """One PPO step on prompts of 60 tokens + responses of 8 on a 64-position GPT-2: sampling and every training
    forward (policy, reference, value) read the clipped prompts."""
    config = PPOConfig(policy=str(gpt2_dirs["lm"]), batch_size=2, num_minibatches=1, ppo_epochs=1, steps=1,
                       max_prompt_length=60, response_length=8, chat_template=False, log_samples=0,
                       device="cpu")  # fmt: skip
    with pytest.warns(UserWarning, match="prompts keep their last 56 tokens"):
        train(config, [LONG_PROMPT, "Hi"], lambda p, r: [float(len(x)) for x in r], tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 1 and math.isfinite(rows[0]["policy_loss"])


def test_sample_cli_clips_long_prompts_and_names_the_flag_when_nothing_fits(gpt2_dirs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(LONG_PROMPT + "\nHi\n")
    out = tmp_path / "samples.jsonl"
    argv = ["sample", "--policy", str(gpt2_dirs["lm"]), "--prompts", str(prompts), "-k", "1", "--no-chat-template",
            "--max-prompt-length", "60", "--out", str(out)]  # fmt: skip
    with pytest.warns(UserWarning, match="prompts keep their last 56 tokens"):
        assert main([*argv, "--max-new-tokens", "8"]) == 0
    assert [len(json.loads(line)["responses"]) for line in out.read_text().splitlines()] == [1, 1]
    assert main([*argv, "--max-new-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "no room for a prompt" in err and "--max-new-tokens" in err


# ----------------------------------------------------------------------------------------------------------
# sizes of 0: a UserError naming the flag, checked before anything divides by them


@pytest.mark.parametrize(
    "argv, flag",
    [(["ppo", "--num-minibatches", "0"], "--num-minibatches"),
     (["ppo", "--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps"),
     (["ppo", "--batch-size", "0"], "--batch-size"),
     (["ppo", "--checkpoint-every", "0"], "--checkpoint-every"),
     (["ppo", "--sample-every", "0"], "--sample-every"),
     (["ppo", "--kl-horizon", "0"], "--kl-horizon"),
     (["sft", "--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps"),
     (["sft", "--batch-size", "0"], "--batch-size"),
     (["loop", "--batch-size", "0"], "--batch-size"),
     (["loop", "--k", "1"], "--k"),
     (["loop", "--rm-epochs", "0"], "--rm-epochs"),
     (["rm", "train", "--eval-every", "0"], "--eval-every"),
     (["rm", "train", "--batch-size", "0"], "--batch-size"),
     (["classifier", "train", "--batch-size", "0"], "--batch-size")],
)  # fmt: skip
def test_zero_sizes_are_user_errors_naming_the_flag(argv, flag, tmp_path, capsys):
    """A size of 0 once hit a modulo before the range check (ZeroDivisionError); now it fails before any work."""
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"must be >= {2 if flag == '--k' else 1}, got" in err and f"; set {flag} to" in err
    assert not (tmp_path / "out").exists()


def test_reward_model_longer_than_the_position_table_is_a_user_error(gpt2_dirs, tmp_path, capsys):
    """rm train's default --max-length 128 on a GPT-2 with 64 positions was a raw IndexError mid-batch."""
    from wprlhf.data import Comparison, write_comparisons

    write_comparisons(tmp_path / "c.jsonl", [Comparison(f"prompt {i}", ["a " * 200, "b"], 0) for i in range(8)])
    argv = ["rm", "train", "--model", str(gpt2_dirs["rm"]), "--data", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "rm")]
    assert main(argv) == 2
    assert f"--max-length 128 exceeds the {POSITIONS} positions" in capsys.readouterr().err
