"""Vision-language data: every source read into one canonical sample (the data set is :mod:`.dataset`).

Readers turn each source into a list of :class:`VLMSample` (image paths + chat messages with `<image>` tags) and a
:class:`DataReport` of what was left out and why:

- :func:`read_llava`: LLaVA conversation JSON (`image` + `conversations` with `<image>` tags);
- :func:`read_coco_captions`: COCO captions JSON (`images` + `annotations`);
- :func:`read_vqav2`: VQAv2 questions + annotations (ten answers each) + the COCO image folder;
- :func:`read_caption_folder`: a folder of images with a `file_name,caption` CSV or JSON-lines file;
- :func:`read_easy_vqa` and :func:`read_easy_vqa_captions`: the built-in default with no download.

Prompt format (LLaVA style): the user turn is `"<image>\\n{question}"` (the tag first), the assistant turn the answer;
captions use a fixed instruction (`DEFAULT_CAPTION_INSTRUCTION`) as the question.

Bad data (`on_error="skip"` leaves the sample out, `"raise"` raises :class:`BadSampleError`; either way the index file
and the entry are named): a malformed entry (missing keys), a missing image file (checked when the index is read), a
number of `<image>` tags that differs from the number of images. A sample longer than `max_length` and an image that
exists but cannot be decoded are found by :class:`~.dataset.VLMDataset` when it builds the sample (with skip the
next usable sample takes its place, so an epoch never crashes).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..vlm.processing_vlm import IMAGE_TOKEN, normalize_messages
from .easy_vqa import (
    EASY_VQA_COLORS,
    EASY_VQA_SHAPES,
    SPLITS,
    _easy_vqa,
    asks_about_what_is_shown,
    easy_vqa_image_labels,
    is_negated,
    repeats_for_shown_fraction,
    rewrite_for_shown_fraction,
    yes_no_attribute,
)

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("skip", "raise")
DEFAULT_CAPTION_INSTRUCTION = "Describe the image briefly."
VQAV2_FILE_NAME_PATTERN = "COCO_{split}2014_{image_id:012d}.jpg"
# LLaVA's speaker names and the chat roles they stand for
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# reasons a sample is left out (the keys of `DataReport.counts()`)
MALFORMED, MISSING_IMAGE, TAG_MISMATCH, TOO_LONG, UNREADABLE_IMAGE, NO_CAPTION = (
    "malformed",
    "missing_image",
    "image_tag_mismatch",
    "too_long",
    "unreadable_image",
    "no_caption",
)


class BadSampleError(ValueError):
    """A sample that cannot be used (raised with `on_error="raise"`); the message names the file and the entry."""


@dataclass
class VLMSample:
    """One training/evaluation example in the canonical form every reader produces.

    Attributes:
        images: image file paths (decoded lazily by the data set) or in-memory PIL images, one per `<image>` tag,
            in tag order. Empty for a text-only sample.
        messages: the conversation, `[{"role": "user" | "assistant" | "system", "content": str}]`; transformers'
            content lists (`[{"type": "image"}, {"type": "text", "text": ...}]`) are turned into that form, and an
            unknown role (a misspelt "asistant") raises (:func:`~vlm_vision.vlm.processing_vlm.normalize_messages`).
        id: a unique, human-readable id (used in every error and report).
        meta: what evaluation needs and training ignores, e.g. `question_type`, VQAv2's ten `answers`, COCO's
            reference `captions`.
    """

    images: list[str | Image.Image]
    messages: list[dict[str, str]]
    id: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.messages = normalize_messages(self.messages)

    @property
    def num_image_tags(self) -> int:
        return sum(message["content"].count(IMAGE_TOKEN) for message in self.messages)


@dataclass
class SkippedSample:
    """One sample left out: its id (or entry index), the reason (see the module constants) and the message."""

    id: str
    reason: str
    message: str
    file: str | None = None


@dataclass
class DataReport:
    """What a reader (or data set) kept and left out of one source.

    Attributes:
        source: the index file (or folder) read.
        num_entries: entries (samples) in the source.
        skipped: every sample left out, with its reason and the file it names.
    """

    source: str
    num_entries: int = 0
    skipped: list[SkippedSample] = field(default_factory=list)

    @property
    def num_kept(self) -> int:
        return self.num_entries - len(self.skipped)

    def counts(self) -> dict[str, int]:
        """`{reason: number of samples left out for it}`."""
        return dict(Counter(s.reason for s in self.skipped))

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.source}: kept all {self.num_entries} samples."
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts().items()))
        shown = "; ".join(s.message for s in self.skipped[:3])
        more = f" (and {len(self.skipped) - 3} more)" if len(self.skipped) > 3 else ""
        return f"{self.source}: kept {self.num_kept} of {self.num_entries} samples, left out {reasons}: {shown}{more}"

    def log(self) -> None:
        """A warning when bad samples were left out; info otherwise (e.g. only easy-VQA's uncaptionable images)."""
        bad = any(s.reason != NO_CAPTION for s in self.skipped)
        logger.log(logging.WARNING if bad else logging.INFO, "%s", self.summary())


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error={on_error!r}; choose 'skip' (leave bad samples out, counted) or 'raise'.")


class _Checker:
    """Records or raises a bad sample, and checks the things every reader checks (image files, tag counts)."""

    def __init__(self, source: str | os.PathLike, on_error: str):
        _check_on_error(on_error)
        self.on_error = on_error
        self.report = DataReport(str(source))
        self._exists: dict[str, bool] = {}  # many questions share one image: stat each file once

    def bad(self, sample_id: str, reason: str, problem: str, file: str | None = None, name: str | None = None) -> None:
        """Raise (on_error="raise") or record one bad sample; `name` says where it is (default: its id)."""
        message = f"{name or sample_id}: {problem}"
        if self.on_error == "raise":
            raise BadSampleError(
                f"{self.report.source}, {message}. Fix or remove the entry, or pass on_error='skip' to leave bad "
                "samples out (they are counted and logged)."
            )
        self.report.skipped.append(SkippedSample(sample_id, reason, message, file))

    def valid(self, sample: VLMSample, name: str | None = None) -> bool:
        """Whether the sample's image files exist and its `<image>` tags match its images (else records it)."""
        for image in sample.images:
            if isinstance(image, Image.Image):
                continue
            path = str(image)
            if path not in self._exists:
                self._exists[path] = os.path.isfile(path)
            if not self._exists[path]:
                self.bad(sample.id, MISSING_IMAGE, f"image file {path} does not exist", path, name)
                return False
        if sample.num_image_tags != len(sample.images):
            self.bad(
                sample.id,
                TAG_MISMATCH,
                f"{sample.num_image_tags} {IMAGE_TOKEN} tags but {len(sample.images)} images: give one image per tag",
                name=name,
            )
            return False
        return True

    def finish(self, samples: list[VLMSample], num_entries: int) -> tuple[list[VLMSample], DataReport]:
        self.report.num_entries = num_entries
        self.report.log()
        return samples, self.report


def _load_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"Index file {path} does not exist: check the path.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): check the file is complete.") from error


def _shown(value: Any) -> str:
    """A field's value as the file writes it (`null`, `3`, `"text"`), shortened."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def vqa_messages(question: str, answer: str | None = None) -> list[dict[str, str]]:
    """The prompt format: `<image>` then the question in the user turn, the answer (if given) as the assistant's."""
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


# ---- LLaVA conversation JSON -----------------------------------------------------------------------------------


class SampleProblem(ValueError):
    """Why one entry can't become a sample: `reason` (a module constant) and the problem in words."""

    def __init__(self, reason: str, problem: str, file: str | None = None):
        super().__init__(problem)
        self.reason, self.problem, self.file = reason, problem, file


def llava_sample(entry: Any, position: int, image_folder: str | os.PathLike) -> VLMSample:
    """One entry of a LLaVA conversation file as a sample (image paths joined to `image_folder`).

    An entry holds LLaVA's `conversations` (`[{"from": "human" | "gpt" | "system", "value": str}]`) or
    transformers' chat `messages` (`[{"role", "content": str | [{"type": "image"}, {"type": "text", "text"}]}]`),
    and its images as `image` or `images` (a path or a list of paths).

    Raises:
        SampleProblem: a malformed entry (no conversation, an unknown speaker or role, a value that is null or not
            text, an `image` that is not a path or a list of paths), naming the turn and the field.
    """
    sample_id = str(entry.get("id", position)) if isinstance(entry, dict) else str(position)
    if isinstance(entry, dict) and "messages" in entry and "conversations" not in entry:
        try:
            messages = normalize_messages(entry["messages"])
        except (TypeError, ValueError) as error:
            raise SampleProblem(MALFORMED, f"'messages': {error}") from None
        if not messages:
            raise SampleProblem(MALFORMED, "an empty 'messages' list")
    else:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not turns:
            raise SampleProblem(MALFORMED, "no 'conversations' list (nor transformers' 'messages')")
        for number, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise SampleProblem(MALFORMED, f"conversations[{number}] needs 'from' and 'value', got {turn!r}")
            if turn["from"] not in LLAVA_ROLES:
                raise SampleProblem(
                    MALFORMED,
                    f"conversations[{number}] has 'from': {turn['from']!r}; a speaker is one of {sorted(LLAVA_ROLES)}",
                )
            if not isinstance(turn["value"], str):
                raise SampleProblem(
                    MALFORMED,
                    f"conversations[{number}] ({turn['from']}) has 'value': {_shown(turn['value'])}: every value "
                    "must be text",
                )
        messages = [{"role": LLAVA_ROLES[t["from"]], "content": t["value"]} for t in turns]
    key = "image" if "image" in entry or "images" not in entry else "images"
    images = entry.get(key)  # absent, or null in a table with other rows' images (Arrow, parquet): text only
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise SampleProblem(MALFORMED, f"'{key}' must be a path or a list of paths: {entry[key]!r}")
    return VLMSample([os.path.join(image_folder, i) for i in images], messages, sample_id)


def read_llava(
    json_path: str | os.PathLike, image_folder: str | os.PathLike, *, on_error: str = "skip"
) -> tuple[list[VLMSample], DataReport]:
    """Read a LLaVA conversation file into memory (for large files, :class:`~vlm_vision.data.index.JsonIndex`
    reads entries lazily instead).

    Args:
        json_path: `[{"id", "image": "rel/path.jpg" | [paths] | absent, "conversations": [{"from": "human" | "gpt" |
            "system", "value": "<image>\\n..."}]}]`.
        image_folder: the folder image paths are relative to.
        on_error: `"skip"` or `"raise"` for malformed entries, missing images and tag/image count mismatches.

    Returns:
        The samples (ids from the file; the entry index where an entry has none) and the report.
    """
    checker = _Checker(json_path, on_error)
    entries = _load_json(json_path)
    if not isinstance(entries, list):
        raise ValueError(f"{json_path} must hold a JSON list of conversations, got a {type(entries).__name__}.")
    samples = []
    for index, entry in enumerate(entries):
        sample_id = str(entry.get("id", index)) if isinstance(entry, dict) else str(index)
        name = f"entry {index} (id {sample_id})"
        try:
            sample = llava_sample(entry, index, image_folder)
        except SampleProblem as problem:
            checker.bad(sample_id, problem.reason, problem.problem, name=name)
            continue
        if checker.valid(sample, name):
            samples.append(sample)
    return checker.finish(samples, len(entries))


# ---- captions: COCO JSON and a plain folder -------------------------------------------------------------------


def _caption_samples(
    captions_by_file: dict[str, list[str]],
    ids: dict[str, str],
    image_folder: str | os.PathLike,
    checker: _Checker,
    instruction: str,
    one_per_caption: bool,
    extra_meta: dict[str, dict] | None = None,
) -> tuple[list[VLMSample], int]:
    """Caption samples: per image, its first caption as the target (or one sample per caption), all in meta."""
    samples, num_entries = [], 0
    for file_name, captions in captions_by_file.items():
        meta = {"captions": list(captions), "file_name": file_name, **(extra_meta or {}).get(file_name, {})}
        targets = list(enumerate(captions)) if one_per_caption else [(0, captions[0])]
        for k, caption in targets:
            num_entries += 1
            sample_id = f"{ids[file_name]}_{k}" if one_per_caption else ids[file_name]
            sample = VLMSample(
                [os.path.join(image_folder, file_name)], vqa_messages(instruction, caption), sample_id, dict(meta)
            )
            if checker.valid(sample):
                samples.append(sample)
    return samples, num_entries


def read_coco_captions(
    annotations_path: str | os.PathLike,
    image_folder: str | os.PathLike,
    *,
    instruction: str = DEFAULT_CAPTION_INSTRUCTION,
    one_per_caption: bool = False,
    on_error: str = "skip",
) -> tuple[list[VLMSample], DataReport]:
    """Read COCO captions (`captions_train2017.json` and the like).

    Args:
        annotations_path: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`.
        image_folder: the folder holding the `file_name`s.
        instruction: the user turn after the `<image>` tag.
        one_per_caption: one sample per caption (training on all five) instead of one per image with its first
            caption as the target.
        on_error: `"skip"` or `"raise"`.

    Returns:
        Samples with id `str(image_id)` (`f"{image_id}_{k}"` per caption) and `meta = {"image_id", "file_name",
        "captions"}` (all the image's captions, the references for CIDEr), and the report. Images without captions
        and captions of unknown images are reported as malformed / `no_caption`.
    """
    checker = _Checker(annotations_path, on_error)
    data = _load_json(annotations_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{annotations_path} must be a COCO captions file with 'images' and 'annotations' lists.")
    file_of: dict[Any, str] = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            checker.bad(f"images[{index}]", MALFORMED, "an image needs 'id' and 'file_name'")
            continue
        file_of[image["id"]] = image["file_name"]
    captions: dict[str, list[str]] = {name: [] for name in file_of.values()}
    for index, annotation in enumerate(data.get("annotations", [])):
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            checker.bad(f"annotations[{index}]", MALFORMED, "an annotation needs 'image_id' and 'caption'")
        elif not isinstance(annotation["caption"], str) or not annotation["caption"].strip():
            checker.bad(
                f"annotations[{index}]",
                MALFORMED,
                f"'caption' is {_shown(annotation['caption'])}: a caption must be non-empty text",
            )
        elif annotation["image_id"] not in file_of:
            checker.bad(f"annotations[{index}]", MALFORMED, f"image_id {annotation['image_id']} is not in 'images'")
        else:
            captions[file_of[annotation["image_id"]]].append(annotation["caption"].strip())
    ids = {name: str(image_id) for image_id, name in file_of.items()}
    for name in [n for n, c in captions.items() if not c]:
        checker.bad(f"image {ids[name]}", NO_CAPTION, f"image {name} has no caption", name)
        del captions[name]
    extra = {name: {"image_id": image_id} for image_id, name in file_of.items()}
    num_bad = len(checker.report.skipped)
    samples, num_entries = _caption_samples(captions, ids, image_folder, checker, instruction, one_per_caption, extra)
    return checker.finish(samples, num_entries + num_bad)


def read_caption_folder(
    image_folder: str | os.PathLike,
    captions_file: str | os.PathLike,
    *,
    instruction: str = DEFAULT_CAPTION_INSTRUCTION,
    one_per_caption: bool = False,
    on_error: str = "skip",
) -> tuple[list[VLMSample], DataReport]:
    """Read a folder of images with a captions file.

    Args:
        image_folder: the images.
        captions_file: `.csv` with a header row `file_name,caption`, or JSON lines (`.jsonl`/`.json`), one
            `{"file_name": ..., "caption": ...}` per line. Several rows for one file are several captions of it.
        instruction, one_per_caption, on_error: as :func:`read_coco_captions`.

    Returns:
        Samples with id = file name and `meta = {"file_name", "captions"}`, and the report (rows named by line).
    """
    checker = _Checker(captions_file, on_error)
    path = Path(captions_file)
    if not path.is_file():
        raise FileNotFoundError(f"Captions file {path} does not exist: check the path.")
    rows: list[tuple[int, Any]] = []
    with open(path, encoding="utf-8", newline="") as file:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(file)
            if reader.fieldnames is None or not {"file_name", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{path} needs a header row 'file_name,caption', got {reader.fieldnames}.")
            rows = [(reader.line_num, row) for row in reader]
        else:
            for line_number, line in enumerate(file, start=1):
                if line.strip():
                    try:
                        rows.append((line_number, json.loads(line)))
                    except json.JSONDecodeError:
                        rows.append((line_number, None))
    captions: dict[str, list[str]] = defaultdict(list)
    for line_number, row in rows:
        if not isinstance(row, dict) or not row.get("file_name") or row.get("caption") is None:
            checker.bad(f"line {line_number}", MALFORMED, "a row needs a 'file_name' and a non-empty 'caption'")
            continue
        bad = [k for k in ("file_name", "caption") if not isinstance(row[k], str) or not row[k].strip()]
        if bad:
            got = ", ".join(f"{k!r} is {_shown(row[k])}" for k in bad)
            checker.bad(f"line {line_number}", MALFORMED, f"{got}: file_name and caption must be non-empty text")
            continue
        captions[row["file_name"]].append(row["caption"].strip())
    num_bad = len(checker.report.skipped)
    samples, num_entries = _caption_samples(
        dict(captions), {name: name for name in captions}, image_folder, checker, instruction, one_per_caption
    )
    return checker.finish(samples, num_entries + num_bad)


# ---- VQAv2 -----------------------------------------------------------------------------------------------------


def read_vqav2(
    questions_path: str | os.PathLike,
    annotations_path: str | os.PathLike,
    image_folder: str | os.PathLike,
    *,
    split: str = "val",
    file_name_pattern: str = VQAV2_FILE_NAME_PATTERN,
    on_error: str = "skip",
) -> tuple[list[VLMSample], DataReport]:
    """Read VQAv2 (`v2_OpenEnded_mscoco_{split}2014_questions.json` + `v2_mscoco_{split}2014_annotations.json`).

    Args:
        questions_path: `{"questions": [{"question_id", "image_id", "question"}]}`.
        annotations_path: `{"annotations": [{"question_id", "multiple_choice_answer", "answers": [{"answer"}] * 10,
            "answer_type", "question_type"}]}`.
        image_folder: the COCO images of the split.
        split: fills `{split}` in `file_name_pattern` (`train`, `val`).
        file_name_pattern: the image file name from `split` and `image_id` (COCO 2014 names by default).
        on_error: `"skip"` or `"raise"`.

    Returns:
        One sample per question (id `str(question_id)`): the target is `multiple_choice_answer`; `meta` holds
        `question_id`, `image_id`, `question`, the ten `answers` (for the VQA accuracy), `answer_type` and
        `question_type`. And the report.
    """
    checker = _Checker(questions_path, on_error)
    questions = _load_json(questions_path)
    annotations = _load_json(annotations_path)
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise ValueError(f"{questions_path} must be a VQAv2 questions file with a 'questions' list.")
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
        raise ValueError(f"{annotations_path} must be a VQAv2 annotations file with an 'annotations' list.")
    by_question = {
        a["question_id"]: a for a in annotations["annotations"] if isinstance(a, dict) and "question_id" in a
    }
    samples = []
    for index, question in enumerate(questions["questions"]):
        if not isinstance(question, dict) or not {"question_id", "image_id", "question"} <= question.keys():
            checker.bad(f"questions[{index}]", MALFORMED, "a question needs 'question_id', 'image_id' and 'question'")
            continue
        sample_id = str(question["question_id"])
        name = f"question {sample_id}"
        annotation = by_question.get(question["question_id"])
        if annotation is None:
            checker.bad(sample_id, MALFORMED, f"no annotation with this question_id in {annotations_path}", name=name)
            continue
        answers = annotation.get("answers")
        if (
            "multiple_choice_answer" not in annotation
            or not isinstance(answers, list)
            or not all(isinstance(a, dict) and "answer" in a for a in answers)
        ):
            checker.bad(sample_id, MALFORMED, "its annotation needs 'multiple_choice_answer' and 'answers'", name=name)
            continue
        fields = {"question": question["question"], "multiple_choice_answer": annotation["multiple_choice_answer"]}
        bad = [f"{key!r} is {_shown(value)}" for key, value in fields.items() if not isinstance(value, str)]
        bad += [
            f"answers[{k}] is {_shown(a['answer'])}" for k, a in enumerate(answers) if not isinstance(a["answer"], str)
        ]
        if bad:
            checker.bad(sample_id, MALFORMED, f"{', '.join(bad)}: questions and answers must be text", name=name)
            continue
        meta = {
            "question_id": question["question_id"],
            "image_id": question["image_id"],
            "question": question["question"],
            "answers": [a["answer"] for a in answers],
            "answer_type": annotation.get("answer_type"),
            "question_type": annotation.get("question_type"),
        }
        image = os.path.join(image_folder, file_name_pattern.format(split=split, image_id=question["image_id"]))
        messages = vqa_messages(question["question"], annotation["multiple_choice_answer"])
        sample = VLMSample([image], messages, sample_id, meta)
        if checker.valid(sample, name):
            samples.append(sample)
    return checker.finish(samples, len(questions["questions"]))


# ---- the built-in default: easy-VQA ----------------------------------------------------------------------------


def easy_vqa_question_type(answer: str) -> str:
    """`"yes/no"`, `"color"` or `"shape"`: easy-VQA's question types, read off the answer (13 answers in all)."""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in EASY_VQA_COLORS:
        return "color"
    if answer in EASY_VQA_SHAPES:
        return "shape"
    raise ValueError(f"{answer!r} is not an easy-VQA answer; check the installed easy-vqa version.")


def read_easy_vqa(
    split: str = "train",
    *,
    questions_per_sample: int = 1,
    shown_fraction: float | None = None,
    rewrite_shown_fraction: float | None = None,
    negated_questions: bool = True,
    seed: int = 0,
    on_error: str = "skip",
) -> tuple[list[VLMSample], DataReport]:
    """easy-VQA's questions as VQA samples (no download: the data ships in the `easy-vqa` package).

    Args:
        split: `"train"` (38,575 questions on 4,000 images) or `"test"` (9,673 on 1,000).
        questions_per_sample: k > 1 groups k questions of one image into one multi-turn conversation (the image
            appears, and is encoded, once for k questions): `<image>\\nq1`, a1, q2, a2, ... The image's questions
            keep the package's order; its last group may be shorter.
        shown_fraction: repeat the yes/no questions that name what the image shows ("is there a red shape?" yes;
            :func:`vlm_vision.data.easy_vqa.asks_about_what_is_shown`) among their image's questions until they are
            about this fraction of their attribute's yes/no questions (colour or shape; see
            :func:`vlm_vision.data.easy_vqa.repeats_for_shown_fraction`). Only 12% of the colour ones name the
            image's colour: a model scores 88% on them by answering that the named colour is absent, and may stay
            there. None: every question once. The copies follow their question, so with `questions_per_sample`
            > 1 a conversation can hold a question and its copy: train those with `separate_questions`.
        rewrite_shown_fraction: reach that share by renaming instead: yes/no questions that name what the image
            lacks get the image's own colour or shape and the flipped answer
            (:func:`vlm_vision.data.easy_vqa.rewrite_for_shown_fraction`, drawn with `seed`); applied before
            `shown_fraction`. None: the questions as they are.
        negated_questions: False leaves out the negated yes/no questions ("is there not a red shape?").
        seed: for `rewrite_shown_fraction`.
        on_error: `"skip"` or `"raise"` (for a missing image file).

    Returns:
        Samples ordered by image (in the order of each image's first question), then by the package's question
        order, with id `f"{split}-{image_id}-{n}"` (n: the group's number among the image's questions) and
        `meta = {"image_id", "qa": [{"question", "answer", "question_type"}] one per turn}`; and the report.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; easy-VQA has {SPLITS}.")
    if questions_per_sample < 1:
        raise ValueError(f"questions_per_sample={questions_per_sample} must be at least 1.")
    easy_vqa = _easy_vqa()
    questions, answers, image_ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    if rewrite_shown_fraction is not None:
        questions, answers = rewrite_for_shown_fraction(
            questions, answers, image_ids, easy_vqa_image_labels(split), rewrite_shown_fraction, random.Random(seed)
        )
    repeats = {} if shown_fraction is None else repeats_for_shown_fraction(questions, answers, shown_fraction)
    per_image: dict[int, list[dict[str, str]]] = defaultdict(list)  # insertion order = first question of each image
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        if not negated_questions and is_negated(question):
            continue
        item = {"question": question, "answer": answer, "question_type": easy_vqa_question_type(answer)}
        shown = repeats and asks_about_what_is_shown(question, answer)
        per_image[image_id] += [item] * (repeats.get(yes_no_attribute(question), 1) if shown else 1)
    checker = _Checker(f"easy-vqa {split}", on_error)
    samples, num_entries = [], 0
    for image_id, qa in per_image.items():
        for n, start in enumerate(range(0, len(qa), questions_per_sample)):
            group = qa[start : start + questions_per_sample]
            messages = []
            for turn, item in enumerate(group):
                question = f"{IMAGE_TOKEN}\n{item['question']}" if turn == 0 else item["question"]
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": item["answer"]}]
            num_entries += 1
            sample = VLMSample(
                [paths[image_id]], messages, f"{split}-{image_id}-{n}", {"image_id": image_id, "qa": group}
            )
            if checker.valid(sample):
                samples.append(sample)
    return checker.finish(samples, num_entries)


def read_easy_vqa_captions(
    split: str = "train", *, instruction: str = DEFAULT_CAPTION_INSTRUCTION, on_error: str = "skip"
) -> tuple[list[VLMSample], DataReport]:
    """easy-VQA's images with captions derived from their answers: `"a blue circle"`.

    Colour and shape are read off each image's questions (:func:`vlm_vision.data.easy_vqa.easy_vqa_image_labels`:
    "what color is the triangle?" blue; "what is the blue shape?" rectangle; "is there a triangle?" yes). Images
    whose questions do not give both (about 11%) get no caption: they are counted as `no_caption` in the report
    (not an error, whatever `on_error`).

    Returns:
        Samples with id `f"{split}-{image_id}"` and `meta = {"image_id", "shape", "color", "captions": [caption]}`,
        in image-id order; and the report.
    """
    checker = _Checker(f"easy-vqa {split} captions", on_error)
    samples = []
    labels = easy_vqa_image_labels(split)
    for image_id, entry in sorted(labels.items()):
        sample_id = f"{split}-{image_id}"
        if "shape" not in entry or "color" not in entry:
            checker.report.skipped.append(
                SkippedSample(sample_id, NO_CAPTION, f"{sample_id}: its questions do not give colour and shape")
            )
            continue
        caption = f"a {entry['color']} {entry['shape']}"
        meta = {"image_id": image_id, "shape": entry["shape"], "color": entry["color"], "captions": [caption]}
        sample = VLMSample([entry["path"]], vqa_messages(instruction, caption), sample_id, meta)
        if checker.valid(sample):
            samples.append(sample)
    return checker.finish(samples, len(labels))


__all__ = [
    "DEFAULT_CAPTION_INSTRUCTION",
    "VQAV2_FILE_NAME_PATTERN",
    "BadSampleError",
    "DataReport",
    "SampleProblem",
    "SkippedSample",
    "VLMSample",
    "easy_vqa_question_type",
    "llava_sample",
    "read_caption_folder",
    "read_coco_captions",
    "read_easy_vqa",
    "read_easy_vqa_captions",
    "read_llava",
    "read_vqav2",
    "vqa_messages",
]
