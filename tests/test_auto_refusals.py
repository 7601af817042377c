"""Folders hf_compress writes that are not causal LMs (drafting heads, CoSpec arbiters) given to transformers'
Auto classes: the config reads, AutoModel loads an arbiter, AutoModelForCausalLM and pipeline refuse them naming
what they are for and the calls that decode with them — after a bare ``import hf_compress`` too."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, pipeline
from transformers.models.auto import configuration_auto

from hf_compress.assets import tiny_model
from hf_compress.speculative.cospec import ArbiterConfig, CoSpec, CoSpecArbiter
from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads, MedusaConfig
from hf_compress.utils import model_types


UNNAMED_ARBITER = (r"holds a CoSpec arbiter \(hf_compress, model type hf_compress_cospec_arbiter\) for a llama target "
                   r"model of hidden size 64 and 256 tokens whose name was not recorded, not a causal LM")


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def arbiter(target):
    model, tok = target
    arbiter = CoSpecArbiter.for_model(model, ArbiterConfig(use_hidden_states=True), tok)
    with torch.no_grad():  # not the fresh weights, so that a load that re-initialises them shows
        arbiter.net[0].weight.normal_(generator=torch.Generator().manual_seed(0))
        arbiter.feature_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
    return arbiter


@pytest.fixture(scope="module")
def folders(target, arbiter, tmp_path_factory):
    """An arbiter folder and an Amphista heads folder, both without a recorded base model name."""
    model, _ = target
    root = tmp_path_factory.mktemp("auto")
    arbiter_folder = arbiter.save_pretrained(root / "arbiter")
    heads_folder = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2)).save_pretrained(root / "heads")
    return arbiter_folder, heads_folder


# ------------------------------------------------------------------------------------ a fresh interpreter
@pytest.mark.parametrize("order", ["hf_compress first", "transformers first"])
def test_after_a_bare_import_hf_compress_both_folders_are_refused_saying_what_they_are(folders, order):
    arbiter_folder, heads_folder = folders
    imports = ("import hf_compress\nfrom transformers import AutoModelForCausalLM" if order == "hf_compress first" else
               "from transformers import AutoModelForCausalLM, AutoConfig\nimport hf_compress")
    script = imports + textwrap.dedent(
        f"""
        import sys
        HEADS, COSPEC = "hf_compress.speculative.heads", "hf_compress.speculative.cospec"
        print("IMPORTED:", HEADS in sys.modules, COSPEC in sys.modules)
        for folder in ({str(arbiter_folder)!r}, {str(heads_folder)!r}):
            try:
                AutoModelForCausalLM.from_pretrained(folder)
            except ValueError as error:
                print("REFUSED:", str(error).replace(chr(10), " "))
            else:
                sys.exit(f"loaded {{folder}} as a causal LM")
            print("IMPORTED:", HEADS in sys.modules, COSPEC in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("IMPORTED:", "REFUSED:"))]
    assert len(lines) == 5, result.stdout
    # `import hf_compress` imported neither package; reading the arbiter folder imported cospec only.
    assert lines[0] == "IMPORTED: False False" and lines[2] == "IMPORTED: False True", lines
    assert lines[4] == "IMPORTED: True True"
    refused_arbiter, refused_heads = lines[1], lines[3]
    assert f"{arbiter_folder} holds a CoSpec arbiter (hf_compress, model type hf_compress_cospec_arbiter)" in refused_arbiter
    assert f"custom_generate=CoSpec({str(arbiter_folder)!r})" in refused_arbiter
    assert "does not recognize this architecture" not in refused_arbiter
    assert f"{heads_folder} holds Amphista drafting heads (hf_compress, model type hf_compress_amphista)" in refused_heads
    assert f"custom_generate=Amphista({str(heads_folder)!r})" in refused_heads


# ------------------------------------------------------------------------------------ the arbiter, in process
def test_auto_model_for_causal_lm_and_pipeline_refuse_an_arbiter_folder_showing_the_calls(folders, arbiter, target,
                                                                                          tmp_path):
    arbiter_folder, _ = folders
    with pytest.raises(ValueError, match=rf"{arbiter_folder} {UNNAMED_ARBITER}") as error:
        AutoModelForCausalLM.from_pretrained(arbiter_folder)
    message = str(error.value)
    assert "AutoModelForCausalLM.from_pretrained(TARGET_MODEL)" in message  # no target name was recorded
    assert "It was trained with drafts from n-gram prompt lookup" in message
    assert f"do_sample=False, custom_generate=CoSpec({str(arbiter_folder)!r}))" in message
    assert f"custom_generate={str(arbiter_folder)!r}, trust_remote_code=True" in message  # the folder has the code
    assert f"CoSpecArbiter.from_pretrained({str(arbiter_folder)!r})" in message
    with pytest.raises(ValueError, match=UNNAMED_ARBITER):  # pipeline wraps the error, whose text it keeps
        pipeline("text-generation", model=str(arbiter_folder))
    with pytest.raises(ValueError, match=r"configures a CoSpec arbiter, not a causal LM.*CoSpecArbiter\.for_model"):
        AutoModelForCausalLM.from_config(arbiter.config)
    # The strategy call the error shows decodes with the folder's arbiter.
    model, tok = target
    ids = tok("abcabcabc", return_tensors="pt").input_ids
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, custom_generate=CoSpec(str(arbiter_folder))),
                       model.generate(ids, max_new_tokens=8, do_sample=False, custom_generate=CoSpec(arbiter)))
    # With a target and a draft named, the error names them; without custom_generate/ it does not offer that call.
    named = CoSpecArbiter.from_pretrained(arbiter_folder)
    named.config.base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M"
    named.config.draft_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    folder = named.save_pretrained(tmp_path / "named")
    shutil.rmtree(folder / "custom_generate")
    with pytest.raises(ValueError, match=r"CoSpec arbiter \(hf_compress, model type hf_compress_cospec_arbiter\) for "
                                         r"the target model HuggingFaceTB/SmolLM2-135M, not a causal LM") as error:
        AutoModelForCausalLM.from_pretrained(folder)
    message = str(error.value)
    assert "AutoModelForCausalLM.from_pretrained('HuggingFaceTB/SmolLM2-135M')" in message
    assert f"CoSpec({str(folder)!r}, draft_model='HuggingFaceTB/SmolLM2-135M-Instruct')" in message
    assert "trust_remote_code" not in message


def test_auto_config_reads_and_auto_model_loads_the_arbiter_itself(folders, arbiter):
    arbiter_folder, _ = folders
    config = AutoConfig.from_pretrained(arbiter_folder)
    assert type(config) is ArbiterConfig
    assert (config.hidden_size, config.vocab_size, config.tokenizer_fingerprint, config.base_model_identity) == (
        arbiter.config.hidden_size, arbiter.config.vocab_size, arbiter.config.tokenizer_fingerprint,
        arbiter.config.base_model_identity)
    loaded = AutoModel.from_pretrained(arbiter_folder)
    assert type(loaded) is CoSpecArbiter
    expected = arbiter.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    features = torch.randn(5, arbiter.config.num_features)
    torch.testing.assert_close(loaded(features), arbiter(features))
    assert type(AutoModel.from_config(config)) is CoSpecArbiter
    # AutoModel goes through CoSpecArbiter.from_pretrained, which refuses a folder missing the standardisation.
    tensors = load_file(arbiter_folder / "model.safetensors")
    incomplete = arbiter_folder.parent / "incomplete"
    shutil.copytree(arbiter_folder, incomplete)
    save_file({k: v for k, v in tensors.items() if not k.startswith("feature_")}, incomplete / "model.safetensors")
    with pytest.raises(ValueError, match="not a complete CoSpec arbiter"):
        AutoModel.from_pretrained(incomplete)


# ------------------------------------------------------------------------------------ the placeholders
def test_placeholders_hand_over_to_the_real_classes_and_never_replace_them():
    placeholder = model_types._Placeholders.hf_compress_medusa
    config = placeholder.from_dict({"model_type": "hf_compress_medusa", "num_heads": 3})
    assert type(config) is MedusaConfig and config.num_heads == 3
    assert type(placeholder(num_heads=2)) is MedusaConfig  # AutoConfig.for_model builds through it
    assert type(AutoConfig.for_model("hf_compress_cospec_arbiter", hidden_size=8, vocab_size=10)) is ArbiterConfig
    model_types._register_placeholders(configuration_auto)  # e.g. hf_compress imported again: the real ones stay
    for model_type in model_types.MODEL_TYPE_MODULES:
        assert not getattr(configuration_auto.CONFIG_MAPPING[model_type], "hf_compress_placeholder", False)
    # transformers' config mapping pickles, placeholders included (they are found by name).
    assert pickle.loads(pickle.dumps(placeholder)) is placeholder
    assert pickle.loads(pickle.dumps(configuration_auto.CONFIG_MAPPING))["hf_compress_medusa"] is MedusaConfig
