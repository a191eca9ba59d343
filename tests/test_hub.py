"""Pushing saved folders to the Hub, offline: the Hub client is replaced by a recorder of what would be uploaded."""

import pytest
import torch
import yaml
from huggingface_hub import CommitInfo

import vlm_vision.export.hub as hub
from scripts.push_to_hub import main
from tests.conftest import tiny_config
from tests.vlm_helpers import tiny_text_config
from vlm_vision import VisionLanguageConfig, VisionLanguageForConditionalGeneration, remote_code
from vlm_vision.export.encoder_folder import create_checkpoint


class RecordingHubApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls and reads every uploaded file's bytes."""

    instances = []

    def __init__(self, token=None):
        self.token, self.calls, self.uploaded = token, [], {}
        RecordingHubApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, kwargs))
        for operation in operations:
            with operation.as_file() as file:
                self.uploaded[operation.path_in_repo] = file.read()
        url = f"https://huggingface.co/{repo_id}/commit/0123"
        return CommitInfo(commit_url=url, commit_message="", commit_description="", oid="0123", pr_url=None)


@pytest.fixture
def recorder(monkeypatch):
    RecordingHubApi.instances = []
    monkeypatch.setattr(hub, "HfApi", RecordingHubApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return RecordingHubApi.instances


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    return create_checkpoint("vit-ti16", tmp_path_factory.mktemp("hub") / "vit-ti16", image_size=32)


def card_metadata(readme: bytes) -> dict:
    _, header, _ = readme.decode().split("---\n", 2)
    return yaml.safe_load(header)


def test_the_script_pushes_an_encoder_folder_exactly_as_saved(encoder_folder, recorder, capsys):
    argv = [str(encoder_folder), "--repo-id", "me/vit-ti16", "--private", "--revision", "exp", "--commit-message", "hi"]
    main(argv)
    (api,) = recorder
    assert api.token == "hf_test_token"
    assert [call[0] for call in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][2]["private"] is True and api.calls[1][2]["branch"] == "exp"
    commit = api.calls[2][2]
    assert (commit["commit_message"], commit["revision"], commit["create_pr"]) == ("hi", "exp", False)
    saved = sorted(p.name for p in encoder_folder.iterdir())
    assert sorted(api.uploaded) == saved
    expected = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
    assert expected | {"configuration_vit.py", "modeling_vit.py"} <= set(saved)
    for name in saved:  # byte for byte, the card included
        assert api.uploaded[name] == (encoder_folder / name).read_bytes()
    metadata = card_metadata(api.uploaded["README.md"])
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-feature-extraction"
    assert "vlm-vision" in metadata["tags"] and "vlm_vit" in metadata["tags"]
    assert capsys.readouterr().out.strip() == "https://huggingface.co/me/vit-ti16/commit/0123"


def test_a_vlm_folder_without_a_card_gets_one_in_the_same_commit(tmp_path, recorder):
    config = VisionLanguageConfig(vision_config=tiny_config(), text_config=tiny_text_config(100), image_token_id=99)
    torch.manual_seed(0)
    VisionLanguageForConditionalGeneration(config).save_pretrained(tmp_path / "vlm")
    (tmp_path / "vlm" / ".DS_Store").write_text("junk")
    saved = sorted(p.name for p in (tmp_path / "vlm").iterdir())
    hub.push_folder(tmp_path / "vlm", "me/tiny-vlm", create_pr=True)
    (api,) = recorder
    assert [call[0] for call in api.calls] == ["create_repo", "create_commit"]  # a PR needs no branch
    assert api.calls[1][2]["create_pr"] is True
    weights = {"README.md", "config.json", "generation_config.json", "model.safetensors"}
    assert sorted(api.uploaded) == sorted(weights | set(remote_code.CODE_FILES))  # the code files travel too
    metadata = card_metadata(api.uploaded["README.md"])
    assert metadata["pipeline_tag"] == "image-text-to-text" and metadata["library_name"] == "transformers"
    assert sorted(p.name for p in (tmp_path / "vlm").iterdir()) == saved  # the folder itself is untouched


@pytest.mark.parametrize(
    ("remove", "repo_id", "message"),
    [
        ("config.json", "me/model", "no config.json"),
        ("model.safetensors", "me/model", "no .safetensors weights"),
        (None, "me/bad--name", "Bad repo id"),
        (None, "no-owner", "Bad repo id"),
        (None, "me/model", "hf auth login"),
    ],
)
def test_incomplete_folders_bad_ids_and_no_token_are_refused(
    encoder_folder, tmp_path, recorder, monkeypatch, remove, repo_id, message
):
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in encoder_folder.iterdir():
        if path.name != remove:
            (folder / path.name).symlink_to(path)
    if message == "hf auth login":
        monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match=message):
        hub.push_folder(folder, repo_id)
    assert recorder == []  # nothing was sent


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]), "truncated"),
        (lambda f: (f / "model.safetensors").write_bytes(b""), "truncated or corrupt"),
        (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_m'), "not a valid shard index"),
    ],
)
def test_truncated_weights_are_not_pushed(encoder_folder, tmp_path, recorder, edit, message):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(encoder_folder, folder)
    edit(folder)
    with pytest.raises(ValueError, match=message):
        hub.push_folder(folder, "me/model")
    assert recorder == []


def test_wrong_argument_types_are_refused(encoder_folder, recorder):
    with pytest.raises(TypeError, match=r"folder must be a path"):
        hub.push_folder(3, "me/model")
    with pytest.raises(TypeError, match=r"private='yes' must be bool or NoneType"):
        hub.push_folder(encoder_folder, "me/model", private="yes")
    with pytest.raises(ValueError, match="Bad repo id"):
        hub.push_folder(encoder_folder, 3)
    assert recorder == []
