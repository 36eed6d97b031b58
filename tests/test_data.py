"""The data layer: every loader format, bad-input messages, karma -> pairs / best-of-k, the split, meta-line cleaning.

Fixture files are written here into tmp_path; the last tests read ../shared/data when it is present.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import sys
import types

import pytest

from wprlhf.data import (
    Comparison,
    Response,
    best_of_k,
    clearly_better,
    karma_pairs,
    length_ratio,
    load_comparisons,
    load_prompts,
    load_responses,
    prompt_key,
    read_rows,
    split_by_prompt,
    vote_strength,
    write_comparisons,
)
from wprlhf.errors import UserError
from wprlhf.text import clean_meta, clean_prompt, has_meta, meta_share

# Columns of the hub file prompt_responses_full.csv, with its two extra columns that the loader ignores.
HUB_COLUMNS = ["Unnamed: 0", "prompt_id", "prompt", "prompt_score", "response_id", "response", "response_score",
               "response_rank", "num_responses", "score_bin"]  # fmt: skip
STORY = 'She opened the door.\n\n"Who is it?" he asked, "and why, at this hour?"\n\nNo one answered.'
ROWS = [
    [0, "p1", "[WP] a door", 50, "p1_r0", STORY, 120, 0, 2, "high"],
    [1, "p1", "[WP] a door", 50, "p1_r1", "A short one.\n\nEdit: thanks for the gold!", 7, 1, 2, "low"],
    [2, "p2", "[WP] a fox", 9, "p2_r0", "The fox ran.", "", "", 1, ""],
]
EXPECTED = [
    Response("p1", "[WP] a door", "p1_r0", STORY, 120.0, 0),
    Response("p1", "[WP] a door", "p1_r1", "A short one.", 7.0, 1),
    Response("p2", "[WP] a fox", "p2_r0", "The fox ran.", None, None),
]


def write_csv(path, columns, rows):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def write_jsonl(path, columns, rows):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({c: (None if v == "" else v) for c, v in zip(columns, row)}) + "\n")
    return path


# ----- formats ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["r.csv", "r.csv.gz", "r.jsonl", "r.jsonl.gz"])
def test_load_responses_reads_each_format_alike(tmp_path, name):
    write = write_jsonl if ".jsonl" in name else write_csv
    path = write(tmp_path / name, HUB_COLUMNS, ROWS)
    responses = load_responses(path)
    assert responses == EXPECTED  # the story's newlines survive the quoted CSV field; the edit line is gone
    assert responses.skipped == [] and responses.source == str(path)


def test_load_responses_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow, an optional dependency")
    import pyarrow.parquet as pq

    columns = {c: [row[i] for row in ROWS] for i, c in enumerate(HUB_COLUMNS)}
    for c in ("response_score", "response_rank", "score_bin"):  # typed columns: empty = null
        columns[c] = [None if v == "" else v for v in columns[c]]
    pq.write_table(pa.table(columns), tmp_path / "r.parquet")
    assert load_responses(tmp_path / "r.parquet") == EXPECTED


def test_directory_source_picks_the_known_file(tmp_path):
    write_csv(tmp_path / "prompt_responses_full.csv", HUB_COLUMNS, ROWS)
    write_csv(tmp_path / "other.csv", ["x"], [[1]])
    assert load_responses(tmp_path) == EXPECTED
    (tmp_path / "prompt_responses_full.csv").unlink()
    with pytest.raises(UserError, match="is a directory holding none of prompt_responses.csv.gz, "):
        load_responses(tmp_path)


def test_read_rows_keeps_long_multiline_fields(tmp_path):
    story = "line one\n" + "x" * 300_000  # beyond csv's default 128 KiB field limit
    rows = read_rows(write_csv(tmp_path / "long.csv", ["prompt", "story"], [["p", story]]))
    assert rows == [{"prompt": "p", "story": story}] and rows.columns == ["prompt", "story"]
    assert rows.where == ["row 1 (line 2)"]


def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_id_goes_through_datasets_with_the_responses_file(monkeypatch):
    calls = []

    def load_dataset(path, data_files=None, split=None):
        calls.append((path, data_files, split))
        return [dict(zip(HUB_COLUMNS, row)) for row in ROWS]  # what iterating a datasets.Dataset yields

    _fake_datasets(monkeypatch, load_dataset)
    assert load_responses("rewardsignal/reddit_writing_prompts") == EXPECTED
    assert calls == [("rewardsignal/reddit_writing_prompts", "prompt_responses_full.csv", "train")]
    load_responses("someone/stories:data/other.csv")
    assert calls[-1] == ("someone/stories", "data/other.csv", "train")


def test_hub_id_errors_are_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(UserError, match=r"needs the `datasets` package: pip install datasets"):
        load_responses("rewardsignal/reddit_writing_prompts")

    def offline(path, data_files=None, split=None):
        raise ConnectionError("Couldn't reach 'rewardsignal/reddit_writing_prompts' on the Hub")

    _fake_datasets(monkeypatch, offline)
    message = r"could not load rewardsignal/reddit_writing_prompts file prompt_responses_full.csv from the Hugging"
    with pytest.raises(UserError, match=message + r" Face hub \(ConnectionError"):
        load_responses("rewardsignal/reddit_writing_prompts")


@pytest.mark.parametrize(
    "source, message",
    [
        ("missing/file.csv", "missing/file.csv does not exist"),
        ("./nothing_here", "nothing_here does not exist"),
    ],
)
def test_missing_local_paths_are_not_taken_for_hub_ids(tmp_path, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        load_responses(source)


def test_unknown_format_and_broken_gzip(tmp_path):
    (tmp_path / "r.xlsx").write_text("x")
    with pytest.raises(UserError, match=r"r.xlsx: unknown format; use one of .csv, .csv.gz"):
        read_rows(tmp_path / "r.xlsx")
    (tmp_path / "r.csv.gz").write_bytes(gzip.compress(b"a,b\n1,2\n" * 100)[:-12])
    with pytest.raises(UserError, match=r"r.csv.gz is not a complete gzip file"):
        read_rows(tmp_path / "r.csv.gz")


# ----- malformed rows: fail names file and line, skip counts ------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.csv", "a,b\n1,2\n3,4,5\n6,7\n", r"bad.csv row 2 \(line 3\) has 3 fields but the header has 2"),
        ("bad.csv", 'a,b\n1,"x\ny"\n2,"abc"def\n6,7\n', r"bad.csv row 2 \(line 4\) is not valid CSV"),
        ("bad.jsonl", '{"a": 1}\n{"a": oops}\n{"a": 3}\n', r"bad.jsonl line 2 is not valid JSON"),
        ("bad.jsonl", '{"a": 1}\n[1, 2]\n{"a": 3}\n', r"bad.jsonl line 2 is a JSON list, not an object"),
    ],
)
def test_malformed_rows_fail_or_skip(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_rows(path)
    rows = read_rows(path, on_error="skip")
    assert len(rows) == 2 and len(rows.skipped) == 1 and rows.skipped[0].startswith(str(path))


def test_unclosed_quote_says_so(tmp_path):
    path = tmp_path / "open.csv"
    path.write_text('a,b\n1,2\n3,"never closed\n4,5\n')
    with pytest.raises(UserError, match=r"row 2 \(line 3\) is not valid CSV: .*a quoted field is never closed"):
        read_rows(path)
    with pytest.raises(UserError, match="on_error='ignore' is not one of"):
        read_rows(path, on_error="ignore")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"response": "   "}, r"r.csv row 2 \(line 7\): response is empty; fill it in or remove the row"),
        ({"prompt_id": ""}, r"row 2 \(line 7\): prompt_id is empty"),
        ({"response_id": "p1_r0"}, r"row 2 \(line 7\): response_id p1_r0 repeats row 1 \(line 2\); response ids must"),
        ({"response_score": "lots"}, r"row 2 \(line 7\): response_score 'lots' is not a number"),
        ({"response_rank": "1.5"}, r"row 2 \(line 7\): response_rank '1.5' is not a whole number"),
        ({"response": "Edit: typo\n\n/r/MyStories"}, r"row 2 \(line 7\): response holds only Reddit meta lines"),
    ],
)
def test_bad_responses_fail_with_the_row_or_are_skipped(tmp_path, change, message):
    rows = [list(r) for r in ROWS]
    for column, value in change.items():
        rows[1][HUB_COLUMNS.index(column)] = value
    path = write_csv(tmp_path / "r.csv", HUB_COLUMNS, rows)
    with pytest.raises(UserError, match=message):
        load_responses(path)
    loaded = load_responses(path, on_error="skip")
    assert [r.response_id for r in loaded] == ["p1_r0", "p2_r0"] and len(loaded.skipped) == 1


def test_missing_response_columns_are_named(tmp_path):
    path = write_csv(tmp_path / "r.csv", ["prompt", "story", "response_score"], [["p", "s", 1]])
    with pytest.raises(UserError, match=r"r.csv lacks column\(s\) prompt_id, response_id, response \(has: prompt, "
                                        r"story, response_score\); expected the columns of rewardsignal"):  # fmt: skip
        load_responses(path)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="empty.csv is empty; a CSV needs a header row"):
        load_responses(tmp_path / "empty.csv")


def test_keep_meta_keeps_the_raw_text(tmp_path):
    path = write_csv(tmp_path / "r.csv", HUB_COLUMNS, ROWS)
    assert load_responses(path, keep_meta=True)[1].response == "A short one.\n\nEdit: thanks for the gold!"


# ----- comparisons ------------------------------------------------------------------------------------------------

PAIR_COLUMNS = ["prompt_id", "prompt", "response_a_id", "response_a", "response_b_id", "response_b", "score_a",
                "score_b", "score_gap", "label"]  # fmt: skip
PAIRS = [
    ["p1", "[WP] a door", "p1_r0", STORY, "p1_r1", "A short one.", 120, 7, 113, 0],
    ["p1", "[WP] a door", "p1_r2", "Meh.\n\n---\n\nCheck out my other stories!", "p1_r0", STORY, 3, 120, 117, 1],
]


def test_pair_csv_reads_as_comparisons(tmp_path):
    comparisons = load_comparisons(write_csv(tmp_path / "pairs.csv", PAIR_COLUMNS, PAIRS))
    assert comparisons == [
        Comparison("[WP] a door", [STORY, "A short one."], 0, prompt_id="p1", strength=math.log2(120 / 7)),
        Comparison("[WP] a door", ["Meh.", STORY], 1, prompt_id="p1", strength=math.log2(120 / 3)),  # sign-off and dangling rule removed
    ]


def test_a_pair_strength_is_the_log_vote_ratio_or_a_column_and_must_be_positive(tmp_path):
    assert vote_strength(40, 20) == 1.0 and vote_strength(25, 1) == pytest.approx(math.log2(25))
    assert vote_strength(21, -3) == pytest.approx(math.log2(21)) and vote_strength(30, 20) == 1.0  # floored at 1
    rows = [["[WP] x", "a b", "c", 0, 2.5], ["[WP] x", "a b", "c", 1, ""]]
    loaded = load_comparisons(write_csv(tmp_path / "s.csv", ["prompt", "response_a", "response_b", "label", "strength"], rows))
    assert [c.strength for c in loaded] == [2.5, 1.0]  # no strength and no scores: an ordinary label
    path = write_comparisons(tmp_path / "c.jsonl", loaded)
    assert [c.strength for c in load_comparisons(path)] == [2.5, 1.0]
    for bad in (0, -1, float("nan"), "2"):
        with pytest.raises(ValueError, match="strength"):
            Comparison("[WP] x", ["a", "b"], 0, strength=bad)


def test_length_matched_karma_pairs_keep_only_stories_of_similar_length():
    words = lambda n: " ".join(["w"] * n)  # noqa: E731
    responses = [Response("p1", "[WP] x", "p1_r0", words(100), 500), Response("p1", "[WP] x", "p1_r1", words(120), 10),
                 Response("p1", "[WP] x", "p1_r2", words(200), 9), Response("p1", "[WP] x", "p1_r3", words(96), 400)]  # fmt: skip
    every = karma_pairs(responses, max_pairs_per_prompt=None)
    matched = karma_pairs(responses, max_pairs_per_prompt=None, max_length_ratio=1.25)
    assert len(every) == 4 and all(length_ratio(c.responses) <= 1.25 for c in matched)
    assert sorted(sorted(len(r.split()) for r in c.responses) for c in matched) == [[96, 120], [100, 120]]
    assert length_ratio(["", "one two"]) == 2.0


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz"])
@pytest.mark.parametrize("keep_meta", [False, True])
def test_pair_csv_to_jsonl_round_trip_is_lossless(tmp_path, name, keep_meta):
    pairs = load_comparisons(write_csv(tmp_path / "pairs.csv", PAIR_COLUMNS, PAIRS), keep_meta=keep_meta)
    out = write_comparisons(tmp_path / name, pairs)
    again = load_comparisons(out, keep_meta=keep_meta)
    assert again == pairs and len(again) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


def test_k_way_jsonl_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"prompt": "[WP] x", "responses": ["a", "b", "c", "d"], "best": 2, "labeler": "ann", "tie": False},
            {"prompt": "[WP] y", "responses": ["e", "f"], "best": 0, "labeler": "bob", "tie": True}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_comparisons(path) == [Comparison("[WP] x", ["a", "b", "c", "d"], 2, "ann"),
                                      Comparison("[WP] y", ["e", "f"], 0, "bob", tie=True)]  # fmt: skip


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "responses": ["a", "b"], "best": 2}, r"c.jsonl line 2: best=2 must be an integer index"),
        ({"prompt": "p", "responses": ["a", "b", "c"], "best": -1}, r"into the 3 responses \(0..2\)"),
        ({"prompt": "p", "responses": ["a", "b"], "best": True}, r"line 2: best=True must be an integer index"),
        ({"prompt": "p", "responses": ["a"], "best": 0}, r"line 2: responses must be a list of at least 2 texts"),
        ({"prompt": "p", "responses": "a|b", "best": 0}, r"line 2: responses must be a JSON list of texts, got str"),
        ({"prompt": "p", "responses": ["a", 7], "best": 0}, r"line 2: responses must be text, got int"),
        ({"prompt": "", "responses": ["a", "b"], "best": 0}, r"line 2: prompt is empty"),
        ({"prompt": "p", "responses": ["a", "b"], "best": 0, "tie": "no"}, r"line 2: labeler must be text and tie"),
    ],
)
def test_bad_comparisons_jsonl(tmp_path, row, message):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "responses": ["a", "b"], "best": 1}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=message):
        load_comparisons(path)
    loaded = load_comparisons(path, on_error="skip")
    assert len(loaded) == 1 and len(loaded.skipped) == 1


@pytest.mark.parametrize(
    "label, message",
    [("2", r"pairs.csv row 2 \(line 7\): label '2' must be 0 \(response_a is better\) or 1"),
     ("", r"row 2 \(line 7\): label '' must be 0"), ("b", r"row 2 \(line 7\): label 'b' is not a number")],
)  # fmt: skip
def test_bad_pair_labels(tmp_path, label, message):
    rows = [list(r) for r in PAIRS]
    rows[1][-1] = label
    with pytest.raises(UserError, match=message):
        load_comparisons(write_csv(tmp_path / "pairs.csv", PAIR_COLUMNS, rows))


def test_pair_file_missing_columns(tmp_path):
    path = write_csv(tmp_path / "pairs.csv", ["prompt", "chosen", "rejected"], [["p", "a", "b"]])
    with pytest.raises(UserError, match=r"lacks column\(s\) response_a, response_b, label .* a pair file needs"):
        load_comparisons(path)


def test_write_comparisons_is_atomic(tmp_path):
    path = write_comparisons(tmp_path / "c.jsonl", [Comparison("p", ["a", "b"], 1)])
    before = path.read_text()
    bad = Comparison("p", ["a", "b"], 0)
    bad.best = 5  # made invalid after construction
    with pytest.raises(ValueError, match="best=5"):
        write_comparisons(path, [Comparison("q", ["c", "d"], 0), bad])
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]
    assert json.loads(before) == {"prompt": "p", "responses": ["a", "b"], "best": 1, "labeler": "", "tie": False,
                                  "prompt_id": "", "strength": 1.0}  # fmt: skip


# ----- karma -> comparisons ---------------------------------------------------------------------------------------


def scored(prompt_id, *scores):
    return [Response(prompt_id, f"prompt {prompt_id}", f"{prompt_id}_{i}", f"{prompt_id} story {s}", s, None)
            for i, s in enumerate(scores)]  # fmt: skip


def winner_loser(c: Comparison) -> tuple[str, str]:
    assert len(c.responses) == 2
    return c.responses[c.best], c.responses[1 - c.best]


def test_karma_pairs_follow_the_gap_and_ratio_rule():
    # p1: 100-40 (gap 60, ratio 2.5), 100-30, 100-(-5), 40-(-5) (ratio 40/1), 30-(-5) qualify; 40-30 (gap 10) not;
    # None has no karma. p2: 60-35 has the gap but ratio 1.7; 19-0 has the ratio but gap 19; 60-19, 60-0 and 35-0
    # qualify. Across prompts never (p1's 100 vs p2's 35 would).
    responses = scored("p1", 100, 40, 30, -5, None) + scored("p2", 60, 35, 19, 0)
    pairs = karma_pairs(responses, max_pairs_per_prompt=None)
    got = {winner_loser(c) for c in pairs}
    assert got == {("p1 story 100", "p1 story 40"), ("p1 story 100", "p1 story 30"), ("p1 story 100", "p1 story -5"),
                   ("p1 story 40", "p1 story -5"), ("p1 story 30", "p1 story -5"),
                   ("p2 story 60", "p2 story 19"), ("p2 story 60", "p2 story 0"),
                   ("p2 story 35", "p2 story 0")}  # fmt: skip
    assert len(pairs) == len(got) and all(c.labeler == "karma" and c.prompt == f"prompt {c.prompt_id}" for c in pairs)
    assert clearly_better(60, 35) is False and clearly_better(60, 35, min_ratio=1.5) is True


def test_karma_pairs_balance_labels_cap_per_prompt_and_repeat_with_a_seed():
    responses = [r for p in range(30) for r in scored(f"p{p:02d}", *(2**i for i in range(12)))]
    pairs = karma_pairs(responses, max_pairs_per_prompt=5)
    assert len(pairs) == 30 * 5
    assert 0.4 < sum(c.best for c in pairs) / len(pairs) < 0.6
    assert all(clearly_better(*(float(t.split()[-1]) for t in winner_loser(c))) for c in pairs)
    assert karma_pairs(responses, max_pairs_per_prompt=5) == pairs
    assert karma_pairs(responses, max_pairs_per_prompt=5, seed=1) != pairs
    assert [c.prompt_id for c in pairs] == sorted(c.prompt_id for c in pairs)  # threads in prompt-id order


def test_karma_needs_scores():
    with pytest.raises(UserError, match="no response has a karma score"):
        karma_pairs(scored("p1", None, None))
    assert karma_pairs([]) == []


def test_best_of_k_has_one_clear_winner():
    # 200 beats all five others; 90 beats 40, 30, 20 (not 50: ratio 1.8); 50 beats only 20. k=4: winners 200, 90.
    responses = scored("p1", 200, 50, 40, 30, 20, 90) + scored("p2", 10, 5)
    sets = best_of_k(responses, k=4)
    assert sorted(c.responses[c.best] for c in sets) == ["p1 story 200", "p1 story 90"]
    for c in sets:
        karma = [float(t.split()[-1]) for t in c.responses]
        assert len(set(c.responses)) == 4
        assert all(clearly_better(karma[c.best], s) for i, s in enumerate(karma) if i != c.best)
    assert [c.responses[c.best] for c in best_of_k(responses, k=5)] == ["p1 story 200"]
    many = [r for p in range(40) for r in scored(f"p{p:02d}", 200, 50, 40, 30, 20, 90)]
    assert {c.best for c in best_of_k(many, k=4)} == {0, 1, 2, 3}  # the winner's position carries no signal
    with pytest.raises(UserError, match="best_of_k needs k >= 2"):
        best_of_k(responses, k=1)


def test_best_of_k_caps_sets_per_prompt():
    responses = scored("p1", *(3**i for i in range(10)))
    assert len(best_of_k(responses, k=3, max_sets_per_prompt=None)) == 7  # 27 (beats 1 and 3) and up; 9 beats none
    assert len(best_of_k(responses, k=3, max_sets_per_prompt=2)) == 2


def test_split_by_prompt_keeps_each_prompt_and_its_reposts_on_one_side():
    prompts = [f"[WP] prompt number {i}" for i in range(40)]
    items = [Response(f"p{i}", p, f"p{i}_r{j}", "s", 1.0, j) for i, p in enumerate(prompts) for j in range(3)]
    items += [Response("p99", "[ wp ] Prompt number 7!", "p99_r0", "s", 1.0, 0)]  # a repost of prompt 7
    train, test = split_by_prompt(items, test_fraction=0.25)
    train_keys, test_keys = {prompt_key(r.prompt) for r in train}, {prompt_key(r.prompt) for r in test}
    assert not train_keys & test_keys and len(test_keys) == 10 and len(train) + len(test) == len(items)
    side = [any(r.prompt_id in ("p7", "p99") for r in half) for half in (train, test)]
    assert side in ([True, False], [False, True])
    assert split_by_prompt(items, test_fraction=0.25) == (train, test)
    assert split_by_prompt(prompts, 0.1, seed=3)[1] != split_by_prompt(prompts, 0.1, seed=4)[1]
    with pytest.raises(UserError, match=r"test_fraction=1.0 must be in \[0, 1\)"):
        split_by_prompt(items, test_fraction=1.0)


# ----- meta lines and prompt detokenisation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Story.\n\nEdit: thanks for the gold!", "Story."),
        ("Story.\n\n**Edit:** fixed a typo\n\nEDIT 2: wow\n\nEdit2 - more\n\nUPDATE: part 2 soon", "Story."),
        ("Story.\n\n---\n\n[Part 2](https://www.reddit.com/r/WritingPrompts/comments/abc)\n\n***", "Story."),
        ("Story.\n\nMore stories at /r/MyStories.\n\nr/HFY too. Thanks u/someone for the prompt.", "Story."),
        ("Story.\n\n[More here](https://redd.it/abc)\n\n___", "Story."),
        ("Story.\n\nWow, thanks for the upvotes everyone!\n\nThank you all so much for reading!", "Story."),
        ("Story.\n\nCheck out my other stories!\n\nIf you liked this, subscribe for more.", "Story."),
        ("Part one.\n\n---\n\nPart two.\n\n\n\n\nEnd.", "Part one.\n\n---\n\nPart two.\n\nEnd."),  # inner rule kept
        ("A&amp;B met at&nbsp;noon.", "A&B met at noon."),
        # links that are not about reddit keep their text; bare URLs go
        (
            "He read [the news](https://x.org/a_(b)) twice.\n\nListen https://youtu.be/x",
            "He read the news twice.\n\nListen ",
        ),
        # the false-positive guard: story text that merely contains a common word stays
        ('"Thank you," she said.\n\n"Thanks for the gold," the dwarf muttered.', None),
        ("The editor said: no.\n\nUpdate the firmware, she typed.\n\nThanks to him, we lived.", None),
        ("He drove his r/c car, and/or walked.\n\nI edited it - twice.", None),
        ("Check out the view, he said. If you liked the sea, you'd love this.", None),
        ('"I post on r/SuperPowers," she said.\n\nShe thanks me for the seat and I flash an award-winning grin.', None),
        ("My feed was all r/politics, " + "and the news picked it up, word by word, " * 6 + "until I won.", None),
    ],
)
def test_clean_meta(raw, clean):
    assert has_meta(raw) == (clean == "Story.")  # the other cases hold no meta line
    clean = raw if clean is None else clean
    assert clean_meta(raw) == clean
    assert clean_meta(clean) == clean  # idempotent: cleaning cleaned text changes nothing


def test_meta_share():
    texts = ["Story.\n\nEdit: typo", "Story.", '"Thanks for the gold," he said.', "See /r/MyStories"]
    assert meta_share(texts) == 0.5 and meta_share([]) == 0.0


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("[ WP ] `` Dad , why ca n't Mom come with us ? ''", '[WP] "Dad, why can\'t Mom come with us?"'),
        (
            "[ wp ] You 've been sent ( with an iPhone , whichever ) .",
            "[WP] You've been sent (with an iPhone, whichever).",
        ),
        ("[ Wp ] It 's a $ 20.00 gift . . .", "[WP] It's a $20.00 gift..."),
        ("[ FF ] [ MP ] A Song", "[FF] [MP] A Song"),
        ("[ WP/IP ] he doesn ’ t want it", "[WP/IP] he doesn’t want it"),
        ("[ IP ] Abandoned \n \n Then rain .", "[IP] Abandoned\n\nThen rain."),
        ("[WP] youre an immortal", "[WP] youre an immortal"),  # already plain: unchanged
        ("No tag , just text", "No tag, just text"),
    ],
)
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean and clean_prompt(clean) == clean


def test_load_prompts_cleans_fan_csv(tmp_path):
    path = write_csv(
        tmp_path / "fan.csv", ["prompt", "story"], [["[ WP ] `` Hi . ''", "s"], ["[ wp ] Hell is n't", "s"]]
    )
    assert load_prompts(path) == ['[WP] "Hi."', "[WP] Hell isn't"]


# ----- the real data (skipped without ../shared/data) -------------------------------------------------------------


_REAL: dict = {}  # the real files, read once for the tests below


@pytest.fixture()
def real(shared_data):
    if not _REAL:
        folder = shared_data / "writing_prompts"
        _REAL["responses"] = load_responses(folder / "prompt_responses.csv.gz")
        _REAL["test"] = load_comparisons(folder / "comparisons_test.csv")
        _REAL["test_rows"] = read_rows(folder / "comparisons_test.csv")
    return _REAL


def test_real_responses_and_pairs_load(real):
    responses, test = real["responses"], real["test"]
    assert len(responses) == 11_078 and len({r.prompt_id for r in responses}) == 655
    assert min(r.score for r in responses) == -27 and max(r.score for r in responses) == 25_203
    assert sum(r.rank == 0 for r in responses) == 655 and responses.skipped == []
    assert len(test) == 1_255 and sum(c.best for c in test) == 616  # label 1: 616, as the data's README says
    for row in real["test_rows"]:  # the pair rule holds for every shipped pair
        hi, lo = sorted((float(row["score_a"]), float(row["score_b"])), reverse=True)
        assert clearly_better(hi, lo) and float(row["score_gap"]) == hi - lo


def test_real_karma_pairs_and_split_rebuild_the_shipped_test_set(real):
    responses, shipped = real["responses"], real["test"]
    _, test = split_by_prompt(responses, test_fraction=0.1, seed=42)
    test_ids = {r.prompt_id for r in test}
    assert len({prompt_key(r.prompt) for r in test}) == 65 and len(test_ids) == 66  # data README: 65 groups, 66 prompts
    ours = [c for c in karma_pairs(responses) if c.prompt_id in test_ids]
    as_tuple = lambda c: (c.prompt_id, c.prompt, c.responses, c.best)
    assert [as_tuple(c) for c in ours] == [as_tuple(c) for c in shipped]  # pair for pair, A/B order included
