"""Text cleaning and counting: Fan et al.'s tokenised prompts made plain again, Reddit's post-hoc meta lines found
and removed, and the word n-grams that show a loop.

Text in, text out: no file, no model. `data.py` applies these while reading stories; `evals/measures.py` measures
how often samples carry meta lines or loop; `rewards/spec.py` penalises loops.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# ---------------------------------------------------------------------------------------------------------------
# Fan et al. (2018) prompts: undo the tokenisation
# ---------------------------------------------------------------------------------------------------------------

# A leading post tag: "[ WP ]", "[ wp ]", "[ WP/IP ]", "[ Modpost ]". Only tags at the start are touched, so a
# bracketed aside inside the text ("[ sic ]") keeps its case.
_TAG = re.compile(r"\[\s*([A-Za-z][A-Za-z/]{0,11})\s*\]\s*")
# (pattern, replacement) applied in order; each undoes one habit of Fan et al.'s Moses-style tokeniser.
_DETOKENISE = [
    (re.compile(r"[ \t]*\n[ \t]*"), "\n"),  # paragraphs " \n \n " -> "\n\n"
    (re.compile(r"``\s?"), '"'),  # opening quote `` -> "
    (re.compile(r"\s?''"), '"'),  # closing quote '' -> "
    (re.compile(r"“ "), "“"),
    (re.compile(r" ”"), "”"),
    (re.compile(r"(\w) (n't)\b", re.IGNORECASE), r"\1\2"),  # do n't, ca n't, wo n't
    (re.compile(r"(\w) ?(['’]) ?(t|s|re|ve|m|ll|d)\b", re.IGNORECASE), r"\1\2\3"),  # it 's, you 're, doesn ’ t
    (re.compile(r" ([.,!?;:%])"), r"\1"),  # "word ," -> "word,"; ". . ." -> "..."
    (re.compile(r"([(\[{]) "), r"\1"),  # "( iPhone )" -> "(iPhone)"
    (re.compile(r" ([)\]}])"), r"\1"),
    (re.compile(r"\$ (?=\d)"), "$"),  # "$ 20.00"
    (re.compile(r" {2,}"), " "),
]


def clean_prompt(text: str) -> str:
    """Undo Fan et al.'s tokenisation and write post tags as Reddit does; text in plain form comes back unchanged.

    >>> clean_prompt("[ wp ] `` Dad , why ca n't Mom come with us ? ''")
    '[WP] "Dad, why can\\'t Mom come with us?"'
    >>> clean_prompt("[ IP ] [ Wp ] A walk ( at dawn ) . \\n \\n Then rain .")
    '[IP] [WP] A walk (at dawn).\\n\\nThen rain.'
    """
    text = text.strip()
    tags = []
    while m := _TAG.match(text):
        tags.append(f"[{m.group(1).upper()}]")
        text = text[m.end() :]
    for pattern, replacement in _DETOKENISE:
        text = pattern.sub(replacement, text)
    return " ".join([*tags, text.strip()]).strip()


# ---------------------------------------------------------------------------------------------------------------
# Karma artifacts: post-hoc Reddit lines (edits, links, thanks for gold) that predict karma, not story quality
# ---------------------------------------------------------------------------------------------------------------

# Markdown that may come before a line's first word: emphasis, quote, heading, list bullet, an opening bracket.
_LEAD = r"^[\s>*_#~(\[^-]*"
_EDIT_LINE = re.compile(_LEAD + r"(edit(ed|s)?|update[ds]?)\s*#?\d*\s*[*_]*\s*[:\-–—]", re.IGNORECASE)
# A link to reddit (another post, the author's subreddit) or a subreddit / user mention: /r/HFY, r/HFY, u/someone;
# not "and/or" nor "r/c".
_REDDIT = re.compile(r"reddit\.com|redd\.it|(?<![\w/])/?[ru]/[A-Za-z0-9_-]{3,}", re.IGNORECASE)
_SIGN_OFF = re.compile(
    r"\b(thanks|thank you)\b[^.!?\n]{0,25}\bfor\b[^.!?\n]{0,15}"
    r"\b(gold|silver|platinum|upvote|karma|award|gild|front ?page)"
    r"|" + _LEAD + r"(thanks|thank you)\b[^.!?\n]{0,30}\bfor (reading|the read)\b"
    r"|\bcheck out (my|more of my)\b"
    r"|\bif you (liked|enjoyed)\b.{0,80}\b(subscribe|follow|check out)",
    re.IGNORECASE,
)
# Substrings (lower case) one of which every _REDDIT or _SIGN_OFF match contains: a cheap test that skips the
# regexes on most lines (it makes cleaning the 11k-story file ~5x faster).
_HINTS = ("reddit", "redd.it", "r/", "u/", "thank", "check out", "if you liked", "if you enjoyed")
_QUOTES = re.compile(r"[\"“”]")
_MD_LINK = re.compile(r"\[([^\]\n]*)\]\((?:[^()\s]|\([^()\s]*\))*\)")  # [text](url), url may hold one (...)
_URL = re.compile(r"https?://[^\s)\]]+")
# An author's note about the post is short; a longer line that mentions reddit is story (a tale about redditors).
MAX_NOTE_WORDS = 50
_RULE = re.compile(r"^\s*([-*_]\s*){3,}$")  # a Markdown horizontal rule: ---, ***, ___, - - -
_ENTITIES = [("&amp;", "&"), ("&nbsp;", " "), ("&#x200B;", ""), ("&lt;", "<"), ("&gt;", ">")]


def is_meta_line(line: str) -> bool:
    """True for a line a Reddit author added about the post rather than the story.

    That is: a line starting with an edit or update note ("Edit:", "**EDIT 2:**", "Update -"); or, on a line
    without quotation marks (dialogue is story, even "Thanks for the gold," the dwarf said.), a link to reddit or
    a subreddit / user mention within at most MAX_NOTE_WORDS words, thanks for gold / upvotes / reading, "check
    out my ...", or "if you liked this ... subscribe / follow / check out".
    """
    return _EDIT_LINE.match(line) is not None or _is_note(line)


def _is_note(line: str) -> bool:
    low = line.lower()
    if not any(hint in low for hint in _HINTS) or _QUOTES.search(line):
        return False
    if _REDDIT.search(line) and len(_unlink(line).split()) <= MAX_NOTE_WORDS:
        return True
    return _SIGN_OFF.search(line) is not None


def _unlink(line: str) -> str:
    """The line with Markdown links reduced to their text and bare URLs removed."""
    if "](" in line:  # the `in` tests skip the regexes on almost every line
        line = _MD_LINK.sub(r"\1", line)
    return _URL.sub("", line) if "://" in line else line


def _split_meta(text: str) -> tuple[list[str], list[bool]]:
    """text's lines and, for each, whether it is a meta line (`is_meta_line`)."""
    lines = text.replace("\r\n", "\n").split("\n")
    low = text.lower()
    maybe_note = any(hint in low for hint in _HINTS)  # most stories hold no hint at all: skip their lines' checks
    return lines, [_EDIT_LINE.match(ln) is not None or (maybe_note and _is_note(ln)) for ln in lines]


def clean_meta(text: str) -> str:
    """The story without its post-hoc meta lines (see `is_meta_line`): Reddit's HTML entities decoded, Markdown
    links on the lines kept reduced to their text and bare URLs dropped, no horizontal rule or blank line left
    dangling at either end, runs of blank lines made one.

    Karma-scored stories carry these lines in proportion to their karma (../shared/data/README.md), so a reward
    model trained on raw text learns "add a subreddit link", and PPO then writes one.

    >>> clean_meta("The end.\\n\\n---\\n\\n**Edit:** thanks for the gold!\\n\\nMore at /r/MyStories")
    'The end.'
    >>> clean_meta('"Thank you," she [said](https://x.org/a_(b)).&nbsp;Rock &amp; roll.')
    '"Thank you," she said. Rock & roll.'
    """
    for entity, char in _ENTITIES:
        text = text.replace(entity, char)
    lines, meta = _split_meta(text)
    lines = [_unlink(line) for line, is_meta in zip(lines, meta) if not is_meta]
    lines = ["" if not line.strip() else line for line in lines]
    while lines and (not lines[-1] or _RULE.match(lines[-1])):
        lines.pop()
    while lines and (not lines[0] or _RULE.match(lines[0])):
        lines.pop(0)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text) if "\n\n\n" in text else text


def has_meta(text: str) -> bool:
    """True when `text` holds at least one meta line (what `clean_meta` would remove)."""
    return any(_split_meta(text)[1])


def meta_share(texts: Iterable[str]) -> float:
    """Share (0..1) of `texts` that contain at least one meta line; 0.0 for no texts. For reports: does a set of
    samples (top-karma stories, PPO outputs) carry more Reddit meta than another?"""
    flags = [has_meta(t) for t in texts]
    return sum(flags) / len(flags) if flags else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Loops: word n-grams that come back
# ---------------------------------------------------------------------------------------------------------------


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The lower-cased whitespace-word n-grams of `text`, in order (none when it has under n words)."""
    words = text.lower().split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repeated_share(text: str, n: int = 4) -> float:
    """Share (0..1) of `text`'s word n-grams that repeat an earlier one: 0 for none (or under n words), near 1 for a
    phrase said over and over. Above 0 where some n-gram comes back (a loop); graded, so a reward can rank two
    loops."""
    grams = word_ngrams(text, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0
