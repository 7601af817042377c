"""Publish a built artifact set (``manifest.json``) to the Hub: verify everything, then push what changed.

Nothing is sent until every selected artifact has passed every check:

1. the namespace is a valid Hub user/organisation name and every ``namespace/name`` a valid repo id, and it
   is the namespace each artifact's card was built for (``build_artifacts.py --namespace``: the card's loading
   snippet names ``namespace/name``, and the card is hashed, so publish cannot rewrite it); an artifact built
   without a namespace (its card loads the folder from disk) goes to any, with a warning;
2. every file matches the manifest (sha256 and size) and no unlisted file would be uploaded
   (:func:`~.manifest.verify_manifest`);
3. every folder has a ``README.md`` that ``huggingface_hub.ModelCard`` parses and
   :func:`~.model_card.validate_model_card` accepts, and each ``model-index`` value is one of the
   artifact's measurements in the manifest (same metric, dataset, split and value), so a card can only
   publish measured numbers, and a card names no ``owner/name`` repo of another owner than the namespace;
4. :func:`~.push.plan_push` accepts the folder (allow-list, no pickles, no local paths).

Then each artifact whose repo already holds every listed file with the same content (compared through
``HfApi.get_paths_info``: the LFS sha256 for LFS/Xet files, the git blob id for regular ones) is skipped; the
others go through :func:`~.push.push_to_hub`. Publishing an unchanged set a second time uploads nothing.

Example:
    >>> results = publish("artifacts/manifest.json", "my-org")  # doctest: +SKIP
    >>> [(r.repo_id, r.status) for r in results]  # doctest: +SKIP
    [('my-org/smollm2-135m-sds24', 'uploaded'), ...]
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from .. import __version__
from ..utils import get_logger
from ..utils.processes import main_process_only
from .manifest import ArtifactEntry, Manifest, ManifestError, check_names, repo_id_in, verify_manifest
from .model_card import CARD_FILENAME, card_built_for_other_repo, named_owners, read_metrics, validate_model_card
from .push import plan_push, push_to_hub


logger = get_logger(__name__)

__all__ = ["PublishResult", "check_namespace", "check_publishable", "publish", "remote_differences"]

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class PublishResult:
    """What :func:`publish` did with one artifact.

    Attributes:
        name: The artifact's name in the manifest.
        repo_id: ``namespace/name``.
        status: ``"uploaded"``, ``"unchanged"`` (nothing sent) or ``"planned"`` (``dry_run``).
        changed: Files that were (or, in a dry run, would be) uploaded because the repo lacks them or holds
            other content, and files of an earlier version the upload deleted; empty for an unchanged artifact. A dry run does not contact the Hub, so it lists
            every file.
        commit_url: The commit of an upload.
    """

    name: str
    repo_id: str
    status: str
    changed: tuple[str, ...] = ()
    commit_url: str | None = None


@main_process_only(default_factory=list)
def publish(
    manifest: str | os.PathLike | Manifest,
    namespace: str | None,
    *,
    names: Sequence[str] | None = None,
    private: bool | None = None,
    dry_run: bool = False,
    token: str | bool | None = None,
) -> list[PublishResult]:
    """Verify the artifacts of ``manifest`` (all, or ``names``), then push each changed one to ``namespace``.

    Args:
        manifest: ``manifest.json`` (or its folder, or a loaded :class:`~.manifest.Manifest`).
        namespace: The Hub user or organisation the repos go to (``namespace/<artifact name>``).
        names: Only these artifacts (an unknown name is an error).
        private: Visibility of repos this call creates (existing repos keep theirs).
        dry_run: Check everything and return the plan; nothing is sent, the Hub is not contacted.
        token: Hub token; defaults to the logged-in one.

    Raises:
        ValueError: no or an invalid namespace; :class:`~.manifest.ManifestError` for a bad manifest, a file
            that does not match it, a card whose numbers were not measured, or an artifact whose card was built
            for another namespace (its snippet loads ``<that namespace>/<name>``). Nothing has been pushed then.

    Example:
        >>> publish("artifacts/manifest.json", "my-org", dry_run=True)  # doctest: +SKIP
    """
    check_namespace(namespace)  # before reading anything: a forgotten namespace is the first thing to say
    manifest = check_publishable(manifest, names, namespace=namespace)
    selected = check_names(manifest, names)
    repo_ids = _repo_ids(namespace, selected)
    unnamed = [name for name in selected if manifest.artifacts[name].namespace is None]
    if unnamed:
        logger.warning(
            "%s: built without a namespace, so the card's loading snippet loads the folder from disk, not %s/<name>; "
            "rebuild with `python scripts/build_artifacts.py --namespace %s` for cards that load their repo.",
            _some(unnamed), namespace, namespace,
        )
    if dry_run:
        return [
            PublishResult(name, repo_ids[name], "planned", tuple(f.path for f in manifest.artifacts[name].files))
            for name in selected
        ]
    api = HfApi(token=token, library_name="hf_compress", library_version=__version__)
    results = []
    for name in selected:
        entry, folder, repo_id = manifest.artifacts[name], manifest.folder_of(name), repo_ids[name]
        changed = remote_differences(api, repo_id, folder, entry)
        if not changed:
            logger.info("%s: %s already holds these %d files; nothing to upload", name, repo_id, len(entry.files))
            results.append(PublishResult(name, repo_id, "unchanged"))
            continue
        logger.info("%s: uploading to %s (%d of %d files differ)", name, repo_id, len(changed), len(entry.files))
        commit = push_to_hub(
            folder, repo_id, token=token, private=private,
            commit_message=f"Upload {name} with hf_compress {__version__}",
        )
        results.append(PublishResult(name, repo_id, "uploaded", tuple(changed), str(commit)))
    return results


def check_publishable(
    manifest: str | os.PathLike | Manifest, names: Sequence[str] | None = None, *, namespace: str | None = None,
) -> Manifest:
    """Every check :func:`publish` runs before sending anything (namespace, hashes, cards, measurements, push
    plan). With ``namespace``, an artifact whose card was built for another namespace is refused first, before
    any file is hashed.

    Example:
        >>> check_publishable("artifacts/manifest.json", namespace="my-org")  # doctest: +SKIP
    """
    manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
    selected = check_names(manifest, names)
    if namespace is not None:
        _check_built_for(manifest, selected, namespace)
    manifest = verify_manifest(manifest, names)
    for name in selected:
        entry, folder = manifest.artifacts[name], manifest.folder_of(name)
        _check_card(name, folder, entry, namespace)
        try:
            plan_push(folder)
        except ValueError as err:
            raise ManifestError(f"Artifact {name!r} cannot be pushed: {err}") from None
    return manifest


def remote_differences(api: HfApi, repo_id: str, folder: str | os.PathLike, entry: ArtifactEntry) -> list[str]:
    """The files of ``entry`` that ``repo_id`` (its ``main``) lacks or holds with other content, and the repo's
    files of an earlier version that the push would delete (``PushPlan.stale_remote_files``); all of the
    entry's files when the repo does not exist.

    An LFS (or Xet) file is compared by its sha256 and size, a regular file by its git blob id and size, the
    two identities the Hub reports for a file.
    """
    paths = [item.path for item in entry.files]
    try:
        remote = {info.path: info for info in api.get_paths_info(repo_id, paths, repo_type="model")}
        stale = plan_push(folder).stale_remote_files(api.list_repo_files(repo_id, repo_type="model"))
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return paths
    changed = list(stale)
    for item in entry.files:
        info = remote.get(item.path)
        if info is None or not hasattr(info, "blob_id"):  # missing, or a folder of that name
            changed.append(item.path)
        elif info.lfs is not None:
            if info.lfs.sha256 != item.sha256 or info.lfs.size != item.size:
                changed.append(item.path)
        elif info.size != item.size or info.blob_id != _git_blob_id(Path(folder) / item.path, item.size):
            changed.append(item.path)
    return changed


# ---------------------------------------------------------------------------------------------- helpers


def check_namespace(namespace: str | None) -> None:
    """Refuse a missing or invalid Hub namespace (a user or organisation name, no ``/``) with a ValueError.

    Example:
        >>> check_namespace("my-org")
    """
    if namespace is None or (isinstance(namespace, str) and not namespace.strip()):
        raise ValueError(
            "No namespace: pass the Hub user or organisation to publish under (--namespace ORG); nothing was pushed."
        )
    try:
        repo_id_in(namespace, "repo")
    except ValueError as err:
        raise ValueError(f"--namespace {namespace!r}: {err}.") from None


def _repo_ids(namespace: str, names: Sequence[str]) -> dict[str, str]:
    try:
        return {name: repo_id_in(namespace, name) for name in names}
    except ValueError as err:
        raise ValueError(f"--namespace {namespace!r}: {err}.") from None


def _check_built_for(manifest: Manifest, names: Sequence[str], namespace: str) -> None:
    """Refuse artifacts whose cards were built for another namespace than ``namespace`` (naming what to do)."""
    # Built without a namespace: publishable anywhere (publish() warns that the cards load their folder).
    built_for = {recorded: listed for recorded, listed in manifest.built_for_other_namespaces(names, namespace).items()
                 if recorded is not None}
    if not built_for:
        return
    which = "; ".join(f"{_some(listed)} were built for namespace {recorded!r}"
                      for recorded, listed in built_for.items())
    first = next(iter(built_for))
    raise ManifestError(
        f"Cannot publish to namespace {namespace!r}: the model cards of {which} (their loading snippets load "
        f"{first}/<name>), and the cards are hashed in the manifest, so publish cannot change them. Publish with "
        f"--namespace {first}, or rebuild the set for {namespace!r} "
        f"(python scripts/build_artifacts.py --namespace {namespace} --rebuild, with the same --out and --only). "
        "Nothing was pushed."
    )


def _some(names: Sequence[str], shown: int = 4) -> str:
    """``a, b, c, d and 3 more``."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _check_card(name: str, folder: Path, entry: ArtifactEntry, namespace: str | None = None) -> None:
    card_path = folder / CARD_FILENAME
    if not card_path.is_file():
        raise ManifestError(f"Artifact {name!r} has no {CARD_FILENAME} model card; rebuild it.")
    try:
        text = card_path.read_text(encoding="utf-8-sig")
        card = ModelCard(text)  # huggingface_hub's own parser
        validate_model_card(card)
    except ValueError as err:
        raise ManifestError(f"Artifact {name!r}: the model card does not parse: {err}") from None
    owners = named_owners(text, name)
    if entry.namespace is not None and entry.namespace not in owners:
        raise ManifestError(
            f"Artifact {name!r}: the manifest records namespace {entry.namespace!r}, but the model card does not load "
            f"{entry.repo_id}; rebuild the artifact (python scripts/build_artifacts.py --only ... --namespace "
            f"{entry.namespace} --rebuild)."
        )
    expected = namespace if namespace is not None else entry.namespace
    # The check push_to_hub makes too: the repo the card was built for (recorded, or named by its loading code).
    other = card_built_for_other_repo(card, f"{expected}/{name}") if expected is not None else None
    if other:
        owner, _, other_name = other.partition("/")
        elsewhere = f"Publish with --namespace {owner}, or rebuild" if other_name == name else "Rebuild"
        raise ManifestError(
            f"Artifact {name!r}: the model card loads {other}, not {expected}/{name}; a card must name the repo it "
            f"is published to. {elsewhere} the artifact with --namespace {expected}."
        )
    measured = [m.record for m in entry.metrics]
    for record in read_metrics(card):
        if not any(_same_measurement(record, m) for m in measured):
            raise ManifestError(
                f"Artifact {name!r}: the card reports {record.metric_type} = {record.metric_value} on "
                f"{record.dataset_type!r}, which is not one of its measurements in the manifest; only measured "
                "numbers may be published. Rebuild the artifact."
            )


def _same_measurement(card, measured) -> bool:
    return (
        (card.task_type, card.dataset_type, card.dataset_split, card.metric_type, card.metric_config)
        == (measured.task_type, measured.dataset_type, measured.dataset_split, measured.metric_type,
            measured.metric_config)
        and math.isclose(float(card.metric_value), float(measured.metric_value), rel_tol=1e-9, abs_tol=0.0)
    )


def _git_blob_id(path: Path, size: int) -> str:
    """The git blob id (sha1 of ``blob <size>\\0`` + content): what the Hub reports for a regular file."""
    digest = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
