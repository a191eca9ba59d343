"""Vision-language data: every reader on a small fixture with bad samples, easy-VQA, the data set and the collator."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tests.vlm_helpers import build_vlm, train_tokenizer, vqa
from vlm_vision.data.conversations import (
    DEFAULT_CAPTION_INSTRUCTION,
    BadSampleError,
    VLMSample,
    read_caption_folder,
    read_coco_captions,
    read_easy_vqa,
    read_easy_vqa_captions,
    read_llava,
    read_vqav2,
)
from vlm_vision.data.dataset import VLMCollator, VLMDataset, split_questions
from vlm_vision.vlm.processing_vlm import IGNORE_INDEX


@pytest.fixture
def images(tmp_path):
    """Real image files of every mode, a truncated JPEG and a name with no file behind it."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "rgb.jpg")
    Image.fromarray(pixels).convert("L").save(folder / "gray.png")
    rgba = np.concatenate([pixels, np.full((24, 20, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(folder / "palette.png")
    (folder / "corrupt.jpg").write_bytes((folder / "rgb.jpg").read_bytes()[:200])  # truncated: exists, won't decode
    return folder


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def write_llava(tmp_path):
    entries = [
        {"id": "ok", "image": "rgb.jpg", "conversations": turns("<image>\nwhat is it?", "noise", "sure?", "yes")},
        {"id": "two", "image": ["gray.png", "rgba.png"], "conversations": turns("<image><image>\ncompare", "same")},
        {"id": "text", "conversations": turns("hello", "hi")},
        {"id": "gone", "image": "missing.jpg", "conversations": turns("<image>\nq", "a")},
        {"id": "tags", "image": "palette.png", "conversations": turns("<image>\n<image>\nq", "a")},
        {"id": "nokey", "image": "rgb.jpg"},
        {"id": "role", "image": "rgb.jpg", "conversations": [{"from": "robot", "value": "<image>"}]},
        {"image": "corrupt.jpg", "conversations": turns("<image>\nq", "a")},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(entries))
    return path


def test_llava_reader_keeps_good_samples_and_reports_bad_ones(tmp_path, images, caplog):
    path = write_llava(tmp_path)
    with caplog.at_level(logging.WARNING):
        samples, report = read_llava(path, images)
    assert [s.id for s in samples] == ["ok", "two", "text", "7"]  # no id: the entry index
    assert samples[0].messages[:2] == [
        {"role": "user", "content": "<image>\nwhat is it?"},
        {"role": "assistant", "content": "noise"},
    ]
    assert samples[1].images == [str(images / "gray.png"), str(images / "rgba.png")]
    assert samples[2].images == []
    assert report.num_entries == 8 and report.num_kept == 4
    assert report.counts() == {"missing_image": 1, "image_tag_mismatch": 1, "malformed": 2}
    missing = next(s for s in report.skipped if s.reason == "missing_image")
    assert missing.file == str(images / "missing.jpg")
    assert "entry 5 (id nokey)" in report.summary()
    # one log line naming the index file, the count and the first bad samples' files
    assert str(path) in caplog.text and "kept 4 of 8" in caplog.text and "missing.jpg" in caplog.text

    with pytest.raises(
        BadSampleError, match=r"llava\.json, entry 3 \(id gone\): image file .*missing\.jpg does not exist"
    ):
        read_llava(path, images, on_error="raise")
    with pytest.raises(ValueError, match="on_error='ignore'"):
        read_llava(path, images, on_error="ignore")


def test_coco_captions_per_image_or_per_caption(tmp_path, images):
    data = {
        "images": [
            {"id": 1, "file_name": "rgb.jpg"},
            {"id": 2, "file_name": "palette.png"},
            {"id": 3, "file_name": "missing.jpg"},
            {"id": 4, "file_name": "gray.png"},  # no caption
            {"file_name": "rgba.png"},  # malformed: no id
        ],
        "annotations": [
            {"image_id": 1, "caption": "A noisy picture. "},
            {"image_id": 2, "caption": "Eight colours."},
            {"image_id": 1, "caption": "Random pixels."},
            {"image_id": 3, "caption": "Nothing."},
            {"image_id": 9, "caption": "An unknown image."},
            {"image_id": 2},
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    samples, report = read_coco_captions(path, images)
    assert [s.id for s in samples] == ["1", "2"]
    assert samples[0].messages == [
        {"role": "user", "content": f"<image>\n{DEFAULT_CAPTION_INSTRUCTION}"},
        {"role": "assistant", "content": "A noisy picture."},
    ]
    assert samples[0].meta == {
        "captions": ["A noisy picture.", "Random pixels."],
        "file_name": "rgb.jpg",
        "image_id": 1,
    }
    assert report.counts() == {"malformed": 3, "no_caption": 1, "missing_image": 1}
    assert report.num_entries == 7 and report.num_kept == 2

    per_caption, report = read_coco_captions(path, images, one_per_caption=True, instruction="Caption:")
    assert [s.id for s in per_caption] == ["1_0", "1_1", "2_0"]
    assert per_caption[1].messages[1]["content"] == "Random pixels."
    assert per_caption[1].messages[0]["content"] == "<image>\nCaption:"
    with pytest.raises(BadSampleError, match=r"captions\.json, images\[4\]: an image needs 'id'"):
        read_coco_captions(path, images, on_error="raise")


def test_vqav2_reader_with_ten_answers_and_a_file_name_pattern(tmp_path, images):
    for image_id, source in [(7, "rgb.jpg"), (8, "palette.png")]:
        (images / f"COCO_val2014_{image_id:012d}.jpg").write_bytes((images / source).read_bytes())
    questions = {
        "questions": [
            {"question_id": 70, "image_id": 7, "question": "How many dots?"},
            {"question_id": 80, "image_id": 8, "question": "What colour?"},
            {"question_id": 90, "image_id": 9, "question": "Where?"},  # no image file
            {"question_id": 91, "image_id": 7, "question": "Why?"},  # no annotation
            {"question_id": 92, "question": "Which image?"},  # malformed
        ]
    }
    answers = ["2"] * 3 + ["two", "3", "3", "4", "many", "2", "1"]
    annotations = {
        "annotations": [
            {
                "question_id": 70,
                "multiple_choice_answer": "2",
                "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
                "answer_type": "number",
                "question_type": "how many",
            },
            {"question_id": 80, "multiple_choice_answer": "red", "answers": [{"answer": "red"}] * 10},
            {"question_id": 90, "multiple_choice_answer": "here", "answers": [{"answer": "here"}] * 10},
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    samples, report = read_vqav2(tmp_path / "q.json", tmp_path / "a.json", images)
    assert [s.id for s in samples] == ["70", "80"]
    first = samples[0]
    assert first.images == [str(images / "COCO_val2014_000000000007.jpg")]
    assert first.messages == [
        {"role": "user", "content": "<image>\nHow many dots?"},
        {"role": "assistant", "content": "2"},
    ]
    assert first.meta["answers"] == answers and first.meta["question_type"] == "how many"
    assert first.meta["answer_type"] == "number" and first.meta["image_id"] == 7
    assert report.counts() == {"missing_image": 1, "malformed": 2}
    assert any("COCO_val2014_000000000009.jpg" in s.message for s in report.skipped)

    # another naming scheme (e.g. COCO 2017 names)
    (images / "000000000007.jpg").write_bytes((images / "rgb.jpg").read_bytes())
    samples, report = read_vqav2(
        tmp_path / "q.json", tmp_path / "a.json", images, file_name_pattern="{image_id:012d}.jpg"
    )
    assert [s.id for s in samples] == ["70"]
    with pytest.raises(BadSampleError, match=r"question 80: image file .*000000000008\.jpg does not exist"):
        read_vqav2(
            tmp_path / "q.json", tmp_path / "a.json", images, file_name_pattern="{image_id:012d}.jpg", on_error="raise"
        )


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_caption_folder_csv_and_json_lines(tmp_path, images, suffix):
    rows = [
        {"file_name": "rgb.jpg", "caption": "noise"},
        {"file_name": "gray.png", "caption": "grey noise"},
        {"file_name": "rgb.jpg", "caption": "colour noise"},
        {"file_name": "missing.jpg", "caption": "nothing"},
        {"file_name": "rgba.png", "caption": ""},  # malformed: empty caption
    ]
    path = tmp_path / f"captions{suffix}"
    if suffix == ".csv":
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, ["file_name", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    samples, report = read_caption_folder(images, path)
    assert [s.id for s in samples] == ["rgb.jpg", "gray.png"]
    assert samples[0].meta["captions"] == ["noise", "colour noise"]
    assert samples[0].messages[1]["content"] == "noise"
    expected = {"missing_image": 1, "malformed": 1 if suffix == ".csv" else 2}
    assert report.counts() == expected
    assert any(s.message.startswith("line 6:") for s in report.skipped)  # the empty caption, by line (header = 1)
    with pytest.raises(BadSampleError, match=f"captions\\{suffix}, line"):
        read_caption_folder(images, path, on_error="raise")


# ---- the built-in default: easy-VQA (the real package data) ----------------------------------------------------


@pytest.fixture(scope="module")
def easy_train():
    return read_easy_vqa("train")


def test_easy_vqa_questions(easy_train):
    samples, report = easy_train
    assert len(samples) == 38_575 and report.num_kept == 38_575 and not report.skipped
    first = samples[0]
    assert first.id == "train-0-0" and first.images[0].endswith("train/images/0.png")
    assert first.messages == [
        {"role": "user", "content": "<image>\nwhat is the blue shape?"},
        {"role": "assistant", "content": "rectangle"},
    ]
    assert first.meta == {
        "image_id": 0,
        "qa": [{"question": "what is the blue shape?", "answer": "rectangle", "question_type": "shape"}],
    }
    types = [s.meta["qa"][0]["question_type"] for s in samples]
    assert {t: types.count(t) for t in set(types)} == {"yes/no": 28_407, "color": 5_166, "shape": 5_002}


def test_easy_vqa_grouped_questions_share_one_image():
    singles, _ = read_easy_vqa("test")
    grouped, _ = read_easy_vqa("test", questions_per_sample=4)
    assert len(singles) == 9_673
    assert sum(len(s.meta["qa"]) for s in grouped) == 9_673
    assert all(s.num_image_tags == 1 and len(s.images) == 1 for s in grouped)
    first = grouped[0]
    assert len(first.messages) == 2 * len(first.meta["qa"]) == 8
    assert first.messages[0]["content"].startswith("<image>\n") and "<image>" not in first.messages[2]["content"]
    assert [m["content"] for m in first.messages[1::2]] == [qa["answer"] for qa in first.meta["qa"]]
    with pytest.raises(ValueError, match="questions_per_sample=0"):
        read_easy_vqa("test", questions_per_sample=0)


def test_easy_vqa_repeats_the_questions_that_name_what_is_shown():
    from vlm_vision.data.easy_vqa import asks_about_what_is_shown, repeats_for_shown_fraction, yes_no_attribute
    from vlm_vision.training.vlm_data import load_eval_samples, open_training_data

    assert asks_about_what_is_shown("is there a red shape?", "yes")
    assert asks_about_what_is_shown("is there not a red shape?", "no")
    assert not asks_about_what_is_shown("is there a red shape?", "no")
    assert not asks_about_what_is_shown("is no circle present?", "yes")
    assert not asks_about_what_is_shown("what color is the shape?", "red")

    once, _ = read_easy_vqa("test", questions_per_sample=4)
    qa = [qa for s in once for qa in s.meta["qa"]]
    repeats = repeats_for_shown_fraction([q["question"] for q in qa], [q["answer"] for q in qa], 0.3)
    assert repeats == {"color": 3, "shape": 1}  # 12% and 33% of their yes/no questions name what is shown
    thrice, _ = read_easy_vqa("test", questions_per_sample=4, shown_fraction=0.3)
    shown = [q for q in qa if asks_about_what_is_shown(q["question"], q["answer"])]
    shown_colors = [q for q in shown if yes_no_attribute(q["question"]) == "color"]
    assert 0 < len(shown_colors) < len(shown)
    assert sum(len(s.meta["qa"]) for s in thrice) == 9_673 + 2 * len(shown_colors)

    def counts(samples):
        return Counter((s.meta["image_id"], qa["question"], qa["answer"]) for s in samples for qa in s.meta["qa"])

    before, after = counts(once), counts(thrice)

    def times(key):
        return 3 if asks_about_what_is_shown(*key[1:]) and yes_no_attribute(key[1]) == "color" else 1

    assert after == {key: n * times(key) for key, n in before.items()}
    with pytest.raises(ValueError, match=r"shown_fraction=1\.5 must be between 0 and 1"):
        read_easy_vqa("test", shown_fraction=1.5)
    # a recipe's data option repeats them in training only: evaluation keeps the test split as it is
    data = {"name": "easy-vqa", "shown_fraction": 0.3}
    train, evaluation = open_training_data(data, seed=0), load_eval_samples(data, seed=0)
    assert sum(len(train.sample(i).meta["qa"]) for i in range(len(train))) > 38_575 and len(evaluation) == 9_673


def test_easy_vqa_rewrites_questions_to_name_what_is_shown_and_drops_negated_ones():
    from vlm_vision.data.easy_vqa import (
        EASY_VQA_COLORS,
        asks_about_what_is_shown,
        easy_vqa_image_labels,
        is_negated,
        yes_no_attribute,
    )
    from vlm_vision.training.vlm_schema import check_data

    def yes_no(samples):
        return [(s.meta["image_id"], qa) for s in samples for qa in s.meta["qa"] if qa["question_type"] == "yes/no"]

    def share(pairs, attribute, test):
        chosen = [qa for _, qa in pairs if yes_no_attribute(qa["question"]) == attribute]
        return sum(test(qa) for qa in chosen) / len(chosen)

    def shown(qa):
        return asks_about_what_is_shown(qa["question"], qa["answer"])

    def colors_named(question):
        return [c for c in EASY_VQA_COLORS if c in question.replace("?", "").split()]

    once, _ = read_easy_vqa("test", questions_per_sample=4)
    rewritten, _ = read_easy_vqa("test", questions_per_sample=4, rewrite_shown_fraction=0.3, seed=0)
    before, after = yes_no(once), yes_no(rewritten)
    assert len(after) == len(before)  # same questions, some renamed: no copies
    assert share(before, "color", shown) == pytest.approx(0.12, abs=0.01)
    assert share(after, "color", shown) == pytest.approx(0.30, abs=0.02)
    assert share(after, "shape", shown) == share(before, "shape", shown)  # already above 0.3: left alone
    assert share(after, "color", lambda qa: is_negated(qa["question"])) == share(
        before, "color", lambda qa: is_negated(qa["question"])
    )
    labels = easy_vqa_image_labels("test")
    changed = [(i, old, new) for (i, old), (_, new) in zip(before, after, strict=True) if old != new]
    assert len(changed) > 500
    for image_id, old, new in changed:
        color = labels[image_id]["color"]
        (old_color,) = colors_named(old["question"])
        assert colors_named(new["question"]) == [color] != [old_color]
        assert new["question"] == old["question"].replace(old_color, color)
        assert new["answer"] == ("no" if is_negated(new["question"]) else "yes") != old["answer"]
    again, _ = read_easy_vqa("test", questions_per_sample=4, rewrite_shown_fraction=0.3, seed=0)
    other, _ = read_easy_vqa("test", questions_per_sample=4, rewrite_shown_fraction=0.3, seed=1)
    assert yes_no(again) == after and yes_no(other) != after  # seeded
    with pytest.raises(ValueError, match=r"rewrite_shown_fraction=1\.5 must be between 0 and 1"):
        read_easy_vqa("test", rewrite_shown_fraction=1.5)

    with pytest.raises(ValueError, match=r"\['negated_questions'\] are for the built-in easy-VQA questions"):
        check_data({"name": "llava", "train": "t.json", "image_folder": ".", "negated_questions": False}, "data")

    plain, _ = read_easy_vqa("test", questions_per_sample=4, negated_questions=False)
    kept = [qa for s in plain for qa in s.meta["qa"]]
    assert kept and not any(is_negated(qa["question"]) for qa in kept)
    assert len(kept) == sum(not is_negated(qa["question"]) for s in once for qa in s.meta["qa"])


def test_easy_vqa_captions_from_the_answers():
    samples, report = read_easy_vqa_captions("train")
    # checked by eye: train image 0 is a blue rectangle, 1 a blue triangle, 2 a red triangle
    assert [s.messages[1]["content"] for s in samples[:3]] == ["a blue rectangle", "a blue triangle", "a red triangle"]
    assert samples[0].meta["captions"] == ["a blue rectangle"] and samples[0].meta["color"] == "blue"
    # images whose questions do not name both colour and shape get no caption (counted, not an error)
    assert len(samples) == 3_542 and report.counts() == {"no_caption": 458}


# ---- data set and collator -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    _, processor = build_vlm(train_tokenizer())
    return processor


def test_dataset_skips_long_and_mismatched_samples_and_reports_them_in_the_batch(processor, images):
    n = processor.num_image_tokens  # 64 for the tiny tower's 8x8 grid
    samples = [
        VLMSample([str(images / "rgb.jpg")], vqa("what color is the circle?", "blue"), "short"),
        VLMSample([str(images / "rgb.jpg")] * 2, vqa("is there a red triangle?", "no", images=2), "long"),
        VLMSample([str(images / "rgb.jpg")], vqa("what?", "no", images=2), "tags"),
    ]
    dataset = VLMDataset(samples, processor, max_length=n + 40)
    assert len(dataset) == 3  # lazy: nothing is read or encoded up front
    item = dataset[1]  # "long", then "tags" are skipped: the next usable sample ("short", wrapping) instead
    assert len(item["encoded"]["input_ids"]) <= n + 40 and len(item["images"]) == 1
    assert [(s.id, s.reason) for s in item["skipped"]] == [("long", "too_long"), ("tags", "image_tag_mismatch")]
    assert "max_length=104" in item["skipped"][0].message and "2 images x 64 tokens" in item["skipped"][0].message
    assert dataset[2]["skipped"] == []  # known bad samples are not read again in this process
    with pytest.raises(BadSampleError, match=r"sample long: The conversation is \d+ tokens long, over max_length=104"):
        VLMDataset(samples, processor, max_length=n + 40, on_error="raise")[1]
    with pytest.raises(BadSampleError, match="sample tags: 2 <image> tags but 1 images"):
        VLMDataset(samples, processor, on_error="raise")[2]
    assert VLMDataset(samples[:2], processor, max_length=None)[1]["skipped"] == []
    with pytest.raises(BadSampleError, match="None of the 1 samples"):
        VLMDataset(samples[1:2], processor, max_length=n + 40)[0]
    with pytest.raises(ValueError, match="has no samples"):
        VLMDataset([], processor)


def test_dataset_decodes_every_mode_and_replaces_unreadable_images(processor, images, tmp_path):
    samples, _ = read_llava(write_llava(tmp_path), images)  # ok, two (gray + RGBA), text, 7 (corrupt file)
    samples.append(VLMSample([str(images / "palette.png")], vqa("what?", "dots"), "palette"))
    samples.append(VLMSample([str(images / "gone.png")], vqa("what?", "dots"), "vanished"))
    dataset = VLMDataset(samples, processor, max_length=512)
    item = dataset[1]
    assert [tuple(image.shape) for image in item["images"]] == [(3, 32, 32)] * 2  # gray and RGBA, as RGB
    # the pixel values are the image processor's own output for the decoded RGB file
    expected = processor.image_processor(images=[Image.open(images / "gray.png").convert("RGB")], return_tensors="pt")
    torch.testing.assert_close(item["images"][0], expected["pixel_values"][0])
    assert dataset[4]["images"][0].shape == (3, 32, 32)  # palette
    replaced = dataset[3]  # the corrupt image: the next readable sample instead, the same one every time
    assert [(s.id, s.reason, s.file) for s in replaced["skipped"]] == [
        ("7", "unreadable_image", str(images / "corrupt.jpg"))
    ]
    assert torch.equal(replaced["images"][0], dataset[4]["images"][0])
    wrapped = dataset[5]  # a file that vanished after indexing: reported as missing, wraps around to the first
    assert [(s.id, s.reason) for s in wrapped["skipped"]] == [("vanished", "missing_image")]
    assert wrapped["encoded"] == dataset[0]["encoded"]
    with pytest.raises(IndexError):
        dataset[6]
    strict = VLMDataset(samples, processor, on_error="raise")
    with pytest.raises(BadSampleError, match=r"sample 7: image .*corrupt\.jpg: OSError"):
        strict[3]


def test_separate_questions_share_their_image_in_the_batch(processor):
    samples, _ = read_easy_vqa("train", questions_per_sample=3)
    samples = [s for s in samples if len(s.meta["qa"]) == 3][:2]
    turns_of_first = split_questions(samples[0].messages)
    assert [t[0]["content"] for t in turns_of_first] == [f"<image>\n{qa['question']}" for qa in samples[0].meta["qa"]]
    assert [t[1]["content"] for t in turns_of_first] == [qa["answer"] for qa in samples[0].meta["qa"]]

    dataset = VLMDataset(samples, processor, max_length=512, separate_questions=True)
    batch = VLMCollator(processor)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape[0] == 2 and batch["input_ids"].shape[0] == 6
    assert batch["image_index"].tolist() == [0, 0, 0, 1, 1, 1]
    # every sequence shows its image once and supervises exactly its own answer
    assert ((batch["input_ids"] == processor.image_token_id).sum(dim=1) == processor.num_image_tokens).all()
    answers = [processor.tokenizer.decode(row[row != IGNORE_INDEX]) for row in batch["labels"]]
    expected = [qa["answer"] for s in samples for qa in s.meta["qa"]]
    assert [a.replace("</s>", "").strip() for a in answers] == expected

    two_images = VLMSample(["a.png", "b.png"], vqa("q", "a", images=2), "two", {})
    with pytest.raises(ValueError, match="separate_questions needs one image per sample; two has 2"):
        VLMDataset([two_images], processor, separate_questions=True)[0]


def test_flips_depend_on_seed_epoch_and_index_only(processor, images):
    samples = [VLMSample([str(images / "rgb.jpg")], vqa("what?", "noise"), str(i)) for i in range(16)]
    dataset = VLMDataset(samples, processor, horizontal_flip=True, seed=3)
    plain = VLMDataset(samples, processor)[0]["images"][0]

    def flips():
        return [not torch.equal(dataset[i]["images"][0], plain) for i in range(16)]

    first = flips()
    assert 0 < sum(first) < 16 and first == flips()  # a coin per sample, the same on every read
    assert all(torch.equal(dataset[i]["images"][0], plain.flip(-1)) for i in range(16) if first[i])
    dataset.set_epoch(1)
    assert flips() != first


def test_collator_builds_the_padded_batch(processor, images, tmp_path):
    samples, _ = read_llava(write_llava(tmp_path), images)
    dataset = VLMDataset(samples[:3], processor, max_length=512)  # 1 image, 2 images, text only
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=VLMCollator(processor), num_workers=1)
    batch = next(iter(loader))  # built in a DataLoader worker process
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_labels", "skipped"}
    assert batch["pixel_values"].shape == (3, 3, 32, 32)  # the three images, flat, in tag order
    image_positions = batch["input_ids"] == processor.image_token_id
    assert image_positions.sum(dim=1).tolist() == [64, 128, 0]
    assert (batch["labels"][image_positions] == IGNORE_INDEX).all()
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    # the answers carry loss: two turns in the first sample, one in the others
    supervised = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX])
    assert "noise" in supervised and "yes" in supervised
    # the same batch as the processor makes from the decoded images (RGBA composited on white by load_image)
    direct = processor.encode_conversations([s.messages for s in samples[:3]], [s.images for s in samples[:3]])
    for key in ("input_ids", "labels", "pixel_values"):
        torch.testing.assert_close(batch[key], direct[key], msg=key)


def test_processed_images_decode_each_file_once_and_bound_their_cache(processor, images, monkeypatch):
    from vlm_vision.data import images as image_module
    from vlm_vision.data.images import ImageLoadError, ProcessedImages

    decoded = []
    load = image_module.load_image
    monkeypatch.setattr(image_module, "load_image", lambda path: decoded.append(str(path)) or load(path))
    rgb, gray = str(images / "rgb.jpg"), images / "gray.png"
    pixels = ProcessedImages(processor, max_size=1)
    first = pixels(rgb)
    assert first.shape == (3, 32, 32) and torch.equal(first, processor.process_images([load(rgb)])[0])
    assert pixels(rgb) is first and decoded == [rgb]  # kept: decoded once
    pixels(gray)  # a path-like too; the bound drops the least recently used, rgb.jpg
    assert pixels(rgb) is not first and decoded == [rgb, str(gray), rgb]
    uncached = ProcessedImages(processor, cache=False)
    assert uncached(rgb) is not uncached(rgb)
    picture = load(rgb)
    assert pixels(picture) is not pixels(picture)  # in-memory images are kept only when asked
    kept = ProcessedImages(processor, keep_in_memory_images=True)
    assert kept(picture) is kept(picture)
    with pytest.raises(ImageLoadError):
        pixels(images / "missing.jpg")
