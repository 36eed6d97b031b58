"""Simulated labelers: a hidden true score per response plus a noise model, answering comparisons as people do.

The true scores (the *judges*) defined here: `sentiment` (VADER compound, -1..1), `Relevance` (cosine of the
embedded MiniLM's sentence embeddings of prompt and response, -1..1) and `story` (1 if a response is a story by a
stated rule, `story_verdict`, else 0). A SPEC such as `sentiment`, `rm:DIR` or
`0.7*sentiment+0.3*relevance` becomes a judge in `spec.load_reward`, the one resolver of reward specs, which
sits above this module; `--labeler sim:sentiment` and `--judge sentiment` name the same score.

A labeler answers a comparison of k responses by sampling the best from Bradley-Terry on the true scores,
P(best = i) = softmax(scores / temperature)_i: temperature 0 always picks the top score, large temperatures
approach coin flips, as a tired person would. Several labelers sample independently, so they disagree about
close calls and agree about clear ones. The judge itself (no noise) is never shown to training: runs use it
only to measure win rates, as lm-human-preferences does with its mock tasks.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data import Comparison
from ..errors import UserError
from ..signatures import RewardFn

# ==========================================================================================================
# true scores


_VADER = None


def sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound polarity of each response, -1 (negative) .. 1 (positive); the lexicon ships offline."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return [_VADER.polarity_scores(text)["compound"] for text in responses]


# What is a story? The rule behind the `story` judge (issue 18). An r/WritingPrompts response is prose that
# tells the story; SmolLM2-Instruct as shipped mostly answers as an assistant ("What a great concept!"), writes an
# essay about the prompt, edits the prompt's sentence, or loops. The rule names those four failures and calls
# everything else a story, so it can be checked by reading (docs/results.md: a hand audit of 50 verdicts).
_ASSISTANT_OPENING = re.compile(  # how an assistant's reply opens; checked only outside quotation marks
    r"^(sure|certainly|absolutely|of course|no problem|here'?s|here is|here are|what an? (great|wonderful|"
    r"fascinating|interesting|intriguing|creative|fun|unique|thought)|great (question|prompt|idea|concept|choice)|"
    r"wow|i'?d (be happy|love)|i'?m (happy|glad|excited) to|i'?m here to|thank you|thanks for|hey there|hello|"
    r"i'?m sorry (for|but|if|about)|the question|you'?re asking|your question|a great (reference|question|idea|"
    r"concept|prompt|choice)|"
    r"hi there|dear (user|reader|writer)|as an ai|let me|let'?s (explore|dive|break|imagine|write|create)|"
    r"in this (story|prompt|piece|essay)|this (prompt|story|sentence|phrase|idea|concept|statement|quote|message|"
    r"text|scenario|premise) (is|was|explores|suggests|raises|highlights|describes|presents|sounds|seems)|"
    r"the (prompt|sentence|phrase|statement|quote|message|text|idea|concept|premise) (is|was|you|suggests|"
    r"describes|presents|seems|raises|highlights)|title\s*:|story\s*:|prompt\s*:)",
    re.IGNORECASE,
)
_ASSISTANT_ANYWHERE = re.compile(
    r"as an ai|writing prompt|your (story|prompt|idea|writing|concept)|creative writing|i hope (you|this) "
    r"(enjoy|like|help|find)|feel free to|let me know if|here'?s (a|an|my) (story|short|tale|draft|version|"
    r"revised|rewritten|possible)|here is (a|an|my) (story|short|tale|draft|version|revised|rewritten|possible)|"
    r"would you like (me|to)|in this (story|essay|piece|article),|this story (explores|follows|highlights)|"
    r"the story (is about|explores)|(great|interesting|fascinating|intriguing) (concept|premise|question)|"
    r"as an? (ai|chatbot|language model|assistant)|i'?m (here|able|happy|glad) to (help|assist)|assist you|"
    r"help you with|your (question|inquir|request)|i (can|could) (help|assist)|glad to have you|"
    r"(any|the) (confusion|misunderstanding)|how can i (help|assist)|(a|the) classic example of|"
    r"can be interpreted|the original (sentence|text|prompt|statement)|understand your|there are many ways",
    re.IGNORECASE,
)
_LIST_LINE = re.compile(r"^\s*([-*•]|\d+[.)])\s+\S", re.MULTILINE)
_WORD = re.compile(r"[a-z']+")
_QUOTE_MARKS = "\"'“‘«(["
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”")  # dialogue: what characters say is the story's, not an assistant's


def _prompt_coverage(prompt: str, words: list[str], n: int = 6) -> float:
    """Share of the response's words that sit inside a run of n or more words copied from the prompt."""
    prompt_words = _WORD.findall(re.sub(r"^\s*\[[^\]]*\]", "", prompt.lower()))
    grams = {tuple(prompt_words[i : i + n]) for i in range(len(prompt_words) - n + 1)}
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        if tuple(words[i : i + n]) in grams:
            covered[i : i + n] = [True] * n
    return sum(covered) / max(len(words), 1)


def story_verdict(prompt: str, response: str) -> str:
    """'story', or why not:

    - 'broken': under 10 words, under 70 % real words, or looping (distinct words under 35 % of all);
    - 'assistant': opens as an assistant's reply outside quotation marks ("Sure!", "What a great concept",
      "Here's a story", "This prompt is ...") or says anywhere what only an assistant says ("your story",
      "writing prompt", "I hope you enjoy", "as a chatbot", "is a classic example of"; outside dialogue in
      quotation marks);
    - 'markup': two or more list lines (an outline or an essay, not prose);
    - 'restated': over 30 % of its words copied from the prompt in runs of 6 or more (an edit or a restatement
      of the prompt's sentence; a story that quotes the prompt's line once stays a story).

    Measured on the first 48 words of 1,000 human stories of ../shared/data/writing_prompts: docs/results.md."""
    words = _WORD.findall(response.lower())
    if len(words) < 10:
        return "broken"
    tokens = response.split()
    if sum(bool(_WORD.fullmatch(t.strip(".,;:!?\"'()*_-—–…“”‘’").lower())) for t in tokens) < 0.7 * len(tokens):
        return "broken"
    if len(set(words)) < 0.35 * len(words):
        return "broken"
    opening = response.lstrip(" \n*#_>")
    narration = _QUOTED.sub(" ", response)
    if (opening[:1] not in _QUOTE_MARKS and _ASSISTANT_OPENING.match(opening)) or _ASSISTANT_ANYWHERE.search(narration):
        return "assistant"
    if len(_LIST_LINE.findall(response)) >= 2:
        return "markup"
    if _prompt_coverage(prompt, words) > 0.3:
        return "restated"
    return "story"


def story(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 where `story_verdict` calls the response a story, else 0.0: its mean is the share of stories."""
    return [float(story_verdict(p, r) == "story") for p, r in zip(prompts, responses)]


class Relevance:
    """Cosine similarity of mean-pooled MiniLM sentence embeddings of the prompt and the response.

    The encoder loads on first use (a labeler that never scores relevance never pays for it).
    """

    def __init__(self, model: str = "minilm", max_length: int = 256, batch_size: int = 32):
        self.name, self.max_length, self.batch_size = model, max_length, batch_size
        self.model = self.tokenizer = None

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-length sentence embeddings (N, H), mean-pooled over real tokens as sentence-transformers does."""
        if self.model is None:
            from transformers import AutoModel, AutoTokenizer

            from ..models import from_pretrained, resolve_name

            source = resolve_name(self.name)
            self.tokenizer = from_pretrained(AutoTokenizer, self.name, source)
            self.model = from_pretrained(AutoModel, self.name, source).eval()
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], truncation=True, max_length=self.max_length,
                                   padding=True, return_tensors="pt", split_special_tokens=True)  # fmt: skip
            hidden = self.model(**batch).last_hidden_state  # (b, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.empty(0, 0)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        if not responses:
            return []
        distinct = sorted(set(prompts))
        prompt_vecs = self.embed(distinct)
        row = {p: i for i, p in enumerate(distinct)}
        response_vecs = self.embed(list(responses))
        prompt_rows = prompt_vecs[[row[p] for p in prompts]]
        return (prompt_rows * response_vecs).sum(-1).tolist()


# ==========================================================================================================
# the noisy labeler


@dataclass
class SimulatedLabeler:
    """Answers comparisons by sampling from Bradley-Terry on the judge's scores.

    judge: the true score; name: written into each comparison's `labeler` field (with #j for labeler j);
    temperature: Bradley-Terry temperature in the judge's units (0 = noiseless); labelers: how many independent
    labelers answer each comparison (each contributes one comparison, so a set of n_labelers comparisons of
    the same responses shows their disagreement).
    """

    judge: RewardFn
    name: str = "sim"
    temperature: float = 0.1
    labelers: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"labeler temperature must be >= 0, got {self.temperature}")
        if self.labelers < 1:
            raise UserError(f"labelers must be >= 1, got {self.labelers}")
        self.rng = random.Random(self.seed)

    def choose(self, scores: Sequence[float]) -> int:
        """One labeler's pick among k responses with true `scores`."""
        if self.temperature == 0:
            return max(range(len(scores)), key=lambda i: scores[i])
        top = max(scores)
        weights = [math.exp((s - top) / self.temperature) for s in scores]
        return self.rng.choices(range(len(scores)), weights=weights)[0]

    def label(self, prompts: list[str], responses: list[list[str]]) -> list[Comparison]:
        """Comparisons for each prompt's k responses: `labelers` comparisons per prompt, one per labeler."""
        flat_prompts = [p for p, rs in zip(prompts, responses) for _ in rs]
        flat = [float(s) for s in self.judge(flat_prompts, [r for rs in responses for r in rs])]
        out, pos = [], 0
        for prompt, rs in zip(prompts, responses):
            scores = flat[pos : pos + len(rs)]
            pos += len(rs)
            for j in range(self.labelers):
                name = self.name if self.labelers == 1 else f"{self.name}#{j}"
                out.append(Comparison(prompt=prompt, responses=list(rs), best=self.choose(scores), labeler=name))
        return out


def agreement(comparisons: Sequence[Comparison]) -> float:
    """Share of pairs of labels on the same (prompt, responses) that pick the same best; NaN with no such pair."""
    groups: dict[tuple, list[int]] = {}
    for c in comparisons:
        groups.setdefault((c.prompt, tuple(c.responses)), []).append(c.best)
    same = total = 0
    for picks in groups.values():
        for i in range(len(picks)):
            for j in range(i + 1, len(picks)):
                same += picks[i] == picks[j]
                total += 1
    return same / total if total else float("nan")
