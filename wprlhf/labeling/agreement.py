"""Agreement between labelers: raw agreement and Cohen's kappa per pair of labelers, Fleiss' kappa overall.

Counted on comparisons answered by more than one person; an answer is a response index or "tie" (skips are not
answers). Pure Python with no imports from wprlhf, so the labeling server (which has no model) can use it.
"""

from __future__ import annotations

import itertools
from collections import Counter


def cohen_kappa(a: list, b: list) -> dict:
    """Two labelers' answers to the same items, a[i] and b[i] for item i: items, agree (how many equal), raw
    (agree / items) and kappa (Cohen 1960): (p_o - p_e) / (1 - p_e) with p_o = raw and p_e = sum over answers k of
    p_a(k) * p_b(k), each labeler's own share of k. kappa is None without items, or when p_e = 1 (both gave one
    and the same answer to everything: chance alone explains it, and the ratio is 0 / 0)."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs answers to the same items: got {len(a)} and {len(b)}")
    n = len(a)
    agree = sum(x == y for x, y in zip(a, b))
    if n == 0:
        return {"items": 0, "agree": 0, "raw": None, "kappa": None}
    count_a, count_b = Counter(a), Counter(b)
    p_e = sum(count_a[k] * count_b[k] for k in count_a) / (n * n)
    p_o = agree / n
    return {"items": n, "agree": agree, "raw": p_o, "kappa": None if p_e == 1 else (p_o - p_e) / (1 - p_e)}


def fleiss_kappa(items: list[list]) -> dict:
    """Every labeler together, over items answered by two or more (each a list of its answers): items, pairs (of
    answers to one item), agree (pairs that are equal), raw (agree / pairs) and kappa (Fleiss 1971, eqs. 2-6, with
    n_i answers to item i allowed to differ): P_i = sum_k n_ik (n_ik - 1) / (n_i (n_i - 1)), P = the mean of P_i,
    p_k = the share of all answers that are k, P_e = sum_k p_k^2, kappa = (P - P_e) / (1 - P_e); None when P_e = 1
    or there are no items."""
    items = [list(answers) for answers in items if len(answers) >= 2]
    pairs = sum(len(x) * (len(x) - 1) // 2 for x in items)
    agree = sum(sum(c * (c - 1) // 2 for c in Counter(x).values()) for x in items)
    if not items:
        return {"items": 0, "pairs": 0, "agree": 0, "raw": None, "kappa": None}
    p_bar = sum(sum(c * (c - 1) for c in Counter(x).values()) / (len(x) * (len(x) - 1)) for x in items) / len(items)
    shares = Counter(answer for x in items for answer in x)
    total = sum(shares.values())
    p_e = sum((c / total) ** 2 for c in shares.values())
    return {"items": len(items), "pairs": pairs, "agree": agree, "raw": agree / pairs,
            "kappa": None if p_e == 1 else (p_bar - p_e) / (1 - p_e)}  # fmt: skip


def agreement_report(by_item: dict) -> dict:
    """{"overall": fleiss_kappa over every item, "pairs": [cohen_kappa of each two labelers on the items both
    answered, with "a" and "b" their names]} from {item: {labeler: answer}}; only pairs with shared items."""
    names = sorted({name for answers in by_item.values() for name in answers})
    pairs = []
    for a, b in itertools.combinations(names, 2):
        shared = [answers for answers in by_item.values() if a in answers and b in answers]
        if shared:
            pairs.append({"a": a, "b": b, **cohen_kappa([x[a] for x in shared], [x[b] for x in shared])})
    return {"overall": fleiss_kappa([list(answers.values()) for answers in by_item.values()]), "pairs": pairs}
