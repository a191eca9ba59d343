"""The built-in data set with no download: easy-VQA's 64x64 images (PyPI `easy-vqa`, MIT), labelled by shape and colour.

Each easy-VQA image holds one shape (circle, rectangle or triangle) in one of 8 colours; the package gives questions,
not labels. An image's labels are read off its questions: the answer of a "what ..." question ("what color is the
shape?" -> blue) and the attribute words it names ("what is the blue shape?" -> rectangle, and blue), and the
attributes that yes/no questions assert ("is there a triangle?" yes, "is there not a red shape?" no). Across the
package's questions this never gives an image two shapes or two colours (checked on load); images whose questions do
not determine the attribute a task needs (about 11% for `shape_color`) are left out, with their number logged.

Tasks: `shape` (3 classes), `color` (8), `shape_color` (24 joint classes, "blue circle", ...).
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from functools import cache

from .images import LabelledImages

logger = logging.getLogger(__name__)

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
EASY_VQA_TASKS = ("shape", "color", "shape_color")
SPLITS = ("train", "test")
_NEGATIONS = {"not", "no"}


def _words(question: str) -> set[str]:
    return set(re.findall(r"[a-z]+", question.lower()))


def is_negated(question: str) -> bool:
    """Whether a question is negated: "is there not a red shape?", "is no circle present?"."""
    return bool(_words(question) & _NEGATIONS)


def asks_about_what_is_shown(question: str, answer: str) -> bool:
    """Whether a yes/no question names what the image shows: "is there a red shape?" yes, "is there not a red
    shape?" no. Colour questions name the image's colour 1 time in 8, shape questions its shape 1 time in 3."""
    return answer in ("yes", "no") and (answer == "yes") != is_negated(question)


def yes_no_attribute(question: str) -> str | None:
    """What a yes/no question names: "color" ("is there a red shape?"), "shape" ("is there a circle?") or None."""
    words = _words(question)
    if words & set(EASY_VQA_COLORS):
        return "color"
    return "shape" if words & set(EASY_VQA_SHAPES) else None


def _yes_no_questions(questions, answers):
    """`(index, attribute, names what is shown)` for each yes/no question that names a colour or a shape."""
    for i, (question, answer) in enumerate(zip(questions, answers, strict=True)):
        attribute = yes_no_attribute(question) if answer in ("yes", "no") else None
        if attribute:
            yield i, attribute, asks_about_what_is_shown(question, answer)


def repeats_for_shown_fraction(questions, answers, fraction: float) -> dict[str, int]:
    """Per attribute ("color", "shape"), how many times to repeat the yes/no questions that name what the image shows
    so that they make about `fraction` of that attribute's yes/no questions (at least once each: never fewer).

    On easy-VQA's training split, 12% of the colour yes/no questions name the image's colour and 33% of the shape
    ones its shape; `fraction=0.3` repeats the colour ones 3 times and the shape ones once.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"shown_fraction={fraction} must be between 0 and 1 (exclusive).")
    shown, total = Counter(), Counter()
    for _, attribute, names_shown in _yes_no_questions(questions, answers):
        total[attribute] += 1
        shown[attribute] += names_shown
    repeats = {}
    for attribute, count in total.items():
        present, absent = shown[attribute], count - shown[attribute]
        repeats[attribute] = max(1, round(fraction * absent / ((1 - fraction) * present))) if present else 1
    return repeats


def rewrite_for_shown_fraction(
    questions, answers, image_ids, labels: dict[int, dict[str, str]], fraction: float, rng
) -> tuple[list[str], list[str]]:
    """Rewrite yes/no questions that name what the image lacks so that about `fraction` of each attribute's yes/no
    questions name what it shows: the named colour (or shape) becomes the image's own and the answer flips ("is
    there a red shape?" no, on a blue image -> "is there a blue shape?" yes; "is there not a red shape?" yes -> "is
    there not a blue shape?" no). The negated share and the number of questions stay as they were. An attribute
    already at or above `fraction` (shape: 33% on easy-VQA's training split) is left alone, and so are images whose
    questions do not give the attribute (`labels`, from :func:`easy_vqa_image_labels`).

    Unlike repeating the questions that name what is shown, every rewritten question is a new (image, question)
    pair, so the rare case gets as many distinct examples as the common one.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"rewrite_shown_fraction={fraction} must be between 0 and 1 (exclusive).")
    names = {"color": set(EASY_VQA_COLORS), "shape": set(EASY_VQA_SHAPES)}
    shown, total, candidates = Counter(), Counter(), defaultdict(list)
    for i, attribute, names_shown in _yes_no_questions(questions, answers):
        total[attribute] += 1
        if names_shown:
            shown[attribute] += 1
        elif attribute in labels[image_ids[i]]:
            candidates[attribute].append(i)
    questions, answers = list(questions), list(answers)
    for attribute, found in candidates.items():
        share = min(1.0, max(0.0, (fraction * total[attribute] - shown[attribute]) / len(found)))
        for i in found:
            if rng.random() >= share:
                continue
            own = labels[image_ids[i]][attribute]
            (named,) = _words(questions[i]) & names[attribute]
            questions[i] = re.sub(rf"\b{named}\b", own, questions[i])
            answers[i] = "no" if answers[i] == "yes" else "yes"
    return questions, answers


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError(
            "The built-in data set needs the easy-vqa package: pip install 'vlm-vision[data]' (or easy-vqa)."
        ) from error
    return easy_vqa


@cache
def easy_vqa_image_labels(split: str = "train") -> dict[int, dict[str, str]]:
    """`{image_id: {"path": png, "shape": ..., "color": ...}}` for a split; an attribute is absent when the image's
    questions do not determine it.

    Raises:
        ValueError: unknown split, or questions that give one image two shapes or two colours.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; easy-VQA has {SPLITS}.")
    easy_vqa = _easy_vqa()
    questions, answers, image_ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    found: dict[int, dict[str, set[str]]] = {i: {"shape": set(), "color": set()} for i in paths}
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        words = _words(question)
        if answer in ("yes", "no"):
            if not asks_about_what_is_shown(question, answer):
                continue  # "is there a X?" no / "is there not a X?" yes: says what is absent, not what is there
        else:
            words.add(answer)
        found[image_id]["shape"] |= words & set(EASY_VQA_SHAPES)
        found[image_id]["color"] |= words & set(EASY_VQA_COLORS)
    labels = {}
    for image_id, attributes in found.items():
        entry = {"path": paths[image_id]}
        for attribute, values in attributes.items():
            if len(values) > 1:
                raise ValueError(
                    f"easy-VQA {split} image {image_id} has questions naming several {attribute}s {sorted(values)}: "
                    "this labelling assumes one shape per image; check the installed easy-vqa version."
                )
            if values:
                entry[attribute] = next(iter(values))
        labels[image_id] = entry
    return labels


def task_class_names(task: str) -> tuple[str, ...]:
    if task == "shape":
        return EASY_VQA_SHAPES
    if task == "color":
        return EASY_VQA_COLORS
    if task == "shape_color":
        return tuple(f"{color} {shape}" for shape in EASY_VQA_SHAPES for color in EASY_VQA_COLORS)
    raise ValueError(f"task={task!r}; easy-VQA image tasks are {EASY_VQA_TASKS}.")


def load_easy_vqa(split: str = "train", task: str = "shape_color") -> LabelledImages:
    """easy-VQA's images of `split` labelled for `task` (see the module docstring), in image-id order."""
    class_names = task_class_names(task)
    index = {name: i for i, name in enumerate(class_names)}
    needed = ("shape", "color") if task == "shape_color" else (task,)
    paths, labels, missing = [], [], 0
    for _, entry in sorted(easy_vqa_image_labels(split).items()):
        if not all(a in entry for a in needed):
            missing += 1
            continue
        name = f"{entry['color']} {entry['shape']}" if task == "shape_color" else entry[task]
        paths.append(entry["path"])
        labels.append(index[name])
    if missing:
        logger.info("easy-VQA %s/%s: %d images left out (their questions do not give the label).", split, task, missing)
    return LabelledImages(tuple(paths), tuple(labels), class_names)


def yes_no_breakdown(questions, answers, predictions) -> list[dict]:
    """Where a model goes wrong on easy-VQA's yes/no questions: one row per (attribute, negated, names what is
    shown) group with its size, the share answered right and the share answered "yes". A model that compares
    the named attribute with the image is right in every group; one that reads only the negation answers the
    negated groups "yes" and the others "no"; one that ignores the negation is wrong on both negated groups.

    Args:
        questions, answers, predictions: parallel sequences (the reference answers, the model's answers; a
            prediction of None counts as wrong). Only the yes/no questions naming a colour or a shape are counted.
    """
    groups: dict[tuple[str, bool, bool], list[int]] = {}
    for i, attribute, shown in _yes_no_questions(questions, answers):
        groups.setdefault((attribute, is_negated(questions[i]), shown), []).append(i)
    rows = []
    for (attribute, negated, shown), indices in sorted(groups.items()):
        said = [(predictions[i] or "").strip().lower() for i in indices]
        rows.append(
            {
                "attribute": attribute,
                "negated": negated,
                "shown": shown,
                "questions": len(indices),
                "right": sum(s == answers[i] for s, i in zip(said, indices, strict=True)) / len(indices),
                "yes": sum(s == "yes" for s in said) / len(indices),
            }
        )
    return rows


class EasyVQAImageLabel:
    """sample -> the index of its easy-VQA image's class for `task` (`shape`, `color`, `shape_color`), -100 if the
    image's questions don't tell; for the auxiliary classification loss (picklable, for DataLoader workers)."""

    def __init__(self, task: str, label_names: list[str]):
        self.task, self.label_names = task, label_names
        self.labels = easy_vqa_image_labels("train")

    def __call__(self, sample) -> int:
        labels = self.labels.get(sample.meta.get("image_id"), {})
        if self.task == "shape_color":
            name = f"{labels['color']} {labels['shape']}" if "shape" in labels and "color" in labels else None
        else:
            name = labels.get(self.task)
        return self.label_names.index(name) if name in self.label_names else -100
