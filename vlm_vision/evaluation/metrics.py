"""Evaluation metrics: VQA accuracy (official VQAv2 answer normalisation), exact match, per-type breakdowns, and
captioning BLEU-1..4 / CIDEr through pycocoevalcap (an optional extra).

The answer normalisation reproduces the official VQAv2 evaluation script, `PythonEvaluationTools/vqaEvaluation/
vqaEval.py` of GT-Vision-Lab/VQA at commit a013f0043c1e2cdc995922dfe257f7149aa9af06 ("Fixed processing answers bug",
2021): `VQAEval.processPunctuation` then `VQAEval.processDigitArticle`, with its lists copied verbatim (quirks
included, each noted where it is). One deliberate deviation, switchable: the script normalises the answers only when
the ten annotators disagree (`len(set(gtAnswers)) > 1`), so a prediction "two" against ten "2" scores 0 there; here
both sides are always normalised (as lmms-eval's processor does for predictions). `official_normalization=True`
gives the script's behaviour exactly.

Everything here is a pure function of strings; only :func:`caption_scores` needs the extra
(`pip install 'vlm-vision[eval]'`), imported when called. BLEU and CIDEr are pycocoevalcap's pure-Python scorers
(the package's Java jars, for METEOR/SPICE and the PTB tokenizer, are not used): captions are tokenised by
:func:`tokenize_caption`, a Python stand-in for the Stanford PTBTokenizer that the COCO toolkit runs through Java.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence

logger = logging.getLogger(__name__)

# ---- the official VQAv2 normalisation (vqaEval.py, VQAEval.__init__) ---------------------------------------------

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
# number words -> digits ("none" counts as 0)
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
# The official pattern, verbatim: `(?!<=\d)` was meant as the look-behind `(?<!\d)` but is a look-ahead that always
# holds, so a period is removed unless a digit follows it ("5." -> "5", "2.5" kept, "1.x" -> "1x").
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")


def _process_punctuation(text: str) -> str:
    """`VQAEval.processPunctuation`: a punctuation mark next to a space (or anywhere, once the text has a digit
    comma digit) is deleted, elsewhere it becomes a space ("black/white" -> "black white", "1,000" -> "1000");
    then periods not followed by a digit are deleted."""
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        # the official test looks at the input text, not at the text as replaced so far
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # count=32: the script passes `re.UNICODE` (= 32) in `sub`'s count position; kept for exactness
    return PERIOD_STRIP.sub("", out, 32)


def _process_digit_article(text: str) -> str:
    """`VQAEval.processDigitArticle`: lower case, number words to digits, articles dropped, contractions restored."""
    words = [MANUAL_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the official VQAv2 evaluation compares it.

    Examples: `"Two."` -> `"2"`, `"the dog"` -> `"dog"`, `"dont"` -> `"don't"`, `"black/white"` -> `"black white"`,
    `"1,000"` -> `"1000"`, `"yes!"` -> `"yes"`.
    """
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, official_normalization: bool = False) -> float:
    """The VQAv2 accuracy of one prediction against the annotators' answers (ten in VQAv2).

    For each annotator left out in turn, `min(#other annotators who gave the prediction / 3, 1)`; the mean of these.
    With ten answers: 0 matches -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.

    Args:
        prediction: the model's answer (raw text).
        answers: the annotators' answers (raw text).
        official_normalization: normalise only when the annotators disagree, exactly as the official script does
            (see the module docstring); default: always normalise both sides.

    Returns:
        The accuracy in [0, 1].
    """
    if not answers:
        raise ValueError("answers is empty: the VQA accuracy needs the annotators' answers (ten per question).")
    prediction = prediction.replace("\n", " ").replace("\t", " ").strip()
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if not official_normalization or len(set(answers)) > 1:
        prediction = normalize_vqa_answer(prediction)
        answers = [normalize_vqa_answer(a) for a in answers]
    matches = [a == prediction for a in answers]
    total = sum(matches)
    # leaving out annotator i leaves total - matches[i] matching answers among the others (the script compares
    # answer dicts that carry a unique answer_id, so exactly one is left out each time)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(answers)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the two answers are equal after :func:`normalize_vqa_answer` (easy-VQA's metric), else 0.0."""
    return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(reference))


def accuracy_by(scores: Sequence[float], groups: Sequence[Hashable]) -> dict[str, float]:
    """Mean score overall and per group (e.g. easy-VQA's question type: `yes/no`, `color`, `shape`).

    Args:
        scores: per question, its score (1.0/0.0 exact match, or the VQA accuracy).
        groups: per question, its group (a meta value such as `question_type`).

    Returns:
        `{"overall": mean, group: mean, ...}` with the groups sorted by name.
    """
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} scores but {len(groups)} groups: give one group per score.")
    if not scores:
        raise ValueError("No scores: evaluate at least one question.")
    by_group: dict[str, list[float]] = defaultdict(list)
    for score, group in zip(scores, groups, strict=True):
        by_group[str(group)].append(float(score))
    result = {"overall": sum(scores) / len(scores)}
    result.update({group: sum(v) / len(v) for group, v in sorted(by_group.items())})
    return result


# ---- captioning: BLEU and CIDEr through pycocoevalcap -------------------------------------------------------------

# the tokens that pycocoevalcap's PTBTokenizer drops after tokenising (its PUNCTUATIONS; PTB writes brackets as
# -LRB- etc. and double quotes as `` and '', all dropped, so here they are given as the characters)
CAPTION_PUNCTUATION = frozenset(["''", "'", '"', "``", "`", "(", ")", "{", "}", "[", "]", *".?!,:-;", "--", "..."])
_CAPTION_TOKEN = re.compile(r"[a-z0-9]+(?:[-'.&/][a-z0-9]+)*|\.\.\.|--|\S")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def tokenize_caption(caption: str) -> str:
    """Lower-cased, PTB-style tokens without punctuation, joined by spaces: `"A man's hat."` -> `"a man 's hat"`.

    A Python stand-in for the Java PTBTokenizer of the COCO caption toolkit (`-lowerCase`, punctuation removed):
    words with inner hyphens, periods or apostrophes stay whole ("black-and-white", "3.5"), clitics are split
    ("don't" -> "do n't"). Rare differences from the Java tokenizer (quotes, abbreviations) can move BLEU/CIDEr
    slightly against published numbers.
    """
    tokens = []
    for token in _CAPTION_TOKEN.findall(caption.lower()):
        clitic = _CLITIC.match(token)
        if clitic:
            tokens += [clitic.group(1), clitic.group(2)]
        elif token not in CAPTION_PUNCTUATION:
            tokens.append(token)
    return " ".join(tokens)


def _coco_scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as error:
        raise ImportError(
            "BLEU and CIDEr need pycocoevalcap, an optional extra: pip install 'vlm-vision[eval]' "
            "(or pip install pycocoevalcap)."
        ) from error
    return Bleu, Cider


def caption_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr (CIDEr-D, as pycocoevalcap computes it) of generated captions.

    Args:
        predictions: `{image id: generated caption}`.
        references: `{image id: [reference captions]}` (COCO: five per image), the same ids.

    Returns:
        `{"BLEU-1": ..., "BLEU-2": ..., "BLEU-3": ..., "BLEU-4": ..., "CIDEr": ...}`. BLEU is in [0, 1]; CIDEr is
        scaled by 10 as in the paper (a caption equal to all its references scores 10 when its n-grams are rare in
        the corpus). CIDEr's idf comes from the evaluated references: with a single image every n-gram is in every
        document and CIDEr is 0, so evaluate a whole split.

    Raises:
        ImportError: pycocoevalcap is not installed (the message gives the pip command).
        ValueError: the ids differ, or an image has no reference.
    """
    if set(predictions) != set(references):
        missing, extra = set(references) - set(predictions), set(predictions) - set(references)
        raise ValueError(
            f"predictions and references must have the same ids: {len(missing)} without a prediction (e.g. "
            f"{sorted(map(str, missing))[:3]}), {len(extra)} without references (e.g. {sorted(map(str, extra))[:3]})."
        )
    empty = [key for key, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{len(empty)} images have no reference caption (e.g. {empty[:3]}).")
    bleu, cider = _coco_scorers()
    res = {key: [tokenize_caption(caption)] for key, caption in predictions.items()}
    gts = {key: [tokenize_caption(caption) for caption in references[key]] for key in predictions}
    bleu_scores, _ = bleu(4).compute_score(gts, res, verbose=0)
    cider_score, _ = cider().compute_score(gts, res)
    return {**{f"BLEU-{n}": float(s) for n, s in enumerate(bleu_scores, start=1)}, "CIDEr": float(cider_score)}


__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "MANUAL_MAP",
    "PUNCTUATION",
    "accuracy_by",
    "caption_scores",
    "exact_match",
    "normalize_vqa_answer",
    "tokenize_caption",
    "vqa_accuracy",
]
