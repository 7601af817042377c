"""Push an hf_compress artifact folder (model, adapter, heads, ...) to the Hugging Face Hub, safely.

Uploads go through ``huggingface_hub``'s own path (``HfApi.create_repo`` + ``HfApi.upload_folder``), so
authentication, Xet/LFS handling, retries and pull requests behave exactly as with any other Hub upload. What
is uploaded is decided, and checked, before anything is sent (the repo is not even created otherwise):

- **An allow-list**: only files matching :data:`DEFAULT_ALLOW_PATTERNS` (safetensors weights, JSON configs,
  ``README.md``, ``recipe.yaml``, tokenizer files, GGUF files, ``custom_generate/``) are uploaded;
  ``allow_patterns=`` replaces it (``[*DEFAULT_ALLOW_PATTERNS, "LICENSE"]`` extends it).
- **Training leftovers** (``checkpoint-*/``, ``runs/``, ``wandb/``, ``__pycache__/``) are never uploaded, nor
  what the Hub reserves (``.git/``, ``.cache/``).
- **Refused unless the caller opts in**: pickles (``*.pt``, ``*.pth``, ``*.bin``, ``*.pkl``, ``*.pickle``,
  ``*.ckpt``, ...; they run code when loaded) need ``allow_pickles=True``, and dotfiles or anything in a
  dot-folder (``.env``, ``.git-credentials``) need ``allow_dotfiles=True`` *and* an allow pattern naming them.
  A pickle that is the only weight file is an error; other skipped files are listed in one warning.
- **No local path leaks**: text files (and safetensors headers) that would be uploaded are scanned for
  absolute paths of this machine (the folder itself, the home directory, the working directory, the Hugging
  Face caches, existing files under the temporary directory); one found is an error naming the file.
- **The cards name this repo**: a model card to upload (``README.md``, or a nested artifact's) that was built
  for another Hub repo (``compression.repo_id``, e.g. a recipe run with ``--repo-id me/a`` pushed to ``me/b``:
  its loading code would load ``me/a``) is an error saying to rebuild the folder for the target repo
  (:func:`~.model_card.card_built_for_other_repo`, the check ``publish`` makes). Cards that name their folder
  or a placeholder go anywhere.

The exact list of uploaded files is logged at INFO and passed to ``upload_folder`` as literal patterns, so
exactly those files are sent; :func:`plan_push` returns the same decision without uploading anything.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
import re
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, constants
from huggingface_hub.errors import RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects
from .._compat import hub_default_ignore_patterns

from .. import __version__
from ..utils import get_logger
from ..utils.processes import main_process_only
from .model_card import CARD_FILENAME, card_built_for_other_repo, validate_model_card


logger = get_logger(__name__)

__all__ = [
    "DEFAULT_ALLOW_PATTERNS",
    "PICKLE_PATTERNS",
    "SKIPPED_FOLDERS",
    "PushPlan",
    "check_cards_name_repo",
    "find_local_paths",
    "local_paths_in",
    "plan_push",
    "push_to_hub",
]

LOADED_AT_ROOT: tuple[str, ...] = (
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth",
    "config.json", "generation_config.json", "adapter_config.json", "experts_config.json",
)
"""Root files that ``from_pretrained`` or PEFT read in place of, or beside, another version's (stale when a new
version of an artifact lacks them)."""
_ARTIFACT_FOLDERS = ("custom_generate", "heads")  # folders hf_compress writes whole

# Tokenizer files that are not JSON; listed at the root and one folder down (e.g. a draft model's folder).
_TOKENIZER_FILES = (
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "merges.txt", "vocab.txt", "*.tiktoken",
    "*.jinja",  # chat_template.jinja, additional_chat_templates/*.jinja
)
#: Glob patterns (``fnmatch`` on the path relative to the folder, ``*`` crossing ``/``, as in
#: ``huggingface_hub``) of the files :func:`push_to_hub` uploads by default.
DEFAULT_ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",  # weights (and *.safetensors.index.json through *.json)
    "*.json",  # config, generation config, tokenizer, adapter and quantization configs
    "*.gguf",  # GGUF: no code on load, like safetensors
    "README.md",  # the model card
    "recipe.yaml",  # a recipe folder's steps and settings (data only: hf_compress reads it with yaml.safe_load)
    *_TOKENIZER_FILES,
    *(f"*/{name}" for name in _TOKENIZER_FILES if not name.startswith("*")),
    "*/README.md",  # the cards of nested artifacts (an expert adapter, a recipe's drafting heads)
    # A custom_generate/ folder at the top or inside a nested artifact (a recipe's heads/custom_generate/).
    *(f"{where}custom_generate/{name}" for where in ("", "*/") for name in ("*.py", "*.json", "requirements.txt",
                                                                          "README.md")),
)
#: Pickle-based formats: loading one can run arbitrary code. Refused unless ``allow_pickles=True``.
PICKLE_PATTERNS: tuple[str, ...] = (
    "*.pt", "*.pth", "*.bin", "*.pkl", "*.pickle", "*.ckpt", "*.joblib", "*.dill",
)
#: Folders of training runs (Trainer checkpoints, TensorBoard and W&B logs, bytecode): never uploaded.
SKIPPED_FOLDERS: tuple[str, ...] = ("checkpoint-*", "runs", "wandb", "__pycache__")
# Folders the Hub refuses to hold (huggingface_hub raises mid-upload on them): never uploaded.
_RESERVED_FOLDERS = (".git", ".cache")
# Pickles a Trainer writes next to the model: skipped with a warning, never taken for the model's weights.
_TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "training_args.bin")
_WEIGHT_PATTERNS = ("*.safetensors", "*.gguf")
# Files read as text for the local-path scan (safetensors headers are scanned too).
_TEXT_SUFFIXES = {
    ".json", ".md", ".py", ".txt", ".jinja", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".csv", ".tsv", ".html",
}
# Top-level system folders: a path under them (``/usr/bin/env``) says nothing about the uploader.
_SYSTEM_FOLDERS = {"/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/opt", "/var", "/dev", "/proc", "/sys", "/srv"}
# A path of 2+ parts under any root but the system's, not inside a URL or another path (flagged if it exists).
_OTHER_ROOTS = re.compile(
    r"(?<![\w.~:/-])/(?!(?:" + "|".join(f[1:] for f in sorted(_SYSTEM_FOLDERS)) + r")(?![\w.-]))[\w.-]+"
    r"(?:/[^\s\"'<>|*?\\,;()\[\]{}`]+)+")
_MAX_SAFETENSORS_HEADER = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class PushPlan:
    """What :func:`push_to_hub` uploads from a folder, and what it leaves out (with the reason).

    Attributes:
        folder: The folder (absolute).
        files: Paths (relative, ``/``-separated, sorted) that are uploaded, exactly.
        skipped: ``{relative path: reason}`` for every other file in the folder.
        allowed, ignored, allow_pickles, allow_dotfiles: The rules the choice was made with; a remote file
            they would upload that ``files`` lacks is stale (:meth:`stale_remote_files`).
    """

    folder: Path
    files: tuple[str, ...]
    skipped: dict[str, str]
    allowed: tuple[str, ...] = DEFAULT_ALLOW_PATTERNS
    ignored: tuple[str, ...] = ()
    allow_pickles: bool = False
    allow_dotfiles: bool = False

    def stale_remote_files(self, remote: Sequence[str]) -> list[str]:
        """The files of ``remote`` (a repo's paths) that an earlier version left and this one would be read with.

        An earlier ``model.safetensors`` left beside this version's shards loads instead of them; an earlier
        ``custom_generate/generate.py`` runs for a version without a strategy. Stale: a file this push could
        upload that the folder no longer has, either at the root and of a kind loaders read there
        (:data:`LOADED_AT_ROOT`), or inside a folder this push writes (or hf_compress writes whole:
        ``custom_generate/``, ``heads/``). Everything else stays: ``.gitattributes``, a ``LICENSE``, a GGUF or
        ONNX export or an evaluation file added with other tools.
        """
        folders = {path.split("/", 1)[0] for path in self.files if "/" in path} | set(_ARTIFACT_FOLDERS)
        stale = []
        for path in remote:
            if path in self.files or path == ".gitattributes":
                continue
            if _skip_reason(path, self.allowed, self.ignored, self.allow_pickles, self.allow_dotfiles) is not None:
                continue
            top, _, rest = path.partition("/")
            if (rest and top in folders) or (not rest and _matches(path, LOADED_AT_ROOT, basename=True)):
                stale.append(path)
        return sorted(stale)

    def skipped_summary(self) -> str:
        """The skipped files in one line, a folder of several skipped files shown once with its count."""
        groups: dict[tuple[str, str], list[str]] = {}
        for path, reason in sorted(self.skipped.items()):
            top = path.split("/", 1)[0] + "/" if "/" in path else path
            groups.setdefault((top, reason), []).append(path)
        parts = []
        for (top, reason), paths in groups.items():
            shown = paths[0] if len(paths) == 1 else f"{top} ({len(paths)} files)"
            parts.append(f"{shown} [{reason}]")
        return ", ".join(parts)


def plan_push(
    folder: str | os.PathLike,
    *,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
    allow_pickles: bool = False,
    allow_dotfiles: bool = False,
    allow_local_paths: bool = False,
) -> PushPlan:
    """Decide which files of ``folder`` :func:`push_to_hub` uploads; nothing is sent.

    Raises ``ValueError`` when the push must not happen: no folder, nothing to upload, weights stored only as
    pickles (without ``allow_pickles=True``), or a file to upload holding an absolute path of this machine
    (without ``allow_local_paths=True``). The arguments are :func:`push_to_hub`'s.

    Example:
        >>> plan = plan_push("out/tiny-wanda")  # doctest: +SKIP
        >>> plan.files, plan.skipped  # doctest: +SKIP
        (('README.md', 'config.json', 'model.safetensors'), {'.env': 'dotfile (allow_dotfiles=True)', ...})
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(
            f"Cannot push {folder}: it does not exist or is not a directory. Save the artifact there first "
            "(e.g. `model.save_pretrained(folder)`)."
        )
    given, folder = folder, folder.expanduser().resolve()  # as upload_folder lists it
    for name, value in (("allow_patterns", allow_patterns), ("ignore_patterns", ignore_patterns)):
        if isinstance(value, str) or (value is not None and not all(isinstance(p, str) and p for p in value)):
            raise TypeError(f"{name} must be a list of glob patterns (non-empty strings); got {value!r}.")
    allowed = list(DEFAULT_ALLOW_PATTERNS if allow_patterns is None else allow_patterns)
    if allow_pickles:
        allowed += PICKLE_PATTERNS
    ignored = list(ignore_patterns or ())

    files, skipped = [], {}
    for path in sorted(folder.glob("**/*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder).as_posix()
        reason = _skip_reason(relative, allowed, ignored, allow_pickles, allow_dotfiles)
        if reason is None:
            files.append(relative)
        else:
            skipped[relative] = reason
    if not files:
        detail = f" (skipped: {PushPlan(folder, (), skipped).skipped_summary()})" if skipped else ""
        raise ValueError(
            f"Cannot push {folder}: the folder is empty of uploadable files{detail}. Save the artifact there first."
        )
    pickles = [p for p, r in skipped.items() if r.startswith("pickle") and not _matches(p, _TRAINING_STATE, basename=True)]
    if pickles and not any(_matches(p, _WEIGHT_PATTERNS) for p in files):
        raise ValueError(
            f"Cannot push {folder}: its only weights are pickle files ({', '.join(pickles)}), which run code when "
            "loaded; save them as safetensors (`model.save_pretrained(folder)`) or pass `allow_pickles=True`."
        )
    # upload_folder receives the list as patterns; make sure they select exactly this list, nothing more.
    everything = [p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file()]
    selected = set(filter_repo_objects(everything, allow_patterns=_literal_patterns(files), ignore_patterns=hub_default_ignore_patterns()))
    if selected != set(files):
        raise ValueError(
            f"Cannot push {folder}: file names that upload_folder would read differently: "
            f"{sorted(selected ^ set(files))}. Rename them."
        )
    if not allow_local_paths:
        leaks = find_local_paths(given, files)  # the path as given and resolved (through symlinks) both count
        if leaks:
            shown = "; ".join(f"{file} holds {path!r}" for file, path in leaks[:5])
            more = f" (and {len(leaks) - 5} more)" if len(leaks) > 5 else ""
            raise ValueError(
                f"Cannot push {folder}: files would publish absolute paths of this machine: {shown}{more}. Refer to "
                "Hub repo ids or relative paths instead (re-save after pushing what they point to), or pass "
                "`allow_local_paths=True` if these paths are meant to be public."
            )
    return PushPlan(folder, tuple(files), skipped, tuple(allowed), tuple(ignored), allow_pickles, allow_dotfiles)


@main_process_only()
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
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
    allow_pickles: bool = False,
    allow_dotfiles: bool = False,
    allow_local_paths: bool = False,
    delete_stale: bool = True,
) -> CommitInfo:
    """Upload the allow-listed files of an artifact folder to a model repo, creating the repo if needed.

    Every check runs before the repo is created or anything is sent: the ``README.md`` model card (see
    :func:`~hf_compress.hub.write_model_card`) is validated offline, the files to upload are chosen (see
    :func:`plan_push` and the module docstring: an allow-list; no training leftovers; no pickles or dotfiles
    unless opted in) and scanned for absolute local paths, and no card to upload may have been built for
    another repo than ``repo_id`` (:func:`check_cards_name_repo`). The exact file list is logged at INFO and
    uploaded, skipped files are named in one warning.

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
        allow_patterns: Glob patterns of the files to upload, replacing :data:`DEFAULT_ALLOW_PATTERNS`
            (``fnmatch`` on the relative path, ``*`` crossing folders, as in ``huggingface_hub``). To extend
            the default: ``[*DEFAULT_ALLOW_PATTERNS, "LICENSE"]``.
        ignore_patterns: Extra glob patterns of files not to upload (training-run folders, ``.git/`` and
            ``.cache/`` are never uploaded).
        allow_pickles: Also upload pickle files (:data:`PICKLE_PATTERNS`: ``*.bin``, ``*.pt``, ...).
        allow_dotfiles: Let dotfiles and files in dot-folders through; they must still match
            ``allow_patterns`` (``.env`` is never in the default list).
        allow_local_paths: Upload files even if they hold absolute paths of this machine.
        delete_stale: In the same commit, delete the repo's files of an earlier version that loaders would read
            with this one (:meth:`PushPlan.stale_remote_files`: root weights and configs, files in the folders this
            push writes), so the repo never mixes two versions: an earlier ``model.safetensors`` beside new shards
            would load instead of them. Other files (a ``LICENSE``, a GGUF export) stay. ``False`` only adds and
            overwrites.

    Returns:
        The ``huggingface_hub.CommitInfo``: a ``str`` equal to the commit URL, with ``oid`` and (for
        ``create_pr``) ``pr_url`` attributes.

    Example:
        >>> write_model_card("out/tiny-wanda", card)  # doctest: +SKIP
        >>> push_to_hub("out/tiny-wanda", "me/tiny-wanda")  # doctest: +SKIP
        'https://huggingface.co/me/tiny-wanda/commit/0a1b2c...'
        >>> # a legacy checkpoint whose weights are pytorch_model.bin, and its LICENSE file:
        >>> push_to_hub("out/legacy", "me/legacy", allow_pickles=True,
        ...             allow_patterns=[*DEFAULT_ALLOW_PATTERNS, "LICENSE"])  # doctest: +SKIP
    """
    if create_pr and revision is not None:
        raise ValueError("`create_pr=True` opens a pull request against `main`; do not also pass `revision`.")
    plan = plan_push(
        folder, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns, allow_pickles=allow_pickles,
        allow_dotfiles=allow_dotfiles, allow_local_paths=allow_local_paths,
    )
    folder = plan.folder
    card_path = folder / CARD_FILENAME
    if CARD_FILENAME in plan.files:
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
    check_cards_name_repo(plan, repo_id)
    if plan.skipped:
        logger.warning("Not uploading %d file(s) of %s: %s", len(plan.skipped), folder, plan.skipped_summary())

    api = HfApi(token=token, library_name="hf_compress", library_version=__version__)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if "/" not in repo_id:  # a bare name: its owner is known now (the token's), still before any upload
        check_cards_name_repo(plan, repo_url.repo_id)
    repo_id = repo_url.repo_id  # the full "namespace/name", even if a bare name was given
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)

    logger.info("Uploading %d file(s) from %s to %s: %s", len(plan.files), folder, repo_id, ", ".join(plan.files))
    stale: list[str] = []
    if delete_stale:
        base = "main" if create_pr or revision is None else revision
        try:
            stale = plan.stale_remote_files(api.list_repo_files(repo_id, revision=base, repo_type="model"))
        except RevisionNotFoundError:  # nothing to delete on a revision that does not exist yet
            stale = []
        if stale:
            logger.warning("Deleting %d file(s) of an earlier version from %s (delete_stale=False keeps them): %s",
                           len(stale), repo_id, ", ".join(stale))
    commit = api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        allow_patterns=_literal_patterns(plan.files),  # exactly the planned files (checked in plan_push)
        delete_patterns=_literal_patterns(stale) or None,
    )
    if commit.pr_url:
        logger.info("Opened pull request %s", commit.pr_url)
    logger.info("Pushed %s to %s: %s", folder, repo_id, commit.commit_url)
    return commit


def check_cards_name_repo(plan: PushPlan, repo_id: str) -> None:
    """Refuse (``ValueError``) to push ``plan`` to ``repo_id`` when a model card it uploads (``README.md`` or a
    nested artifact's ``*/README.md``) was built for another Hub repo (:func:`card_built_for_other_repo`): the
    card's loading code would load that repo, not this one.

    Example:
        >>> check_cards_name_repo(plan_push("out/recipe"), "me/b")  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        ValueError: Cannot push .../out/recipe to me/b: its model card README.md was built for the Hub repo me/a ...
    """
    for path in plan.files:
        if path.rsplit("/", 1)[-1] != CARD_FILENAME:
            continue
        try:
            other = card_built_for_other_repo(plan.folder / path, repo_id)
        except (OSError, ValueError):  # a nested README.md that is no model card (the root one is validated)
            continue
        if other:
            raise ValueError(
                f"Cannot push {plan.folder} to {repo_id}: its model card {path} was built for the Hub repo {other}: "
                f"its loading code loads {other}, so on {repo_id} the card would load another repo. Rebuild the "
                f"folder for {repo_id} (a recipe: `hf-compress recipe run RECIPE --save-dir DIR --repo-id {repo_id}` "
                f"or run(..., repo_id={repo_id!r}); another artifact: its save_pretrained(..., repo_id={repo_id!r})), "
                f"or push it to {other}. Nothing was pushed."
            )


# ---------------------------------------------------------------------------------------------- selection


def _skip_reason(
    path: str, allowed: Sequence[str], ignored: Sequence[str], allow_pickles: bool, allow_dotfiles: bool
) -> str | None:
    """Why ``path`` (relative, ``/``-separated) is not uploaded, or ``None`` if it is."""
    parts = path.split("/")
    folders = parts[:-1]
    if any(part in _RESERVED_FOLDERS for part in parts):
        return "reserved by the Hub"
    if any(fnmatch.fnmatchcase(part, pattern) for part in folders for pattern in SKIPPED_FOLDERS):
        return "training-run folder"
    if _matches(path, ignored):
        return "ignore_patterns"
    if not allow_dotfiles and any(part.startswith(".") for part in parts):
        return "dotfile (allow_dotfiles=True)"
    if not allow_pickles and _matches(path, PICKLE_PATTERNS):
        return "pickle (allow_pickles=True)"
    if not _matches(path, allowed):
        return "not in allow_patterns"
    return None


def _matches(path: str, patterns: Sequence[str], *, basename: bool = False) -> bool:
    name = path.rsplit("/", 1)[-1] if basename else path
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _literal_patterns(paths: Sequence[str]) -> list[str]:
    """Patterns that each match one path literally (``[``, ``*``, ``?`` escaped)."""
    return [glob.escape(path) for path in paths]


# ---------------------------------------------------------------------------------------------- local paths


def find_local_paths(folder: str | os.PathLike, files: Sequence[str]) -> list[tuple[str, str]]:
    """``(file, path)`` for each absolute path of this machine found in the text ``files`` of ``folder``.

    Looked for: the folder itself, the home and working directories and the Hugging Face caches (any mention
    of them or of anything under them) and, under the temporary directory or any other root outside the
    system's (``/data/models/x``, ``/mnt/...``: a local ``base_model`` folder), paths that exist here. JSON,
    Markdown, Python, text and template files are read, and the JSON header of safetensors files; URLs, paths
    such as ``/usr/bin/env`` and vocabulary entries such as ``"/root"`` or ``"/tmp"`` are not flagged.

    Example:
        >>> find_local_paths("heads/", ["custom_generate/generate.py"])  # doctest: +SKIP
        [('custom_generate/generate.py', '/home/me/heads')]
    """
    folder = Path(folder)
    patterns = _local_path_patterns(folder)
    found: list[tuple[str, str]] = []
    for relative in files:
        text = _readable_text(folder / relative)
        if text is not None:
            found.extend((relative, path) for path in _paths_in(text, patterns))
    return found


def local_paths_in(text: str, folder: str | os.PathLike) -> list[str]:
    """The absolute paths of this machine in ``text`` that :func:`find_local_paths` finds in a file of ``folder``
    (the artifact's folder, which need not exist yet): text that :func:`plan_push` would refuse to upload.

    Example:
        >>> local_paths_in("tool: /usr/bin/env, model: org/name", "out/")
        []
    """
    return _paths_in(text, _local_path_patterns(Path(folder)))


def _paths_in(text: str, patterns: tuple[re.Pattern | None, re.Pattern | None, re.Pattern | None]) -> list[str]:
    mentioned, beneath, existing = patterns
    seen = set()
    for pattern, must_exist in ((mentioned, False), (beneath, False), (existing, True), (_OTHER_ROOTS, True)):
        for match in pattern.finditer(text) if pattern is not None else ():
            path = match.group(0).rstrip(".:")
            if not must_exist or os.path.lexists(path):
                seen.add(path)
    return sorted(seen)


def _local_path_patterns(folder: Path) -> tuple[re.Pattern | None, re.Pattern | None, re.Pattern | None]:
    """Three regexes: any mention of a deep personal root (3+ path parts: ``/home/me``, the folder, the
    caches); a path *beneath* a shallow personal root (``/root/x``, not the bare ``/root``, a plausible
    vocabulary entry); a path beneath a shallow temporary root (``/tmp/x``: flagged only if it exists here)."""
    personal = [folder, Path.home(), Path(constants.HF_HOME), Path(constants.HF_HUB_CACHE)]
    for name in ("HF_MODULES_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
        if os.environ.get(name):
            personal.append(Path(os.environ[name]))
    try:
        cwd = Path.cwd()
    except OSError:  # the working directory was deleted
        cwd = None
    if cwd is not None and len(cwd.parts) >= 3:  # a shallow working directory (/usr) would flag system paths
        personal.append(cwd)
    temporary = [Path(tempfile.gettempdir())]

    def variants(paths):
        for path in paths:
            path = path.expanduser()
            yield from {path.absolute(), path.resolve()}

    deep, shallow_personal, shallow_temporary = set(), set(), set()
    for root in variants(personal):
        if len(root.parts) >= 3:
            deep.add(root)
        elif len(root.parts) == 2 and root.as_posix() not in _SYSTEM_FOLDERS:
            shallow_personal.add(root)
    for root in variants(temporary):
        (deep if len(root.parts) >= 3 else shallow_temporary).add(root)
    shallow_temporary -= shallow_personal
    # Not after a word character, dot, tilde or dash: "/tmp" inside "https://host/tmp/x" or "/var/tmp" is not
    # a mention of the root /tmp.
    before = r"(?<![\w.~-])"
    below = r"/[^\s\"'<>|*?\\,;()\[\]{}`]+"

    def alternatives(roots):
        texts = sorted({text for root in roots for text in _spellings(root)}, key=len, reverse=True)
        return "(?:" + "|".join(map(re.escape, texts)) + ")" if texts else None

    deep_re, personal_re, temporary_re = map(alternatives, (deep, shallow_personal, shallow_temporary))
    return (
        re.compile(before + deep_re + r"(?![\w-]|\.[\w-])" + f"(?:{below})?") if deep_re else None,
        re.compile(before + personal_re + below) if personal_re else None,
        re.compile(before + temporary_re + below) if temporary_re else None,
    )


def _spellings(root: Path) -> set[str]:
    """How a path appears in a file: as is, ``/``-separated, and JSON-escaped (Windows backslashes doubled)."""
    text = str(root)
    return {text, root.as_posix(), json.dumps(text)[1:-1]}


def _readable_text(path: Path) -> str | None:
    """The file's text for the scan (a safetensors file's JSON header), or ``None`` for other binaries."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            with open(path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    return None
                (size,) = struct.unpack("<Q", prefix)
                if size > _MAX_SAFETENSORS_HEADER:
                    return None
                return handle.read(size).decode("utf-8", errors="replace")
        if suffix in _TEXT_SUFFIXES:
            return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return None
