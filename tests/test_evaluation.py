"""Metrics: the official VQAv2 answer normalisation and accuracy, exact match, breakdowns, BLEU/CIDEr."""

from __future__ import annotations

import sys

import pytest

from vlm_vision.evaluation.metrics import (
    CONTRACTIONS,
    accuracy_by,
    caption_scores,
    exact_match,
    normalize_vqa_answer,
    tokenize_caption,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two.", "2"),  # lower case, the period dropped, number word -> digit
        ("none", "0"),
        ("the dog", "dog"),  # articles dropped
        ("A", ""),
        ("dont", "don't"),  # the contractions map
        ("isnt", "isn't"),
        ("don't", "don't"),  # an apostrophe is not punctuation in the official list
        ("black/white", "black white"),  # a mark between words becomes a space...
        ("red, white", "red white"),  # ...and next to a space it is deleted
        ("1,000", "1000"),  # digit comma digit: every mark is deleted, none becomes a space
        ("yes!", "yes"),
        ("2.5", "2.5"),  # a period before a digit stays
        ("5.", "5"),
        ("  left\tside\n", "left side"),
        ("(a) cat", "cat"),
    ],
)
def test_normalisation_follows_the_official_script(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_official_lists_are_complete():
    # vqaEval.py (GT-Vision-Lab/VQA a013f00) has 120 contractions; spot-check entries with odd apostrophes
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["yall'd've"] == "y'all'd've"
    assert CONTRACTIONS["somebody'd"] == "somebodyd"  # sic, as in the script


def test_vqa_accuracy_by_hand():
    others = ["3"] * 10
    # 3 of 10 said "2", the model says "two" -> "2". Leave one annotator out, ten times:
    #   one of the three "2"s left out (3 times): 2 matches -> 2/3; one of the seven others (7 times): 3 -> 1.
    #   (3 * 2/3 + 7 * 1) / 10 = 0.9   (not 1.0: that needs 4 matching annotators)
    assert vqa_accuracy("two", ["2"] * 3 + others[3:]) == pytest.approx(0.9)
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 0.6
    assert vqa_accuracy("two", ["2"] * 2 + others[2:]) == pytest.approx(0.6)
    # 1 of 10: (1 * 0 + 9 * 1/3) / 10 = 0.3;  4 of 10: every subset has >= 3 -> 1.0
    assert vqa_accuracy("2", ["2", *others[1:]]) == pytest.approx(0.3)
    assert vqa_accuracy("Two.", ["two"] * 4 + others[4:]) == pytest.approx(1.0)
    assert vqa_accuracy("4", others) == 0.0
    with pytest.raises(ValueError, match="answers is empty"):
        vqa_accuracy("2", [])


def test_official_normalisation_only_when_annotators_disagree():
    # the script compares raw strings when all ten agree; by default both sides are always normalised
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("two", ["2"] * 10, official_normalization=True) == 0.0
    assert vqa_accuracy("two", ["2"] * 9 + ["3"], official_normalization=True) == 1.0


def test_exact_match_and_breakdown():
    assert exact_match("Blue.", "blue") == 1.0
    assert exact_match("a circle", "circle") == 1.0
    assert exact_match("red", "blue") == 0.0
    scores = [1.0, 0.0, 1.0, 1.0, 0.0]
    types = ["yes/no", "color", "color", "shape", "yes/no"]
    assert accuracy_by(scores, types) == {"overall": 0.6, "color": 0.5, "shape": 1.0, "yes/no": 0.5}
    with pytest.raises(ValueError, match="5 scores but 4 groups"):
        accuracy_by(scores, types[:4])


def test_tokenize_caption_like_ptb():
    assert tokenize_caption("A man's black-and-white hat, on a 3.5 \"table\"... Don't (really)!") == (
        "a man 's black-and-white hat on a 3.5 table do n't really"
    )


def test_caption_scores_need_the_extra_and_matching_ids(monkeypatch):
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({1: "a cat"}, {2: ["a cat"]})
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(ImportError, match=r"pip install 'vlm-vision\[eval\]'"):
        caption_scores({1: "a cat"}, {1: ["a cat"]})


def test_caption_scores_by_hand():
    pytest.importorskip("pycocoevalcap.cider.cider", reason="the 'eval' extra (pycocoevalcap) is not installed")
    references = {
        1: ["a blue circle on white"],
        2: ["a red triangle on white"],
        3: ["a green square on gray"],
    }
    perfect = caption_scores(
        {1: "A blue circle on white.", 2: "a red triangle on white", 3: "a green square on gray"}, references
    )
    assert perfect["BLEU-1"] == pytest.approx(1.0) and perfect["BLEU-4"] == pytest.approx(1.0)
    # every n-gram matches its references: cosine 1 for n = 1..4, x 10
    assert perfect["CIDEr"] == pytest.approx(10.0)
    # one wrong word of 15: clipped unigram precision 14/15, brevity penalty 1 (hypothesis and closest
    # reference lengths agree)
    wrong = caption_scores(
        {1: "a blue circle on white", 2: "a red circle on white", 3: "a green square on gray"}, references
    )
    assert wrong["BLEU-1"] == pytest.approx(14 / 15)
    assert wrong["CIDEr"] < perfect["CIDEr"]
