"""The saved expert folder: one PEFT adapter per expert, the router, the recipe and a model card.

```
experts/
  experts_config.json   base model (Hub id or null, never a path) + its fingerprint (+ base_weights: the GGUF a
                        reference base model was de-quantized from), expert names, embedding spec, ExpertConfig,
                        cluster sizes, training and selection summaries
  router.safetensors    centroids [K, hidden], the embedding space's mean and std [hidden]
  expert_0/ ... expert_{K-1}/   adapter_config.json + adapter_model.safetensors (+ README.md card): each a
                        plain PEFT LoRA adapter, `PeftModel.from_pretrained(base, "experts/expert_0")`
  README.md             the card (recipe, measured metrics if given, how to load)
```

Loading checks, before any adapter is attached: the folder's format, the base model's fingerprint (four
numbers of its input embeddings and of the pooled block's first weight, tolerant to a bf16 copy; and eight
elements of the base weight of every layer the adapters change, each equal to within 2**-7 relative, which a
bf16 or float16 copy keeps: a base fine-tuned further, or with other weights in an adapted layer, is refused
where the four numbers alone let it load), that the router has exactly one centroid per expert, that every
expert folder is there, and that the router's and every adapter's tensors, every ``adapter_config.json`` and
the expert list and embedding spec still have the digests recorded at save (``experts_config.json`` →
``integrity``, as the compressed formats' ``seal_checkpoint``): an edited adapter, scaling or expert order
would otherwise load and answer wrong. A load that fails while PEFT attaches the adapters puts the base model's
layers back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import __version__, _compat
from ..assets.resolve import check_folder_exists
from ..formats.integrity import DIGEST_ALGORITHM, CheckpointIntegrityError, CheckpointReader
from ..hub import base_weights_of, build_model_card, hub_model_id, write_model_card
from ..modeling.identity import fingerprints_match, weight_fingerprint
from ..modeling.layers import find_decoder_blocks
from ..quantization.packed_linear import PackedLinear
from ..utils import InvalidArgumentTypeError, atomic_directory, atomic_file, check_save_dir, get_logger
from ..utils.processes import main_process_only
from .embedding import EmbeddingSpace, EmbeddingSpec


__all__ = ["CONFIG_NAME", "HUB_KWARGS", "ROUTER_NAME", "TARGET_SAMPLES", "base_fingerprint", "check_targets",
           "load_experts", "read_experts_config", "save_experts", "target_fingerprint"]

logger = get_logger(__name__)

CONFIG_NAME = "experts_config.json"
ROUTER_NAME = "router.safetensors"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT reads, in its order
FORMAT = "hf_compress_experts"
FORMAT_VERSION = 2  # 2: the integrity record also covers the adapters' configs and the routing fields


def _plain(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def base_fingerprint(model, spec: EmbeddingSpec) -> dict[str, Any]:
    """Shape and four-number fingerprints of the weights the routing depends on (base weights only, LoRA
    excluded).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model = tiny_model("llama")[0]
        >>> sorted(base_fingerprint(model, EmbeddingSpec.for_model(model)))
        ['block_weight', 'embeddings', 'hidden_size', 'model_type', 'num_blocks', 'vocab_size']
    """
    plain = _plain(model)
    _, blocks = find_decoder_blocks(plain)
    block = blocks[spec.layer]
    block_weight = next((p for name, p in block.named_parameters() if p.dim() == 2 and "lora_" not in name), None)
    if block_weight is None:  # a packed block keeps its linear weights as codes: the first one, dequantized
        block_weight = next(module.weight for module in block.modules() if isinstance(module, PackedLinear))
    embeddings = plain.get_input_embeddings().weight
    config = getattr(plain.config, "text_config", None) or plain.config
    return {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": int(embeddings.shape[1]),
        "vocab_size": int(embeddings.shape[0]),
        "num_blocks": len(blocks),
        "embeddings": weight_fingerprint(embeddings).tolist(),
        "block_weight": weight_fingerprint(block_weight).tolist(),
    }


TARGET_SAMPLES = 8
"""Elements recorded per adapted base weight (evenly spaced over the flattened weight)."""
# A bf16 copy of a float32 weight is within half a bf16 ulp (2**-8 relative), a float16 copy within 2**-11: a bf16
# save loaded onto a float16 copy of the base differs by up to their sum. Weights moved further (by a fine-tune of
# the base, say) are refused.
_TARGET_RTOL = 2.0 ** -7
_TARGET_ATOL = 1e-7  # float16 subnormals


def _samples(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, min(TARGET_SAMPLES, flat.numel()), device="cpu").round().long()
    return flat[index.to(flat.device)].float().cpu()


def target_fingerprint(model) -> dict[str, list[float]]:
    """A few elements of the base weight of every layer PEFT wrapped in ``model`` (a ``PeftModel``), by the
    layer's name in the base model: what :func:`check_targets` compares on another base model.

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> from hf_compress.assets import tiny_model
        >>> peft_model = get_peft_model(tiny_model("llama")[0], LoraConfig(r=2, target_modules=["q_proj"]))
        >>> sorted(target_fingerprint(peft_model))
        ['model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj']
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = {}
    for name, module in _plain(model).named_modules():
        if isinstance(module, BaseTunerLayer):
            weight = getattr(module.get_base_layer(), "weight", None)
            if isinstance(weight, torch.Tensor) and weight.device.type != "meta":  # offloaded (accelerate): unread
                found[name] = [float(f"{value:.9g}") for value in _samples(weight).tolist()]
    return found


def check_targets(saved: dict[str, list[float]], base_model, folder: str) -> None:
    """Refuse ``base_model`` unless each recorded layer exists with the recorded elements (to 2**-7 relative)."""
    for name, values in saved.items():
        try:
            weight = base_model.get_submodule(name).weight
        except AttributeError:
            weight = None
        if isinstance(weight, torch.Tensor) and weight.device.type == "meta":
            continue  # offloaded by accelerate: its values are not in memory to compare
        recorded = torch.tensor(values, dtype=torch.float32, device="cpu")
        current = _samples(weight) if isinstance(weight, torch.Tensor) and weight.numel() else None
        if current is None or current.shape != recorded.shape or not bool(
                ((current - recorded).abs() <= _TARGET_ATOL + _TARGET_RTOL * torch.maximum(current.abs(),
                                                                                         recorded.abs())).all()):
            what = "has no such weight" if current is None else "has other weights"
            raise ValueError(
                f"The experts in {folder} were trained on another base model: the given model {what} at {name}, a "
                "layer the experts adapt (a fine-tune, a quantized copy or another checkpoint of the same "
                "architecture?); load the base model they were trained on and pass it as base_model (hf-compress "
                "experts route: --base).")


def _check_fingerprint(saved: dict[str, Any], current: dict[str, Any], folder: str) -> None:
    shapes = ("model_type", "hidden_size", "vocab_size", "num_blocks")
    differs = [k for k in shapes if saved.get(k) != current.get(k)]
    differs += [k for k in ("embeddings", "block_weight")
                if not fingerprints_match(torch.tensor(saved[k], device="cpu"), torch.tensor(current[k], device="cpu"))]
    if differs:
        raise ValueError(
            f"The experts in {folder} were trained on another base model ({', '.join(differs)} differ: saved "
            f"{ {k: saved.get(k) for k in differs} }, given { {k: current.get(k) for k in differs} }); load the "
            "base model they were trained on and pass it as base_model (hf-compress experts route: --base)."
        )


# ---------------------------------------------------------------------------------------------- saving


@main_process_only("save_dir")
def save_experts(router, save_dir, *, overwrite: bool = False, metrics=(), model_name: str | None = None,
                 repo_id: str | None = None) -> Path:
    """Write ``router`` to ``save_dir`` atomically (see the module docstring for the layout)."""
    if "default" in router.adapter_names:
        # PEFT saves an adapter named "default" at the folder's root, not in its own folder.
        raise ValueError('An expert adapter named "default" cannot be saved in its own folder; load or add it under '
                         'another name (e.g. model.add_adapter("expert_0", config)) before saving.')
    check_save_dir(save_dir, overwrite)
    model = router.model
    base_model = hub_model_id(getattr(_plain(model), "name_or_path", None))
    # A reference base model's GGUF origin: recorded when the experts were trained, else the base model's own.
    base_weights = router.info.get("base_weights") or base_weights_of(_plain(model).config)
    settings = dict(router.info.get("config") or {})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hf_compress_version": __version__,
        "base_model": base_model,
        "base_model_fingerprint": {**base_fingerprint(model, router.spec), "targets": target_fingerprint(model)},
        **({"base_weights": base_weights} if base_weights else {}),
        "experts": router.adapter_names,
        "embedding": router.spec.to_dict(),
        "routing": "nearest centroid by cosine similarity of standardised, L2-normalised embeddings",
        **{k: v for k, v in router.info.items() if k not in ("format", "experts", "embedding", "base_model",
                                                               "base_model_fingerprint", "format_version",
                                                               "hf_compress_version", "routing", "integrity",
                                                               "base_weights")},
    }
    name = model_name or f"{str(base_model or 'model').rpartition('/')[2]}-{router.num_experts}-experts"
    # peft records the base model's name_or_path, maybe a local folder: record the Hub id or nothing.
    previous = {n: model.peft_config[n].base_model_name_or_path for n in router.adapter_names}
    try:
        for n in router.adapter_names:
            model.peft_config[n].base_model_name_or_path = base_model
        with atomic_directory(save_dir, overwrite=overwrite) as staging, _compat.third_party_warnings_silenced():
            # The base embeddings are never changed (no resize): save_embedding_layers="auto" would only look
            # the base model up on the Hub (a warning offline) to find that out.
            model.save_pretrained(staging, selected_adapters=router.adapter_names, save_embedding_layers=False)
            save_file({"centroids": router.centroids.contiguous(), "mean": router.space.mean.contiguous(),
                       "std": router.space.std.contiguous()}, str(staging / ROUTER_NAME))
            config["integrity"] = _digests(staging, config)
            with atomic_file(staging / CONFIG_NAME, "w", encoding="utf-8") as handle:
                json.dump(config, handle, indent=2, sort_keys=False)
                handle.write("\n")
            recipe = _recipe(config, settings)
            repo_id = repo_id or name
            for index, adapter in enumerate(router.adapter_names):
                write_model_card(staging / adapter, _expert_card(base_model, name, repo_id, adapter, index, recipe,
                                                                 base_weights))
            write_model_card(staging, _folder_card(base_model, name, repo_id, recipe, metrics, base_weights,
                                                   router.adapter_names[0]))
    finally:
        for n, value in previous.items():
            model.peft_config[n].base_model_name_or_path = value
    logger.info("saved %d experts and the router to %s", router.num_experts, save_dir)
    return Path(save_dir)


def _weight_files(names: list[str]) -> list[str]:
    """The safetensors files of an expert folder, relative to it: the router, then each adapter's weights."""
    return [ROUTER_NAME, *(f"{name}/{ADAPTER_WEIGHTS[0]}" for name in names)]


def _digests(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Every tensor's digest, per weight file that exists (an adapter PEFT saved as .bin has none), the sha256 of
    every adapter's ``adapter_config.json`` (its scaling and targets change the answers as much as its weights),
    and of the fields that map centroids to adapters and embed the queries."""
    names = config["experts"]
    files = {}
    for relative in _weight_files(names):
        if (folder / relative).is_file():
            with CheckpointReader([folder / relative]) as reader:
                files[relative] = reader.digests()
    configs = {f"{name}/adapter_config.json": _sha256(folder / name / "adapter_config.json") for name in names}
    return {"algorithm": DIGEST_ALGORITHM, "files": files, "configs": configs, "routing": _routing_digest(config)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _routing_digest(config: dict[str, Any]) -> str:
    fields = {key: config.get(key) for key in ("experts", "embedding")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _verify_digests(folder: Path, config: dict[str, Any], where: str, damaged: str) -> None:
    """Compare each recorded file and the routing fields with their digests (format 1 recorded the weights only,
    and a folder saved before that, nothing)."""
    integrity = config.get("integrity")
    version = int(config.get("format_version", 0))
    if integrity is None and version < 2:
        return
    if not isinstance(integrity, dict) or not isinstance(integrity.get("files"), dict) or (
            version >= 2 and not (isinstance(integrity.get("configs"), dict) and "routing" in integrity)):
        raise ValueError(f"{where}: {CONFIG_NAME} has a missing or malformed 'integrity' record; {damaged}")
    if integrity.get("algorithm") != DIGEST_ALGORITHM:
        raise ValueError(f"{where}: its checksums use {integrity.get('algorithm')!r}, this hf_compress knows "
                         f"{DIGEST_ALGORITHM!r}; upgrade hf_compress (pip install -U hf-compress).")
    for relative, recorded in integrity["files"].items():
        if not isinstance(recorded, dict):
            raise ValueError(f"{where}: {CONFIG_NAME} has a malformed 'integrity' record for {relative}; {damaged}")
        try:
            with CheckpointReader([folder / relative]) as reader:
                changed = sorted(set().union(*reader.mismatched_tensors(recorded)))
        except (OSError, CheckpointIntegrityError) as err:
            raise ValueError(f"{where}: cannot read {relative} ({err}); {damaged}") from None
        if changed:
            raise ValueError(f"{where}: {relative} differs from what was saved ({len(changed)} tensor(s) changed, "
                             f"added or missing, e.g. {changed[0]!r}); {damaged}")
    for relative, recorded in (integrity.get("configs") or {}).items():
        path = folder / relative
        if not path.is_file() or _sha256(path) != recorded:
            raise ValueError(f"{where}: {relative} differs from what was saved (or is missing); {damaged}")
    if "routing" in integrity and integrity["routing"] != _routing_digest(config):
        raise ValueError(f"{where}: the experts or embedding fields of {CONFIG_NAME} differ from what was saved; "
                         f"{damaged}")


def _recipe(config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    recipe = {
        "method": ["silversight", "lora"],
        "num_experts": len(config["experts"]),
        "lora": {k: settings[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules") if k in settings},
        "embedding": config["embedding"],
        "routing": config["routing"],
        "cluster_sizes": config.get("cluster_sizes"),
        "clustering": config.get("clustering"),
    }
    if config.get("selection"):
        recipe["selection"] = config["selection"]
    return {k: v for k, v in recipe.items() if v is not None}


_FOLDER_SNIPPET = (
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "from hf_compress.experts import ExpertRouter\n\n"
    'base = AutoModelForCausalLM.from_pretrained("{base_model}")\n'
    'tokenizer = AutoTokenizer.from_pretrained("{base_model}")\n'
    'model = ExpertRouter.from_pretrained("{repo_id}", base_model=base, tokenizer=tokenizer)\n'
    'tokenizer.padding_side = "left"  # generation pads on the left\n'
    'batch = tokenizer(["Question: ...\\nAnswer:"], return_tensors="pt", padding=True)\n'
    "out = model.generate(**batch, max_new_tokens=32)  # each row goes to its nearest expert\n\n"
    "# or one expert alone, as a plain PEFT adapter:\n"
    "from peft import PeftModel\n"
    'expert = PeftModel.from_pretrained(base, "{repo_id}", subfolder="{first_expert}")'
)


def _folder_card(base_model, name, repo_id, recipe, metrics, base_weights=None, first_expert="expert_0"):
    snippet = (_FOLDER_SNIPPET.replace("{base_model}", base_model or "BASE_MODEL").replace("{repo_id}", repo_id)
               .replace("{first_expert}", first_expert))
    return build_model_card(base_model=base_model, model_name=name, repo_id=repo_id, recipe=recipe, metrics=metrics,
                            template="adapter", load_snippet=snippet, base_weights=base_weights)


def _expert_card(base_model, name, repo_id, adapter, index, recipe, base_weights=None):
    snippet = ("from peft import PeftModel\n"
               "from transformers import AutoModelForCausalLM\n\n"
               f'base = AutoModelForCausalLM.from_pretrained("{base_model or "BASE_MODEL"}")\n'
               f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="{adapter}")')
    return build_model_card(base_model=base_model, model_name=f"{name} / {adapter}", repo_id=repo_id,
                            recipe={**recipe, "expert": index}, template="adapter", load_snippet=snippet,
                            base_weights=base_weights)


# ---------------------------------------------------------------------------------------------- loading


def load_experts(cls, path, base_model, *, tokenizer=None, revision: str | None = None, **hub_kwargs: Any):
    """Read a folder written by :func:`save_experts` and attach its experts to ``base_model`` (``hub_kwargs``: as
    :func:`read_experts_config`)."""
    from peft import PeftModel

    if not isinstance(base_model, torch.nn.Module):
        raise InvalidArgumentTypeError(
            f"base_model must be the loaded base model (e.g. AutoModelForCausalLM.from_pretrained(...)), got "
            f"{type(base_model).__name__} {base_model!r:.80}; the folder records its base model's Hub id in "
            f"{CONFIG_NAME} ('base_model').")
    folder, config = read_experts_config(path, revision, **hub_kwargs)  # a wrong path first: the likelier mistake
    if hasattr(base_model, "peft_config"):
        raise ValueError("base_model already carries PEFT adapters; pass the plain base model the experts were "
                         "trained on (e.g. AutoModelForCausalLM.from_pretrained(...)).")
    spec = EmbeddingSpec(**config["embedding"])
    _, blocks = find_decoder_blocks(_plain(base_model))
    if spec.layer >= len(blocks):  # before base_fingerprint indexes that block
        raise ValueError(f"The experts in {path} were trained on another base model (they embed at decoder block "
                         f"{spec.layer}; the given model has {len(blocks)} blocks); load the base model they were "
                         "trained on and pass it as base_model (hf-compress experts route: --base).")
    _check_fingerprint(config["base_model_fingerprint"], base_fingerprint(base_model, spec), str(path))
    # Folders saved before hf_compress recorded the adapted weights have no "targets": the four numbers above only.
    check_targets(config["base_model_fingerprint"].get("targets") or {}, base_model, str(path))
    names = list(config["experts"])
    damaged = "the save is incomplete or damaged; re-save it (ExpertRouter.save_pretrained) or re-download it."
    try:
        tensors = load_file(str(folder / ROUTER_NAME))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{path}: cannot read {ROUTER_NAME} ({err}); {damaged}") from None
    absent = sorted({"centroids", "mean", "std"} - tensors.keys())
    if absent:
        raise ValueError(f"{path}: {ROUTER_NAME} lacks {absent}; {damaged}")
    centroids = tensors["centroids"]
    if len(centroids) != len(names):
        raise ValueError(f"The router of {path} has {len(centroids)} clusters but the folder lists {len(names)} "
                         "experts; every cluster needs exactly one expert. Re-save the experts.")
    width = base_model.config.get_text_config().hidden_size
    if centroids.dim() != 2 or {centroids.shape[1], tensors["mean"].numel(), tensors["std"].numel()} != {width}:
        raise ValueError(f"{path}: the router's centroids / standardisation are not {width} wide (the base model's "
                         f"hidden size; centroids {tuple(centroids.shape)}); {damaged}")
    missing = [name for name in names if not (folder / name / "adapter_config.json").is_file()
               or not any((folder / name / weights).is_file() for weights in ADAPTER_WEIGHTS)]
    if missing:
        raise ValueError(f"{path} lacks the expert folder(s) {missing} (each needs adapter_config.json and "
                         f"{ADAPTER_WEIGHTS[0]}); {damaged}")
    for name in names:  # read every header first: a damaged file must not leave the base half-wrapped by PEFT
        weights = folder / name / ADAPTER_WEIGHTS[0]
        if weights.is_file():
            try:
                with safe_open(str(weights), framework="pt") as handle:
                    handle.keys()
            except (OSError, SafetensorError) as err:
                raise ValueError(f"{path}: cannot read {name}/{weights.name} ({err}); {damaged}") from None
    _verify_digests(folder, config, str(path), damaged)
    try:
        with _compat.third_party_warnings_silenced():
            # Not autocast: PEFT would cast a half-precision base's adapters up to float32 (for training). Without it
            # they take the base's dtype, so a router cast to bf16 and saved comes back with its logits; an expert
            # loaded alone on a half-precision base matches the router's with autocast_adapter_dtype=False too.
            model = PeftModel.from_pretrained(base_model, str(folder / names[0]), adapter_name=names[0],
                                              autocast_adapter_dtype=False)
            for name in names[1:]:
                model.load_adapter(str(folder / name), adapter_name=name, autocast_adapter_dtype=False)
    except BaseException:
        # PEFT wraps the base in place before loading: give the user's model back, then the original error (out of
        # memory, a PEFT version that cannot read the config, ...: the checks above found the files intact).
        strip_lora(base_model)
        raise
    model.eval()
    return cls(model, centroids, EmbeddingSpace(tensors["mean"], tensors["std"]), spec, names,
               tokenizer=tokenizer, info=config)


def strip_lora(model) -> None:
    """Put every PEFT-wrapped layer of ``model`` back to its base layer and drop the config PEFT leaves on it (a
    failed load or training run hands the caller's model back as it came)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    vars(model).pop("peft_config", None)  # it was absent: load_experts and train_experts refuse a PEFT model


HUB_KWARGS = ("subfolder", "token", "cache_dir", "force_download", "local_files_only")
"""The download keywords of ``from_pretrained`` an expert folder takes besides ``revision``."""


def read_experts_config(path, revision: str | None = None, **hub_kwargs: Any) -> tuple[Path, dict[str, Any]]:
    """The local folder (a Hub repo is downloaded) and its checked ``experts_config.json``; no weights are read.

    ``hub_kwargs``: any of :data:`HUB_KWARGS`; ``subfolder`` is the expert folder inside ``path``.

    Example:
        >>> folder, config = read_experts_config("experts/")  # doctest: +SKIP
        >>> config["base_model"], config["experts"]  # doctest: +SKIP
        ('HuggingFaceTB/SmolLM2-135M-Instruct', ['expert_0', 'expert_1', 'expert_2'])
    """
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(f"Unexpected keyword argument(s) {unknown} for loading an expert folder; it takes tokenizer=, "
                        f"revision= and {', '.join(f'{name}=' for name in HUB_KWARGS)}.")
    subfolder = hub_kwargs.pop("subfolder", None) or ""
    folder = _local_folder(path, revision, subfolder, hub_kwargs) / subfolder
    if subfolder and not folder.is_dir():
        raise ValueError(f"{path} has no subfolder {subfolder!r}; pass the subfolder that holds {CONFIG_NAME}.")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{path} is not an expert folder: it has no {CONFIG_NAME} (save one with "
                         "ExpertRouter.save_pretrained or train_experts(...).save_pretrained).")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not an hf_compress expert config (format {config.get('format')!r}).")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer hf_compress (format {config['format_version']}); upgrade.")
    return folder, config


def _local_folder(path, revision: str | None, subfolder: str, download: dict[str, Any]) -> Path:
    if os.path.isdir(path):
        return Path(path)
    name = os.fspath(path)
    if os.path.exists(name):
        raise ValueError(f"{path} is a file; pass the expert folder that holds {CONFIG_NAME}.")
    check_folder_exists(name, "the folder ExpertRouter.save_pretrained (or hf-compress experts train --save-dir) "
                              "wrote, or a Hub repo id (owner/name)", folder="expert folder")
    if name.count("/") != 1:
        raise ValueError(f"{path} is neither an expert folder nor a Hub repo id (owner/name).")
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder.strip('/')}/**"] if subfolder else None  # not the repo's other folders
    return Path(snapshot_download(name, revision=revision, allow_patterns=patterns, **download))
