"""Writing what a run produces: `folders` (the one atomic folder save), `model_card` (every model card),
`encoder_folder` (encoder checkpoint folders for a preset, and their CLI) and `hub` (pushing a saved folder)."""

from .folders import check_out_dir, replace_directory_atomically, save_folder_atomically
from .model_card import write_vlm_card

__all__ = ["check_out_dir", "replace_directory_atomically", "save_folder_atomically", "write_vlm_card"]
