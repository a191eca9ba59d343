"""Sample indexes: what a training set holds, without holding it.

A data set of hundreds of thousands of conversations must not live in memory as Python objects (a list of dicts per
sample costs kilobytes each, and DataLoader workers copy it page by page as they touch reference counts). An index
keeps only what it needs to find each sample and builds the :class:`~.conversations.VLMSample` when asked:

- :class:`SampleList`: samples already in memory (the built-in easy-VQA data, tests, small files);
- :class:`JsonIndex`: a LLaVA conversation file, a JSON list or JSON lines, read once to record each entry's byte
  offsets (two int64 arrays, 16 bytes per sample), then each entry read from disk and decoded on access;
- :class:`RowsIndex`: any sequence of LLaVA-form rows with `len` and indexing, e.g. a Hugging Face
  `datasets.Dataset` (memory-mapped Arrow) or a parquet file loaded through it.

Every index gives `len(index)`, `index.sample(i)` (raising :class:`~.conversations.SampleProblem` for an entry that
cannot be a sample; the data set skips and counts it) and `index.length_estimates()`: per sample, the number of
characters of text and of images, for length-grouped batching, without building the samples.
"""

from __future__ import annotations

import array
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .conversations import VLMSample, llava_sample

logger = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20  # read a JSON list 16 MiB at a time while indexing it


class SampleList:
    """Samples in memory, as an index."""

    def __init__(self, samples: Sequence[VLMSample], source: str = "samples"):
        self.samples = list(samples)
        self.source = source

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, index: int) -> VLMSample:
        return self.samples[index]

    def length_estimates(self) -> tuple[np.ndarray, np.ndarray]:
        chars = [sum(len(m["content"]) for m in s.messages) for s in self.samples]
        return np.asarray(chars, dtype=np.int64), np.asarray([len(s.images) for s in self.samples], dtype=np.int64)


FORMAT_PROBE = 16  # entries read when an index is opened, to tell a file of another format from one with bad entries


def check_format(index, what: str) -> None:
    """Refuse an index none of whose first entries is a usable sample: the file is of another format (a COCO
    captions file, a VQAv2 questions file, ...), not a file with a few bad entries (those are skipped in training)."""
    from .conversations import SampleProblem

    problems = []
    for position in range(min(FORMAT_PROBE, len(index))):
        try:
            index.sample(position)
            return
        except SampleProblem as problem:
            problems.append(f"entry {position}: {problem.problem}")
    if problems:
        raise ValueError(
            f"{index.source} does not read as {what}: none of its first {len(problems)} entries is a sample "
            f"({problems[0]}). A LLaVA entry is {{'id', 'image': path(s), 'conversations': [{{'from': 'human' | 'gpt', "
            "'value': text}]}} (or transformers' {'images', 'messages': [{'role', 'content'}]}); check the file, or "
            "the recipe's data.name for its format."
        )


def _entry_size(entry: Any) -> tuple[int, int]:
    """(characters of text, number of images) of a LLaVA entry, for length estimates; (0, 0) when malformed."""
    if not isinstance(entry, dict):
        return 0, 0
    turns = entry.get("conversations", entry.get("messages"))  # LLaVA's, or transformers' chat messages
    texts = []
    for turn in turns if isinstance(turns, list) else ():
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        parts = value if isinstance(value, list) else [value]
        texts += [p.get("text") if isinstance(p, dict) else p for p in parts]
    chars = sum(len(text) for text in texts if isinstance(text, str))
    image = entry.get("image", entry.get("images"))
    return chars, (1 if isinstance(image, str) else len(image) if isinstance(image, list) else 0)


class JsonIndex:
    """A LLaVA-format file (a JSON list, or one JSON object per line) read lazily.

    Building the index reads the file once, in chunks, recording where each entry starts and ends (and its text and
    image counts for length grouping); the entries themselves are not kept. `sample(i)` reads entry i's bytes with
    `os.pread` and decodes them. Each process (DataLoader workers included) opens the file on first use.

    Args:
        path: the `.json` (a list of entries) or `.jsonl` file.
        image_folder: the folder the entries' image paths are relative to.
        to_sample: entry, position, image folder -> sample (default: :func:`~.conversations.llava_sample`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_folder: str | os.PathLike,
        to_sample: Callable[[Any, int, str | os.PathLike], VLMSample] = llava_sample,
    ):
        self.path = Path(path)
        self.source = str(path)
        self.image_folder = image_folder
        self.to_sample = to_sample
        if not self.path.is_file():
            raise FileNotFoundError(f"Data file {path} does not exist: check the path (data.train / data.eval).")
        self.starts, self.ends, self.chars, self.images = _index_json(self.path)
        self._file = None
        self._pid = None
        check_format(self, "a LLaVA conversation file")
        logger.info("indexed %s: %d entries", path, len(self))

    def __len__(self) -> int:
        return len(self.starts)

    def __getstate__(self):  # DataLoader workers started by spawn: reopen the file there
        return {**self.__dict__, "_file": None, "_pid": None}

    def entry(self, index: int) -> Any:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 (kept open for pread)
        start, end = int(self.starts[index]), int(self.ends[index])
        return json.loads(os.pread(self._file.fileno(), end - start, start))

    def sample(self, index: int) -> VLMSample:
        return self.to_sample(self.entry(index), index, self.image_folder)

    def length_estimates(self) -> tuple[np.ndarray, np.ndarray]:
        return self.chars, self.images


def _index_json(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Byte offsets (start, end) of each entry of a JSON list or a JSON-lines file, and its text/image counts.

    The bytes are decoded as latin-1, one character per byte, so positions in the text are byte offsets: UTF-8
    multi-byte characters only use bytes >= 0x80, which never form JSON's structure (only the string values decoded
    here come out garbled, and only their lengths are used). `json.JSONDecoder.raw_decode` finds each entry's end.
    """
    decoder = json.JSONDecoder()
    starts, ends, chars, images = (array.array("q") for _ in range(4))  # 8 bytes a number, not a Python int
    with open(path, "rb") as file:
        text, base, position, eof = "", 0, 0, False

        def more() -> bool:
            nonlocal text, base, position, eof
            chunk = file.read(CHUNK_BYTES)
            if not chunk:
                eof = True
                return False
            text, base, position = text[position:] + chunk.decode("latin-1"), base + position, 0
            return True

        def skip(characters: str) -> str:
            """Skip `characters`; the next other character ('' at the end of the file)."""
            nonlocal position
            while True:
                while position < len(text) and text[position] in characters:
                    position += 1
                if position < len(text):
                    return text[position]
                if not more():
                    return ""

        first = skip(" \t\r\n")
        if first == "":
            raise ValueError(f"{path} is empty: a LLaVA conversation file holds a JSON list of entries.")
        if first == "{" and path.suffix == ".json":
            raise ValueError(
                f"{path} holds a JSON object, not a list of entries: a LLaVA conversation file is a JSON list (or a "
                ".jsonl file with one entry per line). Is it another format (COCO captions, VQAv2)?"
            )
        if first not in ("[", "{"):
            raise ValueError(
                f"{path} is not a LLaVA conversation file: it must hold a JSON list of entries or one JSON object per "
                f"line (it starts with {first!r})."
            )
        is_list = first == "["
        if is_list:
            position += 1
        while True:
            following = skip(" \t\r\n," if is_list else " \t\r\n")
            if following == "" or (is_list and following == "]"):
                break
            while True:
                try:
                    entry, end = decoder.raw_decode(text, position)
                    if end < len(text) or eof:
                        break
                except json.JSONDecodeError as error:
                    if eof:
                        raise ValueError(
                            f"{path} is not valid JSON at byte {base + error.pos} ({error.msg}): check that the file "
                            "is complete."
                        ) from None
                if not more():
                    eof = True
            starts.append(base + position)
            ends.append(base + end)
            size = _entry_size(entry)
            chars.append(size[0])
            images.append(size[1])
            position = end
        if is_list and following != "]":
            raise ValueError(f"{path} ends before its JSON list is closed: check that the file is complete.")
    return tuple(
        np.frombuffer(values, dtype=np.int64) if len(values) else np.zeros(0, np.int64)
        for values in (starts, ends, chars, images)
    )


class RowsIndex:
    """LLaVA-form rows (`{"id", "image", "conversations"}`) from anything with `len` and integer indexing: a Hugging
    Face `datasets.Dataset` (memory-mapped Arrow, nothing copied into Python until a row is read) or a list."""

    def __init__(self, rows, image_folder: str | os.PathLike, source: str = "rows", to_sample=llava_sample):
        self.rows = rows
        self.image_folder = image_folder
        self.source = source
        self.to_sample = to_sample
        check_format(self, "LLaVA-form rows")

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, index: int) -> VLMSample:
        return self.to_sample(self.rows[index], index, self.image_folder)

    def length_estimates(self) -> tuple[np.ndarray, np.ndarray]:
        sizes = [_entry_size(self.rows[i]) for i in range(len(self.rows))]
        return np.asarray([c for c, _ in sizes], dtype=np.int64), np.asarray([n for _, n in sizes], dtype=np.int64)


class SubsetIndex:
    """Some samples of another index, in a given order (e.g. a seeded random subset)."""

    def __init__(self, index, positions: Sequence[int]):
        self.index, self.positions = index, np.asarray(positions, dtype=np.int64)
        self.source = f"{index.source} (a subset of {len(self.positions)})"

    @classmethod
    def seeded(cls, index, size: int | None, seed: int):
        """`size` samples drawn at random with `seed` (the same ones as `random.Random(seed).sample(samples,
        size)`), or `index` itself when `size` is None or not smaller."""
        if size is None or size >= len(index):
            return index
        if size <= 0:
            raise ValueError(f"A subset needs a positive size, got {size}.")
        return cls(index, random.Random(seed).sample(range(len(index)), size))

    def __len__(self) -> int:
        return len(self.positions)

    def sample(self, index: int) -> VLMSample:
        return self.index.sample(int(self.positions[index]))

    def length_estimates(self) -> tuple[np.ndarray, np.ndarray]:
        chars, images = self.index.length_estimates()
        return chars[self.positions], images[self.positions]


def open_llava_index(path: str | os.PathLike, image_folder: str | os.PathLike):
    """The index of a LLaVA-format data file: `.json`/`.jsonl` through :class:`JsonIndex`; `.parquet`/`.arrow` or a
    folder saved by `datasets.Dataset.save_to_disk` through Hugging Face `datasets` (an optional dependency)."""
    path = Path(path)
    if path.is_dir() or path.suffix in (".parquet", ".arrow"):
        try:
            import datasets
        except ImportError as error:
            raise ImportError(
                f"{path}: parquet/Arrow data needs Hugging Face datasets: pip install datasets (or give a LLaVA "
                ".json/.jsonl file)."
            ) from error
        if path.is_dir():
            rows = datasets.load_from_disk(str(path))
        else:
            rows = datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train")
        return RowsIndex(rows, image_folder, source=str(path))
    return JsonIndex(path, image_folder)


__all__ = ["JsonIndex", "RowsIndex", "SampleList", "SubsetIndex", "open_llava_index"]
