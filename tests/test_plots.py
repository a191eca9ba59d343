"""The Figure 7 and rollout pictures: real PNG files of the expected size, from a real model run."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.conftest import tiny_config
from vlm_vision import VisionTransformerForImageClassification
from vlm_vision.analysis.plots import (
    DPI,
    plot_attention_rollout,
    plot_mean_attention_distance,
    plot_patch_embedding_components,
    plot_position_embedding_similarity,
    position_similarity_summary,
    write_analysis,
)
from vlm_vision.export.encoder_folder import image_processor_for, save_checkpoint


def png_size(path):
    with Image.open(path) as image:
        image.load()  # decodes fully
        return image.size


def test_each_panel_is_a_png_of_its_figure_size(tmp_path):
    components = torch.rand(10, 3, 4, 4)
    path = plot_patch_embedding_components(components, torch.linspace(0.3, 0.01, 10), tmp_path / "pca.png", columns=5)
    assert png_size(path) == (5 * DPI, round((2 * 1.1 + 0.5) * DPI))
    similarity = torch.rand(3, 4, 3, 4) * 2 - 1
    assert png_size(plot_position_embedding_similarity(similarity, tmp_path / "pos.png")) == (600, 480)
    assert png_size(plot_mean_attention_distance(torch.rand(4, 3) * 10, tmp_path / "d.png", 32)) == (450, 350)
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    assert png_size(plot_attention_rollout(image, torch.rand(3, 4), tmp_path / "r.png", "x")) == (600, 320)
    with pytest.raises(ValueError, match=r"\(k, 3, P_h, P_w\)"):
        plot_patch_embedding_components(torch.rand(2, 1, 4, 4), torch.rand(2), tmp_path / "bad.png")


def test_position_similarity_summary_on_a_grid_of_smooth_embeddings():
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (20, 2)
    # embeddings whose similarity decays with grid distance: exp(-d^2) kernel features
    features = torch.exp(-(torch.cdist(centres, centres) ** 2))  # (20, 20)
    unit = torch.nn.functional.normalize(features, dim=-1)
    similarity = (unit @ unit.T).reshape(4, 5, 4, 5)
    summary = position_similarity_summary(similarity)
    assert summary["most_similar_is_neighbour"] == 1.0
    assert summary["mean_similarity_neighbours"] > summary["mean_similarity_same_row_or_column"]
    assert summary["mean_similarity_same_row_or_column"] > summary["mean_similarity_other"]


def test_write_analysis_and_the_script_on_a_saved_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformerForImageClassification(tiny_config(image_size=16, num_labels=3))
    checkpoint = save_checkpoint(model, tmp_path / "ckpt", title="tiny", summary="test")
    images = [(f"img{i}", Image.new("RGB", (24 + i, 20), (40 * i, 100, 50))) for i in range(3)]
    result = write_analysis(
        model, image_processor_for(model.config), images, tmp_path / "out", num_overlays=2, progress_bar=False
    )
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "mean_attention_distance.png",
        "patch_embedding_pca.png",
        "position_embedding_similarity.png",
        "rollout_img0.png",
        "rollout_img1.png",
    ]
    assert all(png_size(tmp_path / "out" / n)[0] > 100 for n in names)
    distances = torch.tensor(result["mean_attention_distance"])
    assert distances.shape == (3, 4) and (distances > 0).all() and (distances < 16 * 1.5).all()
    assert len(result["explained_variance"]) == 28  # min(D=32, 3*4*4=48) >= 28

    from scripts.analyze import main

    image_dir = tmp_path / "photos"
    image_dir.mkdir()
    Image.new("L", (20, 20), 90).save(image_dir / "gray.png")
    out = main([str(checkpoint), "--images", str(image_dir), "--out", str(tmp_path / "cli"), "--no-progress"])
    assert (tmp_path / "cli" / "rollout_gray.png").is_file() and out["num_images"] == 1
    assert json.loads((tmp_path / "cli" / "analysis.json").read_text())["num_images"] == 1
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        main([str(tmp_path), "--out", str(tmp_path / "x")])


def test_a_hybrid_shows_the_rgb_filters_of_its_root_convolution(tmp_path):
    from vlm_vision.analysis.plots import first_rgb_filters

    torch.manual_seed(0)
    stem = {
        "layer_type": "bottleneck", "depths": [], "hidden_sizes": [], "embedding_size": 8, "num_groups": 4,
        "global_padding": "SAME", "embedding_dynamic_padding": True, "out_features": ["stem"],
    }  # fmt: skip
    hybrid = VisionTransformerForImageClassification(tiny_config(image_size=16, num_labels=3, backbone_config=stem))
    weight, what = first_rgb_filters(hybrid.vit)
    root = hybrid.vit.get_input_embeddings().backbone.bit.embedder.convolution.weight
    assert weight.data_ptr() == root.data_ptr() and weight.shape == (8, 3, 7, 7) and "root convolution" in what
    plain = VisionTransformerForImageClassification(tiny_config(image_size=16, num_labels=3))
    weight, what = first_rgb_filters(plain.vit)
    assert torch.equal(weight, plain.vit.get_input_embeddings().projection.weight) and what == "RGB embedding filters"
    images = [("img0", Image.new("RGB", (16, 16), (200, 30, 30)))]
    result = write_analysis(hybrid, image_processor_for(hybrid.config), images, tmp_path / "out", progress_bar=False)
    assert len(result["explained_variance"]) == 8  # min(D=8 root filters, 3*7*7)
    assert png_size(tmp_path / "out" / "patch_embedding_pca.png")[0] > 100
