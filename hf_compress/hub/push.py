"""Push an hf_compress artifact folder (model, adapter, heads, ...) to the Hugging Face Hub.

Uploads go through ``huggingface_hub``'s own path (``HfApi.create_repo`` + ``HfApi.upload_folder``), so
authentication, Xet/LFS handling, retries and pull requests behave exactly as with any other Hub upload.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi

from .. import __version__
from ..utils import get_logger
from .model_card import CARD_FILENAME, validate_model_card


logger = get_logger(__name__)

# Mirrors huggingface_hub's DEFAULT_IGNORE_PATTERNS: such files are never uploaded, so they do not make a
# folder non-empty.
_NEVER_UPLOADED = (".git", ".cache")


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str = "Upload compressed artifact with hf_compress",
    commit_description: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    allow_missing_card: bool = False,
    ignore_patterns: Sequence[str] | None = None,
) -> CommitInfo:
    """Upload an artifact folder to a model repo on the Hub, creating the repo if needed.

    The folder must hold a ``README.md`` model card (see :func:`~hf_compress.hub.write_model_card`); it is
    validated offline before anything is sent. Pass ``allow_missing_card=True`` to upload without one.

    Args:
        folder: The saved artifact (e.g. after ``save_pretrained``).
        repo_id: ``"namespace/name"`` (a bare ``"name"`` goes to the token owner's namespace).
        token: Hub token; defaults to the logged-in one (``HF_TOKEN`` or ``hf auth login``).
        private: Visibility for a newly created repo (ignored if the repo exists).
        commit_message: Summary of the commit.
        commit_description: Longer commit (or pull request) description.
        create_pr: Open a pull request against ``main`` instead of committing to it.
        revision: Branch to commit to (created from ``main`` if missing), or an existing ``refs/pr/N``.
            Cannot be combined with ``create_pr``.
        allow_missing_card: Upload even without a ``README.md``.
        ignore_patterns: Extra glob patterns of files not to upload.

    Returns:
        The ``huggingface_hub.CommitInfo``: a ``str`` equal to the commit URL, with ``oid`` and (for
        ``create_pr``) ``pr_url`` attributes.

    Example:
        >>> write_model_card("out/tiny-wanda", card)  # doctest: +SKIP
        >>> push_to_hub("out/tiny-wanda", "me/tiny-wanda")  # doctest: +SKIP
        'https://huggingface.co/me/tiny-wanda/commit/0a1b2c...'
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(
            f"Cannot push {folder}: it does not exist or is not a directory. Save the artifact there first "
            "(e.g. `model.save_pretrained(folder)`)."
        )
    files = [
        path
        for path in folder.rglob("*")
        if path.is_file() and not set(path.relative_to(folder).parts[:-1]) & set(_NEVER_UPLOADED)
    ]
    if not files:
        raise ValueError(f"Cannot push {folder}: the folder is empty. Save the artifact there first.")
    card_path = folder / CARD_FILENAME
    if card_path.is_file():
        try:
            validate_model_card(card_path)
        except ValueError as err:
            raise ValueError(f"The model card {card_path} is invalid, fix it before pushing: {err}") from err
    elif not allow_missing_card:
        raise ValueError(
            f"Cannot push {folder}: it has no {CARD_FILENAME} model card. Write one with "
            "`hf_compress.hub.write_model_card(folder, hf_compress.hub.build_model_card(...))`, "
            "or pass `allow_missing_card=True`."
        )
    if create_pr and revision is not None:
        raise ValueError("`create_pr=True` opens a pull request against `main`; do not also pass `revision`.")

    api = HfApi(token=token, library_name="hf_compress", library_version=__version__)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = repo_url.repo_id  # the full "namespace/name", even if a bare name was given
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)

    logger.info("Uploading %d file(s) from %s to %s", len(files), folder, repo_id)
    commit = api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
    )
    if commit.pr_url:
        logger.info("Opened pull request %s", commit.pr_url)
    logger.info("Pushed %s to %s: %s", folder, repo_id, commit.commit_url)
    return commit
