"""Push robustness (issue 19): a folder holding secrets, pickles and caches uploads only the allow-listed files.

A tiny saved model (weights, tokenizer, card) sits next to what a shell and a training run leave behind
(``.env``, ``.git-credentials``, ``optimizer.pt``, ``training_args.bin``, ``.cache/``, ``checkpoint-5/``,
``runs/``, ``wandb/``, notes); a drafting-heads folder saved locally is pushed too. Everything goes to the
in-memory fake Hub of ``tests/fake_hub.py`` (no network). Refused pushes (weights only as a pickle, a file
holding a local path) must create no repo.

Usage: ``python scripts/robustness/push.py [--workdir DIR]`` prints the result as JSON; the robustness
matrix calls :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "hf_SECRET_robustness_do_not_leak"
# What must never reach the Hub (a path or a folder prefix).
JUNK: dict[str, str | bytes] = {
    ".env": f"HF_TOKEN={SECRET}\n",
    ".git-credentials": f"https://user:{SECRET}@huggingface.co\n",
    "optimizer.pt": b"\x80\x04\x95pickle",
    "training_args.bin": b"\x80\x04\x95pickle",
    "scheduler.pt": b"\x80\x04\x95pickle",
    ".cache/huggingface/upload/model.safetensors.metadata": "partial upload\n",
    ".cache/notes.json": f'{{"token": "{SECRET}"}}',
    "checkpoint-5/config.json": "{}",
    "checkpoint-5/optimizer.pt": b"\x80\x04\x95pickle",
    "checkpoint-5/trainer_state.json": f'{{"secret": "{SECRET}"}}',
    "runs/May01_12-00-00/events.out.tfevents.1": b"\x00\x01",
    "runs/May01_12-00-00/hparams.json": "{}",
    "wandb/run-1/files/wandb-metadata.json": f'{{"host": "me", "token": "{SECRET}"}}',
    "notes.txt": f"remember: {SECRET}\n",
    ".ipynb_checkpoints/config-checkpoint.json": "{}",
}


def _fake_hub_module():
    tests = str(REPO_ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import fake_hub

    return fake_hub


def _tiny_model_folder(folder: Path):
    from hf_compress.assets.tiny_models import tiny_model
    from hf_compress.hub import build_model_card, write_model_card

    model, tokenizer = tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    card = build_model_card(
        base_model="HuggingFaceTB/SmolLM2-135M", model_name="tiny-robustness", recipe={"method": "wanda", "sparsity": 0.5},
    )
    write_model_card(folder, card)
    return model


def _local_path_hits(files: dict[str, bytes], roots: list[str]) -> list[str]:
    """``"file: root"`` for each pushed file that contains one of ``roots``."""
    return [f"{path}: {root}" for path, data in sorted(files.items()) for root in roots if root.encode() in data]


def run(workdir: Path) -> dict[str, Any]:
    """Build the messy folders, push them to the fake Hub, and report what reached it.

    Returns ``{"uploaded", "refused_or_skipped", "leaked", "absolute_paths_found", ...}``: ``leaked`` (junk
    paths or the secret found on the Hub) and ``absolute_paths_found`` must be empty, as must
    ``repos_created_by_refused_pushes``.
    """
    from transformers import AutoModelForCausalLM

    from hf_compress.hub import build_model_card, plan_push, push_to_hub, write_model_card
    from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    folder = workdir / "tiny-model"
    _tiny_model_folder(folder)
    for name, data in JUNK.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    # Refused pushes: the only weights are a pickle; a file names a local path.
    legacy = workdir / "legacy"
    legacy.mkdir(exist_ok=True)
    (legacy / "config.json").write_text('{"model_type": "llama"}')
    (legacy / "pytorch_model.bin").write_bytes(b"\x80\x04\x95pickle")
    leaky = workdir / "leaky"
    _tiny_model_folder(leaky)
    (leaky / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(workdir / "base")}))

    # Drafting heads saved locally (their base loaded from a local folder), then pushed as a folder.
    (workdir / "base").mkdir(exist_ok=True)
    from hf_compress.assets.tiny_models import tiny_model

    tiny_model("llama")[0].save_pretrained(workdir / "base")
    base = AutoModelForCausalLM.from_pretrained(workdir / "base")
    heads_folder = workdir / "heads"
    if heads_folder.exists():
        import shutil

        shutil.rmtree(heads_folder)
    AmphistaHeads.for_model(base, AmphistaConfig(num_heads=2, num_attention_heads=2)).save_pretrained(heads_folder)
    write_model_card(heads_folder, build_model_card(base_model=None, model_name="heads", recipe={"method": "amphista"}))

    fake_hub = _fake_hub_module()
    refusals: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as home, fake_hub.serve_fake_hub(Path(home) / "hf_home") as hub:
        for name, refused, kwargs in (("pickle_only", legacy, {"allow_missing_card": True}), ("local_path", leaky, {})):
            try:
                push_to_hub(refused, f"user/{name}", **kwargs)
                refusals[name] = "accepted"
            except ValueError as err:
                refusals[name] = str(err).replace(str(workdir), "<workdir>")  # the report holds no local path
        repos_after_refusals = sorted(repo_id for _, repo_id in hub.repos)
        plan = plan_push(folder)
        push_to_hub(folder, "user/tiny-robustness")
        stored = hub.files("user/tiny-robustness")
        push_to_hub(heads_folder, "user/heads-robustness")
        stored_heads = hub.files("user/heads-robustness")
        hub_home = str(Path(home).resolve())

    uploaded = sorted(p for p in stored if p != ".gitattributes")
    junk_paths = set(JUNK)
    leaked = [p for p in uploaded if p in junk_paths or any(p.startswith(j.split("/")[0] + "/") for j in junk_paths if "/" in j)]
    leaked += [f"{p}: secret" for p, data in sorted(stored.items()) if SECRET.encode() in data]
    roots = sorted({str(workdir), str(folder), str(heads_folder), str(Path.home()) + "/", hub_home})
    everything = {**stored, **{f"heads/{p}": d for p, d in stored_heads.items()}}
    return {
        "uploaded": uploaded,
        "refused_or_skipped": sorted(plan.skipped),
        "skip_reasons": dict(sorted(plan.skipped.items())),
        "leaked": leaked,
        "absolute_paths_found": [hit.replace(str(workdir), "<workdir>") for hit in _local_path_hits(everything, roots)],
        "heads_uploaded": sorted(p for p in stored_heads if p != ".gitattributes"),
        "refused_pushes": refusals,
        "repos_created_by_refused_pushes": repos_after_refusals,
        "ok": not leaked and not _local_path_hits(everything, roots) and not repos_after_refusals
        and all(message != "accepted" for message in refusals.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the folders (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(Path(tmp))
    else:
        result = run(args.workdir)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
