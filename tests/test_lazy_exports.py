"""Package names that load on first use: each one resolves, and importing it pulls in only what it needs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _run_python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)


def test_every_quantization_export_resolves_to_its_module():
    import hf_compress.quantization as quantization

    for name in quantization.__all__:
        assert getattr(quantization, name) is not None, name
    from hf_compress.quantization import kernels

    assert quantization.set_packed_kernel is kernels.set_packed_kernel
    assert quantization.set_kernel_cache_budget is kernels.set_kernel_cache_budget
    with pytest.raises(AttributeError, match="has no attribute 'set_kernel'"):
        quantization.set_kernel  # noqa: B018


def test_kernel_settings_import_without_peft():
    # The kernel switches serve packed checkpoints loaded with plain transformers: no PEFT needed or imported.
    result = _run_python(
        """
        import sys
        from hf_compress.quantization import set_kernel_cache_budget, set_packed_kernel
        assert "peft" not in sys.modules, "importing the kernel settings imported peft"
        assert "hf_compress.quantization.dlqat" not in sys.modules
        print(set_packed_kernel.__module__)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "hf_compress.quantization.kernels"


def test_subpackages_load_on_attribute_access_after_a_bare_import():
    # `hf_compress.recipe.run(...)` as the README writes it; the bare import itself stays free of torch.
    result = _run_python(
        """
        import sys
        import hf_compress
        assert "torch" not in sys.modules, "import hf_compress imported torch"
        assert "hf_compress.recipe" not in sys.modules and "hf_compress.hub" not in sys.modules
        run = hf_compress.recipe.run
        assert run is sys.modules["hf_compress.recipe.runner"].run
        assert callable(hf_compress.hub.plan_push)
        assert "hub" in dir(hf_compress)
        try:
            hf_compress.recipes
        except AttributeError as error:
            print(error)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "module 'hf_compress' has no attribute 'recipes'"


def test_save_pruned_is_a_pruning_name():
    from hf_compress.pruning import save_pruned
    from hf_compress.pruning.storage import save_pruned as defined

    assert save_pruned is defined
