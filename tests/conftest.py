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

from fake_hub import FAKE_TOKEN, FakeHub  # noqa: E402


# In case huggingface_hub was imported earlier (by a plugin), the environment variable alone is not enough.
hf_constants.HF_HUB_OFFLINE = True


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    """An in-memory Hub (see ``tests/fake_hub.py``) that every ``huggingface_hub`` call talks to.

    For the test's duration: online mode, a valid fake token (``HF_TOKEN``), and every Hub cache (downloads,
    Xet, assets, token files, transformers' remote-code modules) in ``tmp_path``. Everything, including the
    HTTP client, is restored afterwards.
    """
    home = tmp_path / "hf_home"
    hub_cache = home / "hub"
    modules_cache = home / "modules"
    for key, value in {
        "HF_HOME": home,
        "HF_HUB_CACHE": hub_cache,
        "HF_XET_CACHE": home / "xet",
        "HF_ASSETS_CACHE": home / "assets",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
    }.items():
        monkeypatch.setenv(key, str(value))
        # huggingface_hub reads these once, at import time, into module constants.
        monkeypatch.setattr(hf_constants, key, str(value))
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)  # would take precedence over HF_TOKEN
    # Copies made with `from ... import NAME` in modules that may already be loaded.
    monkeypatch.setattr("huggingface_hub.utils._cache_manager.HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr("huggingface_hub.utils._cache_assets.HF_ASSETS_CACHE", str(home / "assets"))
    monkeypatch.setattr("transformers.utils.hub.HF_MODULES_CACHE", str(modules_cache))
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(modules_cache))

    hub = FakeHub()
    with hub.activate():
        yield hub
