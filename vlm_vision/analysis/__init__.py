"""What a trained encoder has learned: `measures` (Figure 7 of the ViT paper and attention rollout, pure tensor
functions) and `plots` (the pictures, with matplotlib, and `write_analysis`)."""

from .measures import (
    attention_rollout,
    attention_rollout_map,
    mean_attention_distance,
    patch_embedding_principal_components,
    patch_grid_coordinates,
    position_embedding_similarity,
)
from .plots import write_analysis

__all__ = [
    "attention_rollout",
    "attention_rollout_map",
    "mean_attention_distance",
    "patch_embedding_principal_components",
    "patch_grid_coordinates",
    "position_embedding_similarity",
    "write_analysis",
]
