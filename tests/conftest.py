"""Shared test configuration.

Tests never reach the real Hugging Face Hub. ``HF_HUB_OFFLINE=1`` is forced here, before transformers or
huggingface_hub are imported by any test module, so an accidental Hub call fails fast instead of hanging or
downloading; tests that need a Hub use the in-process ``fake_hub`` fixture, which lifts offline mode for its
duration only.
"""

from __future__ import annotations

import os
import tempfile


# Must run before huggingface_hub is imported: it reads these variables into module constants at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# transformers puts the modules of `trust_remote_code` repos under HF_MODULES_CACHE and adds that folder to
# sys.path at import time: keep them out of the user's ~/.cache for the whole session.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_compress-tests-modules-"))

import huggingface_hub.constants as hf_constants  # noqa: E402
import pytest  # noqa: E402

from fake_hub import FakeHub, serve_fake_hub  # noqa: E402


# Under pytest-xdist (`make test`: `-n 2`) the workers share the cores: each gets its share of torch threads
# (one each on 2 cores), or their thread pools would wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch  # noqa: E402

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, torch.get_num_threads() // workers))  # torch defaults to the usable cores

# In case huggingface_hub was imported earlier (by a plugin), the environment variable alone is not enough.
hf_constants.HF_HUB_OFFLINE = True


def pytest_collection_modifyitems(config, items):
    """The real-model tests (up to a minute or more each, most of the suite's longest) run first. Under xdist's work
    stealing the run then ends on short tests, instead of on one worker finishing a long test while the other waits
    (they came last: test_reference_model, test_zero_shot). The order within each part is kept."""
    items.sort(key=lambda item: item.get_closest_marker("real_model") is None)


@pytest.fixture
def fake_hub(tmp_path) -> FakeHub:
    """An in-memory Hub (see ``tests/fake_hub.py``) that every ``huggingface_hub`` call talks to.

    For the test's duration: online mode, a valid fake token (``HF_TOKEN``), and every Hub cache (downloads,
    Xet, assets, token files, transformers' remote-code modules) in ``tmp_path``. Everything, including the
    HTTP client, is restored afterwards.
    """
    with serve_fake_hub(tmp_path / "hf_home") as hub:
        yield hub


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny models
    run fastest so, and on a loaded 2-core machine two threads wait on each other (30x slower journeys)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process cannot write to: a ``chmod 500`` folder, or, for root (which ignores modes), a
    folder on a read-only mount. Skips where neither exists."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if not os.access(folder, os.W_OK):
            yield folder
            return
        for candidate in _read_only_mount_points():
            if os.path.isdir(candidate) and not os.access(candidate, os.W_OK):
                yield __import__("pathlib").Path(candidate)
                return
        pytest.skip("this user can write anywhere and no read-only mount is available")
    finally:
        folder.chmod(0o700)


def _read_only_mount_points() -> list[str]:
    try:
        lines = open("/proc/mounts", encoding="utf-8").read().splitlines()
    except OSError:
        return []
    mounts = [line.split() for line in lines]
    return [m[1] for m in mounts if len(m) > 3 and "ro" in m[3].split(",")] + ["/proc/sys"]

