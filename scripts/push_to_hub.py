"""Push a saved folder (encoder checkpoint, VLM, LoRA adapter) to the Hugging Face Hub as is.

    python scripts/push_to_hub.py ./vit-b16 --repo-id my-user/vit-b16 [--private] [--revision BRANCH] [--create-pr]

Log in first with `hf auth login`, or set HF_TOKEN to a write token.
"""

from __future__ import annotations

import argparse
import logging

from vlm_vision.export.hub import push_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder written by save_pretrained / create_checkpoint / the training script")
    parser.add_argument("--repo-id", required=True, help="OWNER/NAME of the model repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        commit = push_folder(
            args.folder,
            args.repo_id,
            commit_message=args.commit_message,
            private=args.private or None,
            revision=args.revision,
            create_pr=args.create_pr,
        )
    except ValueError as error:
        parser.error(str(error))
    print(commit.pr_url or commit.commit_url)


if __name__ == "__main__":
    main()
