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
