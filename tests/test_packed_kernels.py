"""Packed low-bit kernels: each path against the PyTorch reference (unpack everything), the cache, the checkpoint.

- CPU int4 kernel (``kernel="fast"``, or ``"auto"`` for bfloat16 activations): it computes in bfloat16, so it is
  compared with the float32 reference within bfloat16 rounding, bounded per output by the sum of |x·w| products
  (a wrong code, group or layout gives errors of the order of the output itself).
- Triton (CUDA): within float32 rounding for float32 activations, the dtype's rounding otherwise (``cuda``
  marker); the same kernel runs under ``TRITON_INTERPRET=1`` on CPU where Triton is installed.
- ``"auto"`` on float32 CPU activations and every path the kernels decline stay the reference, bit for bit.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_compress.assets import tiny_model
from hf_compress.assets.tiny_models import TINY_ARCHITECTURES
from hf_compress.formats.packed import save_packed
from hf_compress.quantization import PackedLinear, QuantizationGrid, quantize_rtn
from hf_compress.quantization import kernels
from hf_compress.quantization.kernels import (
    INT4_MAX_ROWS,
    cpu_int4,
    kernel_cache_bytes,
    set_kernel_cache_budget,
    set_packed_kernel,
    triton_packed,
)


IDS = torch.tensor([[1, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])
HAS_INT4 = cpu_int4._CONVERT is not None and cpu_int4._MATMUL is not None
needs_int4 = pytest.mark.skipif(not HAS_INT4, reason="this torch build has no CPU int4 kernel")


def _layer(bits, group_size, out_features=48, in_features=576, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    grid = QuantizationGrid.fit(weight, bits, group_size)
    return PackedLinear.from_codes(grid.quantize(weight), grid.scale, grid.zero, bits, group_size,
                                   bias=torch.randn(out_features, generator=generator) if bias else None)


def _bf16_bound(layer, x):
    """What bfloat16 rounding of inputs, scales and output can add: a few units of 2^-8 of sum |x·w| (+ |bias|)."""
    magnitude = x.float().abs() @ layer.dequantized_weight(torch.float32).abs().T
    if layer.bias is not None:
        magnitude = magnitude + layer.bias.abs()
    return 3 * 2**-8 * magnitude + 1e-6


@pytest.fixture(autouse=True)
def _default_budget():
    yield
    set_kernel_cache_budget(kernels.DEFAULT_CACHE_BUDGET)


# --------------------------------------------------------------------------------------------------
# CPU int4 kernel
# --------------------------------------------------------------------------------------------------


@needs_int4
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])  # 128 leaves SmolLM2's 576 inputs a short last group
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_reference_within_bf16(bits, group_size, dtype):
    layer = _layer(bits, group_size, in_features=576 if group_size != -1 else 256)
    layer.kernel = "fast"
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        assert kernels.choose(layer, x) == "int4"
        y = layer(x)
        reference = layer.reference_forward(x.float())
    assert y.dtype == dtype and y.shape == (3, layer.out_features) and layer.has_kernel_cache()
    error = (y.float() - reference).abs()
    assert (error <= _bf16_bound(layer, x)).all(), error.max()
    assert error.max() > 0 or dtype == torch.bfloat16  # float32 activations really went through bfloat16


@needs_int4
def test_kernel_group_expresses_every_grid_it_accepts():
    assert cpu_int4.kernel_group(_layer(4, 128)) == 64  # 576 = 4.5 × 128: groups of 64, each scale twice
    assert cpu_int4.kernel_group(_layer(4, 256, in_features=1536)) == 256
    assert cpu_int4.kernel_group(_layer(4, 24, in_features=96)) is None  # no accepted size divides 24
    assert cpu_int4.kernel_group(_layer(5, 32)) is None  # codes above 15 do not fit
    assert cpu_int4.kernel_group(_layer(4, 32, out_features=40)) is None  # the kernel tiles rows by 16
    layer = _layer(4, 128)
    with pytest.raises(ValueError, match="reference path"):
        cpu_int4.Int4Weight.from_layer(_layer(5, 32))
    assert cpu_int4.planned_nbytes(layer) == cpu_int4.Int4Weight.from_layer(layer).nbytes()


@needs_int4
def test_auto_is_the_exact_reference_for_float32_and_the_kernel_for_bfloat16():
    layer = _layer(4, 32)
    x = torch.randn(1, layer.in_features)
    with torch.no_grad():
        assert kernels.choose(layer, x) == "reference"
        assert torch.equal(layer(x), layer.reference_forward(x)) and not layer.has_kernel_cache()
        assert kernels.choose(layer, x.bfloat16()) == "int4"
        layer(x.bfloat16())
    assert layer.has_kernel_cache()


@needs_int4
def test_paths_the_kernel_declines_are_the_reference_bit_for_bit():
    layer = _layer(4, 32)
    layer.kernel = "fast"
    prefill = torch.randn(INT4_MAX_ROWS + 1, layer.in_features)  # long prompts: one dequantized GEMM is faster
    with torch.no_grad():
        assert kernels.choose(layer, prefill) == "reference"
        assert torch.equal(layer(prefill), layer.reference_forward(prefill))
    x = torch.randn(2, layer.in_features, requires_grad=True)  # autograd must reach the input
    assert kernels.choose(layer, x) == "reference"
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    layer.kernel = "reference"
    with torch.no_grad():
        assert kernels.choose(layer, x.detach().bfloat16()) == "reference"


@needs_int4
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_fast_model_logits_within_bf16_of_the_reference(arch):
    model = quantize_rtn(tiny_model(arch, seed=0)[0], bits=4, group_size=32).eval()
    with torch.no_grad():
        reference = model(IDS).logits
        assert set_packed_kernel(model, "fast") == sum(isinstance(m, PackedLinear) for m in model.modules())
        fast = model(IDS[:, :1]).logits  # one token: decode-sized, every packed layer takes the kernel
        single = model(IDS[:, :1]).logits
    assert kernel_cache_bytes(model) > 0 and torch.equal(fast, single)  # deterministic, cache reused
    scale = reference[:, :1].abs().max()
    assert (fast - reference[:, :1]).abs().max() <= 0.02 * scale
    assert not torch.allclose(fast, reference[:, :1], atol=0, rtol=0)  # it did run in bfloat16
    set_packed_kernel(model, "reference")
    assert kernel_cache_bytes(model) == 0


@needs_int4
def test_the_cache_changes_nothing_saved_and_follows_new_weights(tmp_path):
    model, tokenizer = tiny_model("qwen2", seed=0)
    model = quantize_rtn(model, bits=4, group_size=32).eval()
    save_packed(model, tokenizer, tmp_path / "before")
    set_packed_kernel(model, "fast")
    with torch.no_grad():
        before = model(IDS[:, :1]).logits
    assert kernel_cache_bytes(model) > 0
    save_packed(model, tokenizer, tmp_path / "after")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()
    # New weights loaded in place (same tensors, new contents): the cache is rebuilt, not reused.
    other = quantize_rtn(tiny_model("qwen2", seed=1)[0], bits=4, group_size=32).eval()
    set_packed_kernel(other, "fast")
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(model(IDS[:, :1]).logits, other(IDS[:, :1]).logits)
        assert not torch.equal(model(IDS[:, :1]).logits, before)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "after").eval()
    set_packed_kernel(loaded, "fast")
    with torch.no_grad():
        # Equal state dicts, but on some CPUs (seen on an AMD EPYC) the loaded tensors take another float path:
        # 1 ulp apart. A stale or wrong cache would be off by the weights' scale, as `other` is above.
        torch.testing.assert_close(loaded(IDS[:, :1]).logits, before, rtol=1e-6, atol=1e-6)


@needs_int4
def test_cache_budget_bounds_the_copies():
    model = quantize_rtn(tiny_model("llama", seed=0)[0], bits=4, group_size=32).eval()
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    set_packed_kernel(model, "fast")
    set_kernel_cache_budget(0)
    with torch.no_grad():
        model(IDS[:, :1])
    assert kernel_cache_bytes(model) == 0
    one_layer = cpu_int4.planned_nbytes(layers[0])
    set_kernel_cache_budget(kernel_cache_bytes() + one_layer)  # room for exactly the first layer
    with torch.no_grad():
        model(IDS[:, :1])
    assert [layer.has_kernel_cache() for layer in layers].count(True) == 1
    model.to(torch.float32)  # moving or casting drops the copies (they would describe the old tensors)
    assert kernel_cache_bytes(model) == 0
    with pytest.raises(ValueError, match="non-negative"):
        set_kernel_cache_budget(-1)


def test_set_packed_kernel_rejects_unknown_settings():
    model = quantize_rtn(tiny_model("llama", seed=0)[0], bits=4, group_size=32)
    with pytest.raises(ValueError, match="'auto', 'fast', 'reference'"):
        set_packed_kernel(model, "int4")


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

TRITON_CASES = [(4, 32, 48, 64, 1), (3, 24, 40, 100, 5), (2, 128, 33, 200, 17), (5, 16, 16, 40, 3), (8, 64, 20, 70, 2)]


def _triton_case(bits, group_size, out_features, in_features, rows, dtype, device):
    layer = _layer(bits, group_size, out_features, in_features).to(device)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    y = triton_packed.packed_matmul(x, layer.qweight, layer.scales, layer.qzeros, layer.bias.to(dtype), bits,
                                    layer.group_size, in_features)
    expected = layer.reference_forward(x)
    assert y.dtype == dtype and y.shape == expected.shape
    magnitude = x.float().abs() @ layer.dequantized_weight(torch.float32).abs().T + layer.bias.abs()
    tolerance = {torch.float32: 2**-20, torch.float16: 2**-9, torch.bfloat16: 2**-6}[dtype]
    assert ((y.float() - expected.float()).abs() <= tolerance * magnitude + 1e-6).all()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the compiled kernel is tested instead")
def test_triton_kernel_under_the_interpreter():
    """The Triton kernel on CPU tensors; Triton reads TRITON_INTERPRET when it is imported, so in a fresh process."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              f"{__file__}::test_triton_kernel_under_the_interpreter"],
                             env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return
    # Slow (NumPy per block): 1, 5 and 17 rows (both tile shapes), a short last group, codes across two bytes
    # (3 bits); the interpreter's bfloat16 dot is unusable.
    for case, dtype in [(TRITON_CASES[0], torch.float32), (TRITON_CASES[1], torch.float16), (TRITON_CASES[2], torch.float32)]:
        _triton_case(*case, dtype, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_matches_the_reference_on_cuda(case, dtype):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    _triton_case(*case, dtype, "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_model_on_cuda_takes_triton_and_decodes_like_the_reference():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    model = quantize_rtn(tiny_model("qwen2", seed=0)[0], bits=3, group_size=32).eval().to("cuda")
    layer = next(m for m in model.modules() if isinstance(m, PackedLinear))
    ids = IDS.to("cuda")
    assert kernels.choose(layer, torch.zeros(1, layer.in_features, device="cuda")) == "triton"
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        fast_logits, fast = model(ids).logits, model.generate(ids, **greedy)
        set_packed_kernel(model, "reference")
        reference_logits, reference = model(ids).logits, model.generate(ids, **greedy)
    assert torch.allclose(fast_logits, reference_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast, reference)
