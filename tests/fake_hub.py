"""An in-memory Hugging Face Hub for tests: no network, no server, no thread of its own.

``huggingface_hub`` sends every Hub call through one shared ``httpx2.Client`` that it builds from a
replaceable factory (``huggingface_hub.utils.set_client_factory``). :class:`FakeHub` provides such a factory
whose client uses an ``httpx2.MockTransport``: each request is answered by :meth:`FakeHub.handle` from
in-memory repositories.
Whatever the endpoint (``HF_ENDPOINT`` or the default), the request never leaves the process.

Only the slice of the Hub API that hf_compress and its tests exercise is implemented, but it is implemented
the way the client libraries read it (status codes, ``X-Error-Code`` headers, ``ETag``/``X-Repo-Commit``):

- ``create_repo``, ``upload_folder``/``create_commit`` (preupload, ndjson commit, pull requests, branches),
  ``validate-yaml`` (checks the card's YAML and ``model-index`` locally);
- ``model_info``/``repo_info``/``resolve_revision``, ``list_repo_tree``/``list_repo_files``, ``paths-info``,
  ``file_exists``;
- ``HEAD``/``GET`` on ``/{repo_id}/resolve/{revision}/{path}`` (any sub-folder), which is what
  ``hf_hub_download``, ``snapshot_download``, ``from_pretrained`` and ``ModelCard.load`` use.

Every file is stored as a regular git blob: the preupload answer is ``uploadMode: "regular"`` for all files
(``huggingface_hub`` honours it whatever the size), so content arrives base64-encoded inside the commit and
neither Xet nor the LFS batch API is ever involved. A commit that still references LFS content is rejected.

Example:
    >>> hub = FakeHub()
    >>> with hub.activate():  # doctest: +SKIP
    ...     HfApi().create_repo("user/tiny")
    >>> hub.files("user/tiny")  # doctest: +SKIP
    {'.gitattributes': b'...'}

:func:`serve_fake_hub` also points the caches at a folder, leaves offline mode and sets a token (and undoes
it all); the ``fake_hub`` fixture in ``tests/conftest.py`` and ``scripts/robustness/push.py`` use it.
:meth:`FakeHub.save_state` / :meth:`FakeHub.load_state` hand the repositories to another process (a fresh
interpreter that downloads what the test published: ``tests/artifact_journey.py``).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import itertools
import json
import os
import pickle
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, unquote

import httpx2
import yaml
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import _http
from huggingface_hub.utils.sha import git_hash


FAKE_USER = "user"
FAKE_TOKEN = "hf_fake_token_for_tests"

# What the real Hub puts in a new repository's first commit.
_INITIAL_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Sub-paths that follow a repo id in /api/{type}s/{repo_id}/... URLs.
_API_ACTIONS = {
    "revision", "tree", "preupload", "commit", "paths-info", "discussions", "branch", "refs", "commits",
}
_RESOLVE_RE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+|[^/]+)/resolve/([^/]+)/(.+)$")
_PR_REF_RE = re.compile(r"^refs/pr/(\d+)$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
Request, Response = httpx2.Request, httpx2.Response


@dataclasses.dataclass
class FakeCommit:
    """One commit: the full snapshot of the repository after it (path -> bytes)."""

    oid: str
    files: dict[str, bytes]
    message: str
    parent: str | None
    date: str


@dataclasses.dataclass
class FakeRepo:
    """A repository: its commits, its refs (branches and ``refs/pr/N``) and its pull requests."""

    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    commits: dict[str, FakeCommit] = dataclasses.field(default_factory=dict)
    refs: dict[str, str] = dataclasses.field(default_factory=dict)
    discussions: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def resolve(self, revision: str) -> FakeCommit | None:
        """The commit a branch, PR ref or full commit hash points to (``None`` if unknown)."""
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if _COMMIT_RE.match(revision):
            return self.commits.get(revision)
        return None

    @property
    def head(self) -> FakeCommit:
        return self.commits[self.refs["main"]]


class _HubError(Exception):
    """Raised inside a handler to answer with an error status (and optional ``X-Error-Code``)."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code
        self.headers = headers or {}


class FakeHub:
    """An in-memory Hub answering ``huggingface_hub``'s HTTP calls in-process.

    Args:
        user: The user the fake token belongs to (namespace of repos created without one).
        token: The only token accepted for writes and for reading private repos.

    Attributes:
        repos: ``{(repo_type, repo_id): FakeRepo}``, inspect freely.
        requests: ``(method, path)`` of every request received, in order (to see what a library calls).
        unhandled: requests no route matched (answered 404); a passing test should leave this empty.

    Example:
        >>> hub = FakeHub()
        >>> hub.add_files("user/seeded", {"config.json": b"{}"})  # doctest: +SKIP
        '...40 hex...'
    """

    def __init__(self, user: str = FAKE_USER, token: str = FAKE_TOKEN) -> None:
        self.user = user
        self.token = token
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        # The upload pipeline calls from two threads at once (preupload in one, commits in another).
        self._lock = threading.RLock()
        self._counter = itertools.count()

    # ------------------------------------------------------------------ wiring into huggingface_hub

    def client_factory(self) -> httpx2.Client:
        """A client like ``huggingface_hub``'s default one, but served by this hub.

        The Hub's request hook is kept so that offline mode still refuses requests, as it would for real.
        """
        return httpx2.Client(
            transport=httpx2.MockTransport(self.handle),
            event_hooks={"request": [_http.hf_request_event_hook]},
            follow_redirects=True,
            timeout=None,
        )

    def async_client_factory(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            transport=httpx2.MockTransport(self.handle),
            event_hooks={"request": [_http.async_hf_request_event_hook]},
            follow_redirects=True,
            timeout=None,
        )

    @contextlib.contextmanager
    def activate(self) -> Iterator["FakeHub"]:
        """Route ``huggingface_hub``'s HTTP traffic to this hub inside the block, then restore the previous
        clients.

        ``set_client_factory`` closes the cached shared client, so the swap takes effect at once and is undone
        on exit (the next request then builds a fresh client from the restored factory).
        """
        previous_sync = _http._GLOBAL_CLIENT_FACTORY
        previous_async = _http._GLOBAL_ASYNC_CLIENT_FACTORY
        _http.set_client_factory(self.client_factory)
        _http.set_async_client_factory(self.async_client_factory)
        try:
            yield self
        finally:
            _http.set_client_factory(previous_sync)
            _http.set_async_client_factory(previous_async)

    # ------------------------------------------------------------------ direct access for tests

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> FakeRepo:
        """Create a repository (with the initial ``.gitattributes`` commit the real Hub makes)."""
        with self._lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            repo = FakeRepo(repo_id=repo_id, repo_type=repo_type, private=private, created_at=_now())
            self.repos[key] = repo
            self._new_commit(repo, "main", {".gitattributes": _INITIAL_GITATTRIBUTES}, "initial commit")
            return repo

    def add_files(
        self, repo_id: str, files: dict[str, bytes | str], *, repo_type: str = "model", message: str = "seed"
    ) -> str:
        """Commit ``files`` to ``main`` directly (creating the repo if needed); returns the commit hash."""
        with self._lock:
            repo = self.repos.get((repo_type, repo_id)) or self.create_repo(repo_id, repo_type=repo_type)
            snapshot = dict(repo.head.files)
            for path, data in files.items():
                snapshot[path] = data.encode() if isinstance(data, str) else data
            return self._new_commit(repo, "main", snapshot, message).oid

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repo at a revision (branch, ``refs/pr/N`` or commit hash)."""
        repo = self.repos[(repo_type, repo_id)]
        commit = repo.resolve(revision)
        if commit is None:
            raise KeyError(f"unknown revision {revision!r} of {repo_id}")
        return dict(commit.files)

    def save_state(self, path: str | os.PathLike) -> None:
        """Write the repositories to ``path``, for :meth:`load_state` in another process (e.g. a test that
        downloads in a fresh interpreter what this one published)."""
        with self._lock:
            Path(path).write_bytes(pickle.dumps((self.user, self.token, self.repos)))

    @classmethod
    def load_state(cls, path: str | os.PathLike) -> FakeHub:
        """A hub serving the repositories :meth:`save_state` wrote (a test's own file: pickle is fine here)."""
        user, token, repos = pickle.loads(Path(path).read_bytes())
        hub = cls(user=user, token=token)
        hub.repos = repos
        return hub

    # ------------------------------------------------------------------ request dispatch

    def handle(self, request: httpx2.Request) -> Response:
        """Answer one HTTP request (the ``MockTransport`` handler)."""
        raw_path = request.url.raw_path.decode("ascii").split("?", 1)[0]
        with self._lock:
            self.requests.append((request.method, request.url.path))
            try:
                return self._dispatch(request, raw_path)
            except _HubError as err:
                headers = {"X-Error-Message": err.message, **err.headers}
                if err.error_code:
                    headers["X-Error-Code"] = err.error_code
                return httpx2.Response(err.status, headers=headers, json={"error": err.message})

    def _dispatch(self, request: Request, raw_path: str) -> Response:
        method = request.method
        if raw_path == "/api/repos/create" and method == "POST":
            return self._create_repo(request)
        if raw_path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(request)
        if raw_path == "/api/whoami-v2" and method == "GET":
            self._require_token(request)
            return httpx2.Response(200, json={"type": "user", "name": self.user, "orgs": []})
        if raw_path.startswith("/api/"):
            parts = raw_path[len("/api/"):].split("/")
            if parts[0] in _REPO_TYPES and len(parts) >= 2:
                return self._repo_api(request, _REPO_TYPES[parts[0]], parts[1:])
        elif method in ("GET", "HEAD"):
            match = _RESOLVE_RE.match(raw_path)
            if match:
                repo_type = _REPO_TYPES[match[1]] if match[1] else "model"
                repo_id, revision, path = (unquote(m) for m in match.group(2, 3, 4))
                return self._resolve(request, repo_type, repo_id, revision, path)
        self.unhandled.append((method, request.url.path))
        raise _HubError(404, f"FakeHub: no route for {method} {request.url.path}")

    def _repo_api(self, request: Request, repo_type: str, parts: list[str]) -> Response:
        # Repo ids are "namespace/name" or (legacy) a single "name": the first known action word ends it.
        if len(parts) >= 2 and parts[1] not in _API_ACTIONS:
            repo_id, rest = f"{unquote(parts[0])}/{unquote(parts[1])}", parts[2:]
        else:
            repo_id, rest = unquote(parts[0]), parts[1:]
        action = rest[0] if rest else None
        revision = unquote(rest[1]) if len(rest) > 1 else None
        sub_path = "/".join(unquote(p) for p in rest[2:])
        method = request.method

        if action is None and method == "GET":
            return self._repo_info(request, repo_type, repo_id, "main")
        if action == "revision" and method == "GET" and revision:
            return self._repo_info(request, repo_type, repo_id, revision)
        if action == "tree" and method == "GET" and revision:
            return self._tree(request, repo_type, repo_id, revision, sub_path)
        if action == "paths-info" and method == "POST" and revision:
            return self._paths_info(request, repo_type, repo_id, revision)
        if action == "preupload" and method == "POST" and revision:
            return self._preupload(request, repo_type, repo_id, revision)
        if action == "commit" and method == "POST" and revision:
            return self._commit(request, repo_type, repo_id, revision)
        if action == "branch" and method == "POST" and revision:
            return self._create_branch(request, repo_type, repo_id, revision)
        if action == "discussions" and method == "POST" and revision is None:
            return self._create_discussion(request, repo_type, repo_id)
        if action == "discussions" and method == "GET" and revision and revision.isdigit():
            return self._discussion_details(request, repo_type, repo_id, int(revision))
        self.unhandled.append((method, request.url.path))
        raise _HubError(404, f"FakeHub: no route for {method} {request.url.path}")

    # ------------------------------------------------------------------ auth and lookups

    def _token_of(self, request: Request) -> str | None:
        auth = request.headers.get("authorization")
        if auth is None:
            return None
        if auth != f"Bearer {self.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")
        return self.token

    def _require_token(self, request: Request) -> None:
        if self._token_of(request) is None:
            raise _HubError(401, "You must be authenticated to do this (no token sent).")

    def _repo(self, request: Request, repo_type: str, repo_id: str, *, write: bool = False) -> FakeRepo:
        authenticated = self._token_of(request) is not None
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authenticated):
            # Like the real Hub: a private repo looks missing to anonymous users.
            raise _HubError(401 if not authenticated else 404, "Repository not found", "RepoNotFound")
        if write and not authenticated:
            raise _HubError(401, "You must be authenticated to write to a repository.")
        return repo

    def _commit_at(self, repo: FakeRepo, revision: str) -> FakeCommit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _base(self, request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc.decode('ascii')}"

    def _repo_url(self, request: Request, repo: FakeRepo) -> str:
        return f"{self._base(request)}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ------------------------------------------------------------------ repos and metadata

    def _create_repo(self, request: Request) -> Response:
        self._require_token(request)
        payload = json.loads(request.content or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if (repo_type, repo_id) in self.repos:
            # The real Hub's conflict answer carries the url too; create_repo(exist_ok=True) reads it.
            url = self._repo_url(request, self.repos[(repo_type, repo_id)])
            message = f"You already created this {repo_type} repo"
            body = {"error": message, "url": url}
            return httpx2.Response(409, headers={"X-Error-Message": message}, json=body)
        private = payload.get("visibility", "public") == "private" or bool(payload.get("private"))
        repo = self.create_repo(repo_id, repo_type=repo_type, private=private)
        url = self._repo_url(request, repo)
        return httpx2.Response(200, json={"url": url, "name": repo_id, "id": repo_id})

    def _repo_info(self, request: Request, repo_type: str, repo_id: str, revision: str) -> Response:
        repo = self._repo(request, repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        card = _card_metadata(commit.files.get("README.md"))
        tags = [*(card.get("tags") or []), *filter(None, [card.get("library_name")])]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "createdAt": repo.created_at,
            "lastModified": commit.date,
            "tags": list(dict.fromkeys(tags)),
            "siblings": [
                {"rfilename": path, "size": len(data), "blobId": git_hash(data)}
                for path, data in sorted(commit.files.items())
            ],
        }
        if card:
            info["cardData"] = card
            for key in ("library_name", "pipeline_tag", "model-index"):
                if key in card:
                    info[key] = card[key]
        return httpx2.Response(200, json=info)

    def _tree(self, request: Request, repo_type: str, repo_id: str, revision: str, sub_path: str) -> Response:
        repo = self._repo(request, repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        recursive = request.url.params.get("recursive", "false").lower() in ("1", "true")
        prefix = f"{sub_path.strip('/')}/" if sub_path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise _HubError(404, f"{sub_path} does not exist on {revision}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            relative = path[len(prefix):].split("/")
            # Folders on the way down are listed as "directory" entries.
            for depth in range(1, len(relative)):
                folder = prefix + "/".join(relative[:depth])
                entries.setdefault(folder, _folder_entry(folder))
                if not recursive:
                    break
            if recursive or len(relative) == 1:
                entries[path] = _file_entry(path, data)
        return httpx2.Response(200, json=list(entries.values()))

    def _paths_info(self, request: Request, repo_type: str, repo_id: str, revision: str) -> Response:
        repo = self._repo(request, repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        form = parse_qs(request.content.decode())
        result = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                result.append(_file_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                result.append(_folder_entry(path))
        return httpx2.Response(200, json=result)

    def _validate_yaml(self, request: Request) -> Response:
        content = json.loads(request.content)["content"]
        errors = _card_errors(content)
        if errors:
            return httpx2.Response(400, json={"errors": [{"message": e} for e in errors], "warnings": []})
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    # ------------------------------------------------------------------ uploads

    def _preupload(self, request: Request, repo_type: str, repo_id: str, revision: str) -> Response:
        repo = self._repo(request, repo_type, repo_id, write=True)
        # With create_pr the revision is the PR's base; an unknown one is an error like on the Hub.
        existing = self._commit_at(repo, revision).files
        files = json.loads(request.content)["files"]
        return httpx2.Response(
            200,
            json={
                "files": [
                    {
                        "path": f["path"],
                        # Always "regular": content comes inline in the commit, never through Xet/LFS.
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_hash(existing[f["path"]]) if f["path"] in existing else None,
                    }
                    for f in files
                ],
                "commitOid": repo.refs.get(revision),
            },
        )

    def _commit(self, request: Request, repo_type: str, repo_id: str, revision: str) -> Response:
        repo = self._repo(request, repo_type, repo_id, write=True)
        base = self._commit_at(repo, revision)
        lines = [json.loads(line) for line in request.content.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "Commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and not base.oid.startswith(parent):
            raise _HubError(412, f"Parent commit {parent} is not the head of {revision} ({base.oid})")
        snapshot = dict(base.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                snapshot[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in snapshot:
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del snapshot[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in snapshot if p.startswith(prefix)]:
                    del snapshot[path]
            else:
                # "lfsFile" would point at content uploaded elsewhere (LFS/Xet), which this hub never accepts.
                raise _HubError(400, f"FakeHub stores regular files only; got a {key!r} operation")
        message = header.get("summary") or "commit"
        pr_url = None
        if request.url.params.get("create_pr") in ("1", "true"):
            discussion = self._open_pr(repo, message, header.get("description") or "", base.oid)
            target = f"refs/pr/{discussion['num']}"
            pr_url = f"{self._repo_url(request, repo)}/discussions/{discussion['num']}"
        else:
            target = revision
            if target not in repo.refs:
                raise _HubError(400, f"Cannot commit to {revision}: not a branch")
        commit = self._new_commit(repo, target, snapshot, message)
        return httpx2.Response(
            200,
            json={
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(request, repo)}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
            },
        )

    def _create_branch(self, request: Request, repo_type: str, repo_id: str, branch: str) -> Response:
        repo = self._repo(request, repo_type, repo_id, write=True)
        if branch in repo.refs:
            raise _HubError(409, f"Branch {branch} already exists")
        payload = json.loads(request.content or b"{}")
        start = self._commit_at(repo, payload.get("startingPoint") or "main")
        repo.refs[branch] = start.oid
        return httpx2.Response(200, json={})

    def _create_discussion(self, request: Request, repo_type: str, repo_id: str) -> Response:
        repo = self._repo(request, repo_type, repo_id, write=True)
        payload = json.loads(request.content)
        if not payload.get("pullRequest"):
            raise _HubError(400, "FakeHub only supports pull requests, not plain discussions")
        discussion = self._open_pr(repo, payload["title"], payload.get("description") or "", repo.head.oid)
        url = f"{self._repo_url(request, repo)}/discussions/{discussion['num']}"
        return httpx2.Response(200, json={"num": discussion["num"], "pullRequest": True, "url": url})

    def _discussion_details(self, request: Request, repo_type: str, repo_id: str, num: int) -> Response:
        repo = self._repo(request, repo_type, repo_id)
        if not 1 <= num <= len(repo.discussions):
            raise _HubError(404, f"Discussion {num} not found")
        return httpx2.Response(200, json=repo.discussions[num - 1])

    def _open_pr(self, repo: FakeRepo, title: str, description: str, start_oid: str) -> dict[str, Any]:
        num = len(repo.discussions) + 1
        discussion = {
            "num": num,
            "title": title,
            "description": description,
            "author": {"name": self.user},
            "createdAt": _now(),
            "status": "open",
            "repo": {"name": repo.repo_id, "type": repo.repo_type},
            "isPullRequest": True,
            "events": [],
            "changes": {"base": "refs/heads/main"},
            "filesWithConflicts": [],
            "diff": "",
        }
        repo.discussions.append(discussion)
        repo.refs[f"refs/pr/{num}"] = start_oid
        return discussion

    def _new_commit(self, repo: FakeRepo, ref: str, files: dict[str, bytes], message: str) -> FakeCommit:
        parent = repo.refs.get(ref)
        digest = hashlib.sha1(f"{next(self._counter)}\0{repo.repo_id}\0{parent}\0{message}".encode())
        for path in sorted(files):
            digest.update(f"\0{path}\0{git_hash(files[path])}".encode())
        commit = FakeCommit(oid=digest.hexdigest(), files=files, message=message, parent=parent, date=_now())
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit

    # ------------------------------------------------------------------ downloads

    def _resolve(
        self, request: httpx2.Request, repo_type: str, repo_id: str, revision: str, path: str
    ) -> Response:
        repo = self._repo(request, repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        if path not in commit.files:
            # X-Repo-Commit lets huggingface_hub cache the absence of the file for this commit.
            raise _HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        data = commit.files[path]
        headers = {
            "ETag": f'"{git_hash(data)}"',
            "X-Repo-Commit": commit.oid,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return httpx2.Response(200, headers=headers, stream=httpx2.ByteStream(b""))
        byte_range = request.headers.get("Range")
        if byte_range:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", byte_range.strip())
            if match is None or not (match[1] or match[2]):
                raise _HubError(416, f"Unsupported range {byte_range}")
            if match[1]:
                start, end = int(match[1]), int(match[2]) if match[2] else len(data) - 1
            else:  # suffix range: the last N bytes
                start, end = max(0, len(data) - int(match[2])), len(data) - 1
            part = data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
            return httpx2.Response(206, headers=headers, content=part)
        return httpx2.Response(200, headers=headers, content=data)


@contextlib.contextmanager
def serve_fake_hub(home: str | os.PathLike, hub: FakeHub | None = None) -> Iterator[FakeHub]:
    """Serve ``hub`` (a new :class:`FakeHub` by default) to every ``huggingface_hub`` call inside the block.

    For the block's duration: online mode, a valid fake token (``HF_TOKEN``), and every Hub cache (downloads,
    Xet, assets, token files, transformers' remote-code modules) under ``home``. Everything, including the HTTP
    client, is restored afterwards.

    Example:
        >>> with serve_fake_hub(tmp / "hf_home") as hub:  # doctest: +SKIP
        ...     push_to_hub(folder, "user/tiny")
        >>> sorted(hub.files("user/tiny"))  # doctest: +SKIP
    """
    import huggingface_hub.constants as hf_constants

    home = Path(home)
    hub_cache, modules_cache = home / "hub", home / "modules"
    locations = {
        "HF_HOME": home,
        "HF_HUB_CACHE": hub_cache,
        "HF_XET_CACHE": home / "xet",
        "HF_ASSETS_CACHE": home / "assets",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
    }
    hub = hub or FakeHub()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ))  # restores the whole environment on exit
        for key, value in locations.items():
            os.environ[key] = str(value)
            # huggingface_hub reads these once, at import time, into module constants.
            stack.enter_context(mock.patch.object(hf_constants, key, str(value)))
        stack.enter_context(mock.patch.object(hf_constants, "HUGGINGFACE_HUB_CACHE", str(hub_cache)))
        stack.enter_context(mock.patch.object(hf_constants, "HF_HUB_OFFLINE", False))
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            os.environ.pop(key, None)  # HF_OIDC_RESOURCE would take precedence over HF_TOKEN
        os.environ["HF_TOKEN"] = hub.token
        # Copies made with `from ... import NAME` in modules that may already be loaded.
        for target, value in {
            "huggingface_hub.utils._cache_manager.HF_HUB_CACHE": hub_cache,
            "huggingface_hub.utils._cache_assets.HF_ASSETS_CACHE": home / "assets",
            "transformers.utils.hub.HF_MODULES_CACHE": modules_cache,
            "transformers.dynamic_module_utils.HF_MODULES_CACHE": modules_cache,
        }.items():
            stack.enter_context(mock.patch(target, str(value)))
        stack.enter_context(hub.activate())
        yield hub


# ---------------------------------------------------------------------- helpers


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"type": "file", "oid": git_hash(data), "size": len(data), "path": path}


def _folder_entry(path: str) -> dict[str, Any]:
    return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}


def _split_card(content: str) -> dict[str, Any] | None:
    match = REGEX_YAML_BLOCK.search(content)
    if match is None:
        return None
    data = yaml.safe_load(match.group(2))
    return data if data is not None else {}


def _card_metadata(readme: bytes | None) -> dict[str, Any]:
    """The README's YAML metadata, or ``{}`` if absent or invalid (the Hub then shows no card data)."""
    if readme is None:
        return {}
    try:
        data = _split_card(readme.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _card_errors(content: str) -> list[str]:
    """What the Hub's validate-yaml would object to, for the parts of the spec hf_compress relies on."""
    try:
        data = _split_card(content)
    except yaml.YAMLError as err:
        return [f"Invalid YAML: {err}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["Metadata must be a mapping"]
    errors = []
    if "model-index" in data:
        try:
            model_index_to_eval_results(data["model-index"])
        except (KeyError, TypeError, ValueError) as err:
            errors.append(f"Invalid model-index: {err!r}")
    for key in ("tags", "datasets", "metrics"):
        value = data.get(key)
        if value is not None and not isinstance(value, (str, list)):
            errors.append(f"'{key}' must be a string or a list of strings")
    if "library_name" in data and not isinstance(data["library_name"], str):
        errors.append("'library_name' must be a string")
    return errors
