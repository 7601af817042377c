"""The compatibility layer: every private assumption holds on the installed versions, nothing else reaches in,
``import hf_compress`` is light and still registers everything, and old versions fail with one clear error.

These are the tests the ``latest`` CI job runs first: a failure names the assumption that broke.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import io
import logging
import re
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from hf_compress import _compat
from hf_compress.assets import tiny_model
from hf_compress.evaluation.speed import measure_generation_speed
from hf_compress.speculative import SpeculativeDecoding
from hf_compress.utils.import_hooks import when_imported


pytestmark = pytest.mark.compat_smoke


PACKAGE = Path(__file__).resolve().parents[1] / "hf_compress"


def test_every_private_assumption_holds_on_the_installed_versions():
    problems = _compat.check_assumptions()
    assert problems == [], "private APIs moved:\n" + "\n".join(problems)


def test_assumption_checks_report_a_moved_hook(monkeypatch):
    """An override of a renamed hook would silently never run: check_assumptions must say so."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner
    from transformers import trainer

    monkeypatch.delattr(BaseTuner, "_replace_module")
    monkeypatch.delattr(PeftModel, "_enable_peft_forward_hooks")
    monkeypatch.setattr(inspect, "getsource", _source_without(inspect.getsource, trainer, "_keys_to_ignore_on_save"))
    problems = "\n".join(_compat.check_assumptions())
    for symptom in ("_replace_module", "_enable_peft_forward_hooks", "_keys_to_ignore_on_save"):
        assert symptom in problems, problems


def _source_without(getsource, module, name):
    return lambda obj: getsource(obj).replace(name, "renamed") if obj is module else getsource(obj)


def _private_names_used(path: Path) -> set[str]:
    """Private names in code (names, attributes, and string literals such as getattr's), comments skipped."""
    found = set()
    names = set(_compat.PRIVATE_NAMES)
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.NAME and token.string in names:
            found.add(token.string)
        elif token.type == tokenize.STRING and token.string.strip("'\"") in names:
            found.add(token.string.strip("'\""))
        elif token.type == tokenize.NAME and token.string == "import":
            continue
    return found


def test_no_module_outside_compat_touches_private_names():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        used = _private_names_used(path)
        # Dotted imports such as `transformers.conversion_mapping` show up as NAME tokens too.
        if used:
            offenders[str(path.relative_to(PACKAGE))] = sorted(used)
    assert offenders == {}, f"private names outside hf_compress/_compat.py: {offenders}"


def test_the_private_name_check_can_fail(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('hook = getattr(module, "_hf_hook", None)\nx = config._attn_implementation  # _weight_conversions\n')
    assert _private_names_used(sample) == {"_hf_hook", "_attn_implementation"}


def _run_python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)


def test_import_is_light_and_registration_waits_for_the_libraries():
    result = _run_python(
        """
        import sys
        import hf_compress
        heavy = [name for name in ("torch", "transformers.modeling_utils", "peft", "accelerate") if name in sys.modules]
        assert not heavy, f"import hf_compress imported {heavy}"
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        assert {"hf_compress_sparse", "hf_compress_packed", "hf_compress_slim"} <= set(AUTO_QUANTIZER_MAPPING)
        assert "hf_compress.pruning" not in sys.modules, "registering a format imported a method package"
        from peft import PeftType
        assert PeftType("DLQAT").value == "DLQAT"
        print("OK")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "OK"


@pytest.mark.parametrize("order", ["hf_compress first", "transformers first"])
def test_plain_from_pretrained_loads_a_sparse_checkpoint_after_import_hf_compress(tmp_path, order):
    from hf_compress.pruning import MagnitudePruner, MagnitudeConfig

    model, tokenizer = tiny_model("llama")
    MagnitudePruner(model, tokenizer).prune(MagnitudeConfig(sparsity="2:4"), None, save_dir=tmp_path / "sparse")
    expected = float(model.model.layers[0].mlp.up_proj.weight.detach().double().abs().sum())
    imports = "import hf_compress\nfrom transformers import AutoModelForCausalLM" if order == "hf_compress first" else (
        "from transformers import AutoModelForCausalLM\nimport transformers.modeling_utils\nimport hf_compress"
    )
    result = _run_python(
        imports + f"""
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "sparse")!r})
import sys
assert "hf_compress.pruning" not in sys.modules and "peft" not in sys.modules, "loading imported a method package"
print(float(model.model.layers[0].mlp.up_proj.weight.double().abs().sum()))
"""
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) == expected


def test_too_old_versions_fail_with_one_clear_error():
    with pytest.raises(_compat.VersionTooOldError, match=r"transformers .* is installed, hf_compress needs transformers>=99\.0.*pip install -U"):
        _compat.check_minimum_versions({"transformers": "99.0"})
    _compat.check_minimum_versions({"transformers": "5.0", "not-an-installed-package": "1.0"})  # both fine


def test_import_refuses_an_old_transformers_in_a_fresh_process():
    result = _run_python(
        """
        import importlib.metadata
        real = importlib.metadata.version
        importlib.metadata.version = lambda name: "5.0.0" if name == "transformers" else real(name)
        import hf_compress
        """
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "VersionTooOldError" in last and "transformers 5.0.0 is installed" in last and "pip install" in last


def test_rollback_helpers_read_the_installed_cache_layers():
    """Recurrent layers record their states for a rollback from transformers 5.25 on; quantized layers never crop."""
    from transformers import AutoConfig, QuantizedCache

    mamba = AutoConfig.for_model("mamba", vocab_size=32, hidden_size=16, num_hidden_layers=2, state_size=4)
    installed = _compat._release(importlib.metadata.version("transformers"))
    expected = installed >= _compat._release(_compat.RECURRENT_ROLLBACK_RELEASE)
    assert _compat.records_recurrent_states(DynamicCache(config=mamba).layers) == expected
    llama = tiny_model("llama")[0].config
    assert all(_compat.cache_layer_is_croppable(layer) for layer in DynamicCache(config=llama).layers)
    assert not any(_compat.cache_layer_is_croppable(layer)
                   for layer in QuantizedCache(backend="fp8", config=llama).layers)


@pytest.mark.parametrize("architecture", ["llama", "gemma3", "gpt2", "opt"])
def test_cache_keyword_and_output_field_match_the_installed_transformers(architecture):
    model, _ = tiny_model(architecture)
    name = _compat.cache_kwarg_name(model)
    assert name in _compat.CACHE_KWARGS
    cache = DynamicCache(config=model.config)
    out = model(torch.tensor([[1, 2, 3]]), use_cache=True, **{name: cache})
    assert _compat.cache_of_output(out) is cache
    assert cache.get_seq_length() == 3
    assert _compat.cache_from_model_kwargs({name: cache, "attention_mask": None}) is cache


def test_cache_helpers_take_either_name_whatever_transformers_is_installed(monkeypatch):
    """The branches the installed transformers does not take: a remote-code forward with the old name, a forward
    with ``**kwargs`` only under either release, outputs and kwargs holding the old name, a class with no field."""
    import dataclasses

    class OldName(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return input_ids

    class NewName(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    class KwargsOnly(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    assert _compat.cache_kwarg_name(OldName()) == "past_key_values"
    assert _compat.cache_kwarg_name(NewName()) == "cache"
    for uses_new_name, expected in ((True, "cache"), (False, "past_key_values")):
        monkeypatch.setattr(_compat, "_transformers_uses_cache_kwarg", lambda value=uses_new_name: value)
        assert _compat.cache_kwarg_name(KwargsOnly()) == expected
    cache = object()
    assert _compat.cache_of_output({"logits": 1, "past_key_values": cache}) is cache
    assert _compat.cache_of_output({"logits": 1}) is None
    assert _compat.cache_from_model_kwargs({"cache": None, "past_key_values": cache}) is cache
    assert _compat.cache_from_model_kwargs({"attention_mask": None}) is None

    @dataclasses.dataclass
    class OldOutput:
        sequences: object = None
        past_key_values: object = None

    @dataclasses.dataclass
    class NoCache:
        sequences: object = None

    assert _compat.with_cache_field(OldOutput, cache) == {"past_key_values": cache}
    with pytest.raises(TypeError, match="no cache field"):
        _compat.with_cache_field(NoCache, cache)


def test_speed_measurement_reports_the_accepted_length_of_a_strategy():
    model, tokenizer = tiny_model("llama")
    plain = measure_generation_speed(model, tokenizer, ["abcabcabcabc"], max_new_tokens=12, progress=False)
    assert "mean_accepted_length" not in plain
    strategy = SpeculativeDecoding()
    result = measure_generation_speed(
        model, tokenizer, ["abcabcabcabc"], max_new_tokens=12, progress=False, custom_generate=strategy
    )
    assert result["mean_accepted_length"] == pytest.approx(strategy.last_metrics.mean_accepted_length)
    assert result["mean_accepted_length"] > 1.0  # the repeating prompt drafts well: more than one token per forward
    assert result["outputs"] == plain["outputs"]  # lossless in fp32


def test_when_imported_runs_after_import_and_logs_failures(tmp_path, monkeypatch, caplog):
    (tmp_path / "hf_compress_hook_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("hf_compress_hook_probe", lambda module: seen.append(module.VALUE))
    when_imported("hf_compress_hook_probe", lambda module: 1 / 0)
    assert seen == []
    with caplog.at_level(logging.WARNING):
        import hf_compress_hook_probe  # noqa: F401
    assert seen == [42]
    assert "could not register with hf_compress_hook_probe" in caplog.text
    when_imported("hf_compress_hook_probe", lambda module: seen.append("again"))  # already imported: runs now
    assert seen == [42, "again"]
    sys.modules.pop("hf_compress_hook_probe", None)


def test_architecture_doc_names_only_files_that_exist():
    """Every ``*.py`` file and package folder docs/architecture.md names exists (the doc stays true)."""
    root = PACKAGE.parent
    text = (root / "docs" / "architecture.md").read_text()
    known = {path.name for path in root.rglob("*.py") if ".venv" not in path.parts}
    known |= {path.name + "/" for path in root.rglob("*") if path.is_dir() and ".venv" not in str(path)}
    mentioned = set(re.findall(r"\b([a-z_][a-z0-9_]*\.py)\b", text)) | set(re.findall(r"\b([a-z_]+/)(?=\s)", text))
    missing = sorted(name for name in mentioned if name not in known and name not in {"generate.py", "custom_generate/"})
    assert missing == [], f"docs/architecture.md names files that do not exist: {missing}"
