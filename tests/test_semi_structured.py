"""The opt-in 2:4 semi-structured load path (hf_compress.formats.sparse): clear refusals everywhere, and on
CUDA (marker ``cuda``) logits close to the dense-masked model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_compress.assets import tiny_model
from hf_compress.formats.sparse import load_semi_structured, to_semi_structured
from hf_compress.pruning import MagnitudePruner


def _pruned(tmp_path, dtype=torch.bfloat16):
    """A tiny Llama pruned to 2:4 (every linear layer of the blocks), saved in the sparse format."""
    model, tokenizer = tiny_model("llama")
    MagnitudePruner(model, tokenizer).prune("2:4", save_dir=tmp_path / "sparse", progress=False)
    return model.to(dtype), tmp_path / "sparse"


def _linear(rows: int, cols: int, dtype=torch.bfloat16, two_of_four: bool = True) -> nn.Module:
    layer = nn.Linear(cols, rows, bias=False).to(dtype)
    if two_of_four:
        with torch.no_grad():
            layer.weight.view(rows, cols // 4, 4)[..., 2:] = 0
    return nn.Sequential(layer)


def test_cpu_model_is_refused_naming_cuda(tmp_path):
    model, _ = _pruned(tmp_path)
    before = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(ValueError, match=r"need a CUDA GPU; the model is on cpu"):
        to_semi_structured(model)
    assert model.model.layers[0].mlp.up_proj.weight is before  # nothing changed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_loading_without_cuda_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="need a CUDA GPU and none is available"):
        load_semi_structured(tmp_path / "no-such-folder")  # refused before from_pretrained looks for it


def test_wrong_dtype_is_refused(tmp_path):
    model, folder = _pruned(tmp_path, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: .* float16 or bfloat16, not torch.float32"):
        to_semi_structured(model)
    with pytest.raises(ValueError, match="float16 or bfloat16, not torch.float32"):
        load_semi_structured(folder, dtype=torch.float32)


def test_non_2_of_4_weights_and_odd_shapes_are_refused():
    with pytest.raises(ValueError, match=r"0: the weight is not 2:4 sparse"):
        to_semi_structured(_linear(64, 64, two_of_four=False), modules=["0"])
    with pytest.raises(ValueError, match=r"0: weight \[48, 64\] does not fit .* rows a multiple of 32 and cols of 64"):
        to_semi_structured(_linear(48, 64), modules=["0"])
    with pytest.raises(ValueError, match=r"weight \[64, 96\] does not fit"):
        to_semi_structured(_linear(64, 96), modules=["0"])
    with pytest.raises(ValueError, match="no 2:4 sparse linear layer"):
        to_semi_structured(_linear(64, 64, two_of_four=False))
    with pytest.raises(ValueError, match="'nope' is not a module"):
        to_semi_structured(_linear(64, 64), modules=["nope"])


def test_an_unknown_backend_is_refused_before_anything_changes():
    layer = _linear(64, 64)
    with pytest.raises(ValueError, match="choose 'auto', 'cusparselt' or 'cutlass'"):
        to_semi_structured(layer, modules=["0"], backend="cublas")
    assert not isinstance(layer[0].weight, torch.sparse.SparseSemiStructuredTensor)


def test_a_dense_model_has_nothing_to_convert():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="prune the model to 2:4 first"):
        to_semi_structured(model.to(torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["auto", "cutlass", "cusparselt"])
def test_semi_structured_logits_are_close_to_the_dense_masked_model(tmp_path, dtype, backend):
    if backend == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        pytest.skip("PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only (the refusal is tested below)")
    dense, folder = _pruned(tmp_path, dtype=dtype)
    dense.to("cuda").eval()
    model = load_semi_structured(folder, dtype=dtype, backend=backend)
    semi = {"auto": torch.sparse.SparseSemiStructuredTensor, "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS,
            "cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT}[backend]
    converted = [m for m in model.modules() if isinstance(m, nn.Linear)
                 and (isinstance(m.weight, semi) or isinstance(m.weight.data, semi))]
    assert len(converted) == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down of every block
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0)).to("cuda")
    with torch.no_grad():
        expected, got = dense(ids).logits.float(), model(ids).logits.float()
    assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2), (got - expected).abs().max()
    greedy = {"max_new_tokens": 6, "do_sample": False}
    assert model.generate(ids[:1], **greedy).shape == (1, 30)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] == 8,
                    reason="needs a CUDA GPU other than compute capability 8.x")
def test_cutlass_is_refused_where_its_kernels_do_not_run():
    # On an H200 (9.0) the CUTLASS kernel converted fine and then failed at the first matmul: refuse up front.
    layer = _linear(64, 64).to("cuda")
    with pytest.raises(ValueError, match="compute capability 8.x"):
        to_semi_structured(layer, modules=["0"], backend="cutlass")
    assert not isinstance(layer[0].weight, torch.sparse.SparseSemiStructuredTensor)
