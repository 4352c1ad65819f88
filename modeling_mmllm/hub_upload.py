"""Uploading a saved folder to the Hub, sub-folders included: the one uploader of the package.

transformers' own upload takes the top level of a folder (and one level of sub-folders), which a diffusers
pipeline saved beside the weights (`modality_generator/unet/...`) exceeds; this one takes every file, or only those
a save wrote or changed.
"""

import os

from transformers.utils import logging

logger = logging.get_logger(__name__)


def file_times(folder) -> dict[str, float]:
    """`{path relative to folder: modification time}` of every file under `folder`."""
    return {
        os.path.relpath(os.path.join(root, name), folder): os.path.getmtime(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    }


def upload_folder_to_hub(
    folder,
    repo_id: str | None = None,
    changed_since: dict[str, float] | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token=None,
    private: bool | None = None,
) -> str:
    """Create `repo_id` if needed (default: the folder's name) and upload `folder`: every file, or with
    `changed_since` (a `file_times` snapshot) those written or changed after it. Returns the repo id."""
    from huggingface_hub import HfApi

    patterns = None
    if changed_since is not None:
        patterns = [
            path.replace(os.sep, "/")
            for path, time in file_times(folder).items()
            if path not in changed_since or time > changed_since[path]
        ]
    api = HfApi(token=token)
    repo_id = api.create_repo(
        repo_id or os.path.basename(os.path.abspath(folder)), private=private, exist_ok=True
    ).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or "Upload model",
        create_pr=create_pr,
        allow_patterns=patterns,
    )
    logger.info(f"uploaded {folder} to https://huggingface.co/{repo_id}")
    return repo_id


__all__ = ["file_times", "upload_folder_to_hub"]
