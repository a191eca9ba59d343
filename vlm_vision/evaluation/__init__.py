"""Evaluation: `metrics` (VQA accuracy with the official answer normalisation, exact match, BLEU/CIDEr) and
`generation` (batched greedy answers from a VLM on its device, scored with those metrics)."""

from .generation import METRICS, evaluate_samples, first_turn, generate_answers, reference_answer
from .metrics import (
    ARTICLES,
    CONTRACTIONS,
    MANUAL_MAP,
    PUNCTUATION,
    accuracy_by,
    caption_scores,
    exact_match,
    normalize_vqa_answer,
    tokenize_caption,
    vqa_accuracy,
)

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "MANUAL_MAP",
    "METRICS",
    "PUNCTUATION",
    "accuracy_by",
    "caption_scores",
    "evaluate_samples",
    "exact_match",
    "first_turn",
    "generate_answers",
    "normalize_vqa_answer",
    "reference_answer",
    "tokenize_caption",
    "vqa_accuracy",
]
