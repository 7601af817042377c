"""A user's journey with a published artifact, run in a fresh interpreter by tests/test_artifacts.py.

    python tests/artifact_journey.py HUB_STATE HF_HOME JOURNEYS_JSON

``HUB_STATE`` is a :meth:`FakeHub.save_state` file (what the test process published); ``JOURNEYS_JSON`` a list of
``{"repo_id", "kind", "folder", "base"}``. For each artifact, with its own empty Hub cache, this process
downloads it the way a user would and runs it:

- ``model`` / ``router``: ``import hf_compress``; ``AutoModelForCausalLM.from_pretrained(repo)`` + greedy
  ``generate``; ``ModelCard.load(repo)``;
- ``strategy``: ``base.generate(custom_generate=repo, trust_remote_code=True)`` on the base model;
- ``adapter``: ``PeftModel.from_pretrained(base, repo)`` + ``generate``.

The same journey then runs on the local build folder, and the process prints one JSON line per artifact with
both outputs (and what the loaded model is), for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "abcabcab the cat sat"
NEW_TOKENS = 8


def _greedy(model, tokenizer, **kwargs) -> list[int]:
    import torch

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             **kwargs)
    return out[0, ids.shape[1]:].tolist()


def _describe(model) -> dict:
    """What the loaded model is: its format, its packed layers, whether its plain linears are 2:4, its size."""
    import torch

    from hf_compress.modeling.layers import find_decoder_blocks, find_linear_layers

    quantizer = getattr(model.config, "quantization_config", None)
    method = quantizer.get("quant_method") if isinstance(quantizer, dict) else getattr(quantizer, "quant_method", None)
    linears = [layer for block in find_decoder_blocks(model)[1] for layer in find_linear_layers(block).values()]
    dense = [layer.weight for layer in linears if isinstance(getattr(layer, "weight", None), torch.Tensor)
             and layer.weight.dim() == 2 and layer.weight.shape[1] % 4 == 0]
    return {
        "class": type(model).__name__,
        "quant_method": str(method) if method is not None else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "packed_layers": sum(type(m).__name__ == "PackedLinear" for m in model.modules()),
        "two_four": bool(dense) and all(int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2 for w in dense),
        "routed": hasattr(model.get_decoder(), "token_router"),
    }


def run(journey: dict, home: Path) -> dict:
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_compress  # noqa: F401  (what the cards tell users to do first)
    from hf_compress.assets import load_model

    repo, kind, folder = journey["repo_id"], journey["kind"], journey["folder"]
    result = {"repo_id": repo, "kind": kind, "card_tags": ModelCard.load(repo).data.tags}
    if kind in ("model", "router"):
        outputs, described = [], []
        for source in (repo, folder):
            model = AutoModelForCausalLM.from_pretrained(source).eval()
            tokenizer = AutoTokenizer.from_pretrained(source)
            outputs.append(_greedy(model, tokenizer))
            described.append(_describe(model))
        result["loaded"], result["loaded_local"] = described  # the download's, and the build's for comparison
    elif kind == "strategy":
        base, tokenizer = load_model(journey["base"])
        outputs = [_greedy(base, tokenizer, custom_generate=source, trust_remote_code=True) for source in (repo, folder)]
        result["greedy"] = _greedy(base, tokenizer)
    elif kind == "adapter":
        from peft import PeftModel

        outputs, described = [], []
        for source in (repo, folder):
            base, tokenizer = load_model(journey["base"])
            model = PeftModel.from_pretrained(base, source).eval()
            outputs.append(_greedy(model, tokenizer))
            described.append({"class": type(model).__name__, "peft_type": str(model.peft_config["default"].peft_type)})
        result["loaded"], result["loaded_local"] = described
    else:
        raise ValueError(f"unknown kind {kind!r}")
    result["hub_tokens"], result["local_tokens"] = outputs
    return result


def main() -> None:
    from fake_hub import FakeHub, serve_fake_hub

    state, home, journeys = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    hub = FakeHub.load_state(state)
    for i, journey in enumerate(journeys):
        with serve_fake_hub(home / f"user-{i}", hub):  # an empty cache per artifact: a real download each time
            print(json.dumps(run(journey, home)), flush=True)


if __name__ == "__main__":
    main()
