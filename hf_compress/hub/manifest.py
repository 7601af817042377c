"""The manifest of a set of Hub-ready artifacts: what each folder holds, how it was made, what was measured.

``manifest.json`` sits next to the artifact folders (``scripts/build_artifacts.py`` writes it, ``hf-compress
publish`` reads it). Per artifact it records the repo name, the Hub namespace its card was written for (the card's
loading snippet names ``namespace/name``; ``None``: built without one, the card loads the folder from disk), its
kind (a model folder, a ``custom_generate`` strategy folder, a PEFT adapter or a router), the base model (and,
as its card states it, where the base weights really came from when they are not that Hub checkpoint), the
recipe, every measured metric with where it came from, the build time, and every file that would be uploaded
with its sha256 and size. Paths are relative (the folder to the manifest, a file to its folder), so a manifest
records nothing about this machine and stays valid when the whole set is moved.

:func:`verify_manifest` re-reads every file: a missing, changed or unlisted file is an error naming it, so
nothing is published that differs from what was built and measured.

Example:
    >>> entry = describe_artifact("artifacts/smollm2-135m-sds24", name="smollm2-135m-sds24", kind="model",
    ...                           base_model="HuggingFaceTB/SmolLM2-135M-Instruct", recipe={"method": "sds"},
    ...                           metrics=[Measurement(record, "recipe: final evaluation")])  # doctest: +SKIP
    >>> build_manifest([entry], "artifacts/manifest.json")  # doctest: +SKIP
    >>> verify_manifest("artifacts/manifest.json")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..evaluation.results import MetricRecord
from ..utils import atomic_file, get_logger


logger = get_logger(__name__)

__all__ = [
    "repo_id_in",
    "ARTIFACT_KINDS",
    "MANIFEST_FILENAME",
    "MANIFEST_SCHEMA_VERSION",
    "ArtifactEntry",
    "FileEntry",
    "Manifest",
    "ManifestError",
    "Measurement",
    "build_manifest",
    "check_names",
    "describe_artifact",
    "file_digest",
    "verify_manifest",
]

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_FILENAME = "manifest.json"
#: kind -> how a user runs it (the journey the artifact tests replay in a fresh process).
ARTIFACT_KINDS: dict[str, str] = {
    "model": "AutoModelForCausalLM.from_pretrained(repo) + generate",
    "strategy": "model.generate(custom_generate=repo, trust_remote_code=True)",
    "adapter": "PeftModel.from_pretrained(base, repo)",
    "router": "AutoModelForCausalLM.from_pretrained(repo) + generate (routed blocks)",
}
# A Hub repo name: letters, digits, '-', '_', '.'; no leading/trailing separator, at most 96 characters.
_REPO_NAME = re.compile(r"^(?![.-])[A-Za-z0-9._-]{1,96}(?<![.-])$")
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """A manifest that is malformed, or whose files do not match what it records."""


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of an artifact: its path inside the folder (``/``-separated), sha256 and size in bytes."""

    path: str
    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A measured metric and where it came from (``"recipe step 2 (quantize: dlqat)"``, ``"build: speed"``)."""

    record: MetricRecord
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, **self.record.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        data = dict(data)
        source = data.pop("source", None)
        if not isinstance(source, str) or not source:
            raise ManifestError(f"A measurement has no `source` (where it was measured): {data!r}.")
        return cls(MetricRecord.from_dict(data), source)



def repo_id_in(namespace: str, name: str) -> str:
    """``namespace/name``, checked as a Hub repo id: a ValueError naming it otherwise (the one check the build, the
    manifest and ``publish`` share).

    Example:
        >>> repo_id_in("my-org", "smollm2-135m-instruct-fly")
        'my-org/smollm2-135m-instruct-fly'
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(namespace, str) or not namespace.strip() or "/" in namespace:
        raise ValueError(f"the namespace must be a Hub user or organisation name without '/', got {namespace!r}")
    try:
        validate_repo_id(f"{namespace}/{name}")
    except HFValidationError as err:
        raise ValueError(f"{namespace}/{name} is not a valid Hub repo id ({err})") from None
    return f"{namespace}/{name}"

@dataclasses.dataclass
class ArtifactEntry:
    """One artifact of the set (see the module docstring); ``folder`` is relative to the manifest.

    ``results`` holds further measured numbers for the results table that are not model-index metrics (size in
    bytes, tokens/s, accepted length), each as ``{"value": ..., "source": ...}``.
    """

    name: str
    kind: str
    folder: str
    base_model: str | None
    recipe: dict[str, Any]
    metrics: list[Measurement]
    files: list[FileEntry]
    build_seconds: float | None = None
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    namespace: str | None = None
    """The Hub user or organisation the card was written for (its snippets load ``namespace/name``); ``None``
    for a card written without one (and for manifests older than the field)."""
    base_weights: dict[str, Any] | None = None
    """Where the base model's weights really came from when they are not the Hub checkpoint ``base_model`` names
    (a reference model's ``config.hf_compress["base_weights"]`` record: the GGUF it was de-quantized from), as the
    card states it; ``None`` for the Hub checkpoint itself (and for manifests older than the field)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _REPO_NAME.match(self.name):
            raise ManifestError(
                f"Artifact name {self.name!r} is not a valid Hub repo name (letters, digits, '-', '_', '.')."
            )
        if self.namespace is not None:
            try:
                repo_id_in(self.namespace, self.name)
            except ValueError as err:
                raise ManifestError(f"Artifact {self.name!r}: namespace {self.namespace!r}: {err}") from None
        if self.kind not in ARTIFACT_KINDS:
            raise ManifestError(f"Artifact {self.name!r}: unknown kind {self.kind!r}; use one of {sorted(ARTIFACT_KINDS)}.")
        if Path(self.folder).is_absolute() or ".." in Path(self.folder).parts:
            raise ManifestError(f"Artifact {self.name!r}: folder {self.folder!r} must be relative to the manifest.")
        if not self.files:
            raise ManifestError(f"Artifact {self.name!r} lists no files.")

    @property
    def repo_id(self) -> str | None:
        """``namespace/name``, the repo the card names; ``None`` when it was written without a namespace."""
        return None if self.namespace is None else f"{self.namespace}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "kind": self.kind,
            "folder": self.folder,
            "base_model": self.base_model,
            "base_weights": self.base_weights,
            "recipe": self.recipe,
            "metrics": [m.to_dict() for m in self.metrics],
            "results": self.results,
            "build_seconds": self.build_seconds,
            "files": [dataclasses.asdict(f) for f in self.files],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactEntry:
        try:
            return cls(
                name=data["name"], kind=data["kind"], folder=data["folder"], base_model=data.get("base_model"),
                recipe=dict(data.get("recipe") or {}),
                metrics=[Measurement.from_dict(m) for m in data.get("metrics") or []],
                files=[FileEntry(path=f["path"], sha256=f["sha256"], size=int(f["size"])) for f in data["files"]],
                build_seconds=data.get("build_seconds"), results=dict(data.get("results") or {}),
                namespace=data.get("namespace"),  # absent from manifests older than the field: None
                base_weights=data.get("base_weights"),  # likewise
            )
        except (KeyError, TypeError) as err:
            raise ManifestError(f"Malformed artifact entry {data.get('name', '?')!r}: missing or bad field {err}.") from None


@dataclasses.dataclass
class Manifest:
    """The whole set: ``artifacts`` in build order, keyed by name.

    Example:
        >>> manifest = Manifest.load("artifacts/manifest.json")  # doctest: +SKIP
        >>> [a.kind for a in manifest.artifacts.values()]  # doctest: +SKIP
        ['model', 'model', 'strategy']
    """

    artifacts: dict[str, ArtifactEntry] = dataclasses.field(default_factory=dict)
    schema_version: int = MANIFEST_SCHEMA_VERSION
    path: Path | None = dataclasses.field(default=None, compare=False)

    @property
    def root(self) -> Path:
        """The folder the artifact folders are relative to (the manifest's own folder)."""
        if self.path is None:
            raise ManifestError("This manifest was never saved or loaded, so its folders are relative to nothing.")
        return self.path.parent

    def folder_of(self, name: str) -> Path:
        return self.root / self.artifacts[name].folder

    def built_for_other_namespaces(self, names: Sequence[str], namespace: str | None) -> dict[str | None, list[str]]:
        """The artifacts among ``names`` whose cards were built for another namespace than ``namespace``, grouped by
        the one recorded (``None``: built without one); names the manifest does not hold are left out."""
        built_for: dict[str | None, list[str]] = {}
        for name in names:
            entry = self.artifacts.get(name)
            if entry is not None and entry.namespace != namespace:
                built_for.setdefault(entry.namespace, []).append(name)
        return built_for

    def add(self, entry: ArtifactEntry) -> None:
        """Add ``entry``, replacing an entry of the same name (a rebuilt artifact)."""
        self.artifacts[entry.name] = entry

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "artifacts": [a.to_dict() for a in self.artifacts.values()]}

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the manifest as JSON, atomically (a crash leaves the previous manifest whole)."""
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ManifestError("Manifest.save needs a path.")
        with atomic_file(path, encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, allow_nan=False)
            handle.write("\n")
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """Read a manifest; a missing file, bad JSON or an unknown schema version is a :class:`ManifestError`."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            path = path / MANIFEST_FILENAME
        # One model folder (its config.json, or the folder) is not a set: it is pushed on its own.
        single = " It is one model folder: push it with hf_compress.hub.push_to_hub(folder, repo_id)."
        one_model = (folder / "config.json").is_file() and not (folder / MANIFEST_FILENAME).is_file()
        if not path.is_file():
            raise ManifestError(f"No manifest at {path}; build the set first (python scripts/build_artifacts.py)."
                                + (single if one_model else ""))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ManifestError(f"{path} is not valid JSON ({err}); rebuild it with scripts/build_artifacts.py.") from None
        if not isinstance(data, dict) or not isinstance(data.get("artifacts"), list):
            raise ManifestError(f"{path} is not an hf_compress manifest (no `artifacts` list)."
                                + (single if one_model else ""))
        version = data.get("schema_version")
        if version != MANIFEST_SCHEMA_VERSION:
            raise ManifestError(
                f"{path} has schema_version {version!r}; this hf_compress reads version {MANIFEST_SCHEMA_VERSION}. "
                "Rebuild the manifest with this version."
            )
        manifest = cls(schema_version=version, path=path)
        for item in data["artifacts"]:
            if not isinstance(item, dict):
                raise ManifestError(f"{path}: an artifact entry is not a mapping: {item!r}.")
            entry = ArtifactEntry.from_dict(item)
            if entry.name in manifest.artifacts:
                raise ManifestError(f"{path}: artifact {entry.name!r} is listed twice.")
            manifest.add(entry)
        return manifest


# ---------------------------------------------------------------------------------------------- building


def file_digest(path: str | os.PathLike) -> tuple[str, int]:
    """``(sha256 hex, size)`` of a file, read in 1 MiB chunks.

    Example:
        >>> file_digest("artifacts/smollm2-135m-sds24/config.json")  # doctest: +SKIP
        ('9f86d0...', 1234)
    """
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def describe_artifact(
    folder: str | os.PathLike,
    *,
    name: str,
    kind: str,
    base_model: str | None,
    recipe: Mapping[str, Any],
    metrics: Sequence[Measurement] = (),
    build_seconds: float | None = None,
    results: Mapping[str, Any] | None = None,
    root: str | os.PathLike | None = None,
    namespace: str | None = None,
) -> ArtifactEntry:
    """An :class:`ArtifactEntry` for a finished folder: the files ``push_to_hub`` would upload, hashed.

    ``root`` is the folder the manifest will sit in (default: ``folder``'s parent); ``folder`` is recorded
    relative to it. ``namespace`` is the Hub user or organisation the folder's card names (``namespace/name``):
    ``hf-compress publish`` then refuses any other. The base weights' provenance is recorded as the folder's card
    states it (``compression.base_weights``), so the manifest and the card cannot disagree.
    """
    from .push import plan_push

    folder = Path(folder)
    root = Path(root) if root is not None else folder.parent
    plan = plan_push(folder)  # the allow-listed files, exactly what publish uploads (and its refusals)
    files = [FileEntry(path, *file_digest(folder / path)) for path in plan.files]
    recipe = json.loads(json.dumps(dict(recipe), allow_nan=False))  # plain JSON types only, fails loudly
    return ArtifactEntry(
        name=name, kind=kind, folder=os.path.relpath(folder.resolve(), root.resolve()).replace(os.sep, "/"),
        base_model=base_model, recipe=recipe, metrics=list(metrics), files=files,
        build_seconds=None if build_seconds is None else round(float(build_seconds), 1),
        results=dict(results or {}), namespace=namespace,
        base_weights=_card_base_weights(folder),
    )


def _card_base_weights(folder: Path) -> dict[str, Any] | None:
    """The ``compression.base_weights`` record of the hf_compress card in ``folder`` (``None``: no card, another
    card, or a Hub checkpoint base)."""
    from .model_card import BASE_WEIGHTS_KEY, CARD_FILENAME, COMPRESSION_METADATA_KEY, load_card

    if not (folder / CARD_FILENAME).is_file():
        return None
    block = load_card(folder).data.get(COMPRESSION_METADATA_KEY)
    record = block.get(BASE_WEIGHTS_KEY) if isinstance(block, dict) else None
    return dict(record) if isinstance(record, Mapping) else None


def build_manifest(artifacts: Iterable[ArtifactEntry], path: str | os.PathLike) -> Manifest:
    """Write a manifest of ``artifacts`` (in this order) to ``path``, atomically, and return it.

    Example:
        >>> build_manifest([entry], "artifacts/manifest.json")  # doctest: +SKIP
    """
    manifest = Manifest()
    for entry in artifacts:
        if entry.name in manifest.artifacts:
            raise ManifestError(f"Artifact {entry.name!r} is given twice.")
        manifest.add(entry)
    manifest.save(path)
    return manifest


# ---------------------------------------------------------------------------------------------- checking


def verify_manifest(path: str | os.PathLike | Manifest, names: Sequence[str] | None = None) -> Manifest:
    """Check that every listed file of every artifact (or of ``names``) is present with its sha256 and size,
    and that each folder holds no other file that a push would upload. Returns the manifest.

    Raises:
        ManifestError: naming the artifact and file that is missing, differs or is not listed.

    Example:
        >>> verify_manifest("artifacts/manifest.json")  # doctest: +SKIP
    """
    from .push import plan_push

    manifest = path if isinstance(path, Manifest) else Manifest.load(path)
    selected = check_names(manifest, names)
    for name in selected:
        entry = manifest.artifacts[name]
        folder = manifest.folder_of(name)
        if not folder.is_dir():
            raise ManifestError(f"Artifact {name!r}: its folder {folder} is missing; rebuild it (--only {name}).")
        for item in entry.files:
            file = folder / item.path
            if not file.is_file():
                raise ManifestError(f"Artifact {name!r}: file {item.path} is missing from {folder}; rebuild it.")
            sha256, size = file_digest(file)
            if size != item.size or sha256 != item.sha256:
                raise ManifestError(
                    f"Artifact {name!r}: file {item.path} does not match the manifest (size {size} vs {item.size}, "
                    f"sha256 {sha256[:12]}… vs {item.sha256[:12]}…); it changed after the build. Rebuild the "
                    f"artifact (--only {name}) instead of publishing it."
                )
        listed = {item.path for item in entry.files}
        unlisted = sorted(set(plan_push(folder).files) - listed)
        if unlisted:
            raise ManifestError(
                f"Artifact {name!r}: {', '.join(unlisted)} would be uploaded but is not in the manifest; remove "
                "it or rebuild the artifact."
            )
    return manifest


def check_names(manifest: Manifest, names: Sequence[str] | None) -> list[str]:
    """``names`` checked against the manifest (all artifacts when ``None``); an unknown name is an error."""
    if names is None:
        return list(manifest.artifacts)
    unknown = [n for n in names if n not in manifest.artifacts]
    if unknown:
        raise ManifestError(
            f"Unknown artifact(s) {', '.join(map(repr, unknown))}; the manifest lists: {', '.join(manifest.artifacts)}."
        )
    return list(dict.fromkeys(names))
