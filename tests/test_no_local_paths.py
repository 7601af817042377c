"""No file written by a save path carries an absolute path of this machine (issue 26).

Every artifact kind is saved from a model loaded from a local folder (the case where a path could leak
into ``base_model``, ``adapter_config.json`` or ``custom_generate/``), then every text file is grepped for
the temporary folder, the home directory and the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_compress.assets import tiny_model
from hf_compress.cli.main import main as cli
from hf_compress.demo import DemoMethod, run_demo
from hf_compress.evaluation.suite import EvaluationSettings
from hf_compress.formats.packed import save_packed
from hf_compress.formats.slim import save_slim
from hf_compress.modeling.structure import block_structure, shrink_block
from hf_compress.pruning import MagnitudeConfig, MagnitudePruner
from hf_compress.quantization import quantize_rtn
from hf_compress.speculative import SpeculativeDecoding


TEXT_SUFFIXES = {".json", ".md", ".py", ".txt", ".jinja", ".yaml", ".yml"}


def _machine_paths(tmp_path: Path) -> list[str]:
    paths = {str(tmp_path), str(tmp_path.resolve()), str(Path.home()), os.getcwd()}
    return sorted(p for p in paths if len(p) > 1)


def _leaks(folder: Path, machine_paths: list[str]) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name == "README"):
            text = path.read_text(encoding="utf-8", errors="replace")
            found += [f"{path.relative_to(folder)}: {p}" for p in machine_paths if p in text]
    return found


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local") / "tiny-llama"
    tiny_model("llama", save_dir=folder)
    return folder


def test_every_artifact_kind_is_free_of_machine_paths(tmp_path, local_model):
    machine_paths = _machine_paths(tmp_path) + _machine_paths(local_model.parent)
    out = tmp_path / "artifacts"

    MagnitudePruner.from_pretrained(str(local_model)).prune(MagnitudeConfig(sparsity="2:4"), save_dir=out / "sparse")

    model = AutoModelForCausalLM.from_pretrained(local_model)
    shrink_block(block_structure(model.model.layers[1]), kept_ffn=torch.arange(32))
    save_slim(model, None, out / "slim")

    save_packed(quantize_rtn(AutoModelForCausalLM.from_pretrained(local_model), bits=4, group_size=32), None,
                out / "packed")

    assert cli(["quantize", "dlqat", "--model", str(local_model), "--bits", "4", "--group-size", "32",
                "--rank", "1", "--steps", "1", "--batch-size", "1", "--seq-len", "16",
                "--save-dir", str(out / "cli-packed"), "--adapter-dir", str(out / "cli-adapter")]) == 0

    draft = AutoModelForCausalLM.from_pretrained(local_model)
    SpeculativeDecoding(draft_model="HuggingFaceTB/SmolLM2-135M-Instruct").save_pretrained(out / "strategy")
    del draft

    settings = EvaluationSettings(perplexity_sets=("wikipedia",), max_windows=1, window=32, zero_shot_tasks=(),
                                  speed_prompts=0)
    run_demo(str(local_model), out / "demo", settings=settings, progress=False,
             methods=[DemoMethod("same", "no change", lambda m, t, c: (m, {"method": "magnitude"}))])

    leaks = _leaks(out, machine_paths)
    assert not leaks, leaks
    assert (out / "cli-adapter" / "adapter_config.json").is_file() and (out / "demo" / "same" / "README.md").is_file()
