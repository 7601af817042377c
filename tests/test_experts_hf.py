"""ExpertRouter as a transformers / PEFT user handles a model: pipeline(), device and dtype moves, modes, a saved
folder's round trip and its base-model check, generate() keywords and edge cases, repr and type hints.

A router built by hand in a second (no training): two LoRA adapters with random B matrices on a tiny Llama, one
centroid per task (arithmetic, spelling) in the base model's embedding space, so routing really splits the prompts.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import pipeline

from hf_compress.assets import tiny_model
from hf_compress.experts import EmbeddingSpace, EmbeddingSpec, ExpertRouter, embed_texts


pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["3 + 4 = ", "Spell ABCDE: ", "9 + 1 = ", "Spell QWXYZ: "]
ROUTES = [0, 1, 0, 1]
GREEDY = dict(max_new_tokens=4, do_sample=False)


def _router(seed: int = 0) -> tuple[ExpertRouter, object]:
    model, tokenizer = tiny_model("llama")
    spec = EmbeddingSpec.for_model(model)
    raw = embed_texts(model, tokenizer, PROMPTS, spec, progress=False)
    space = EmbeddingSpace.fit(raw)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, lora, adapter_name="math")
    peft_model.add_adapter("spelling", lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    peft_model.eval()
    tokenizer.padding_side = "left"
    return ExpertRouter(peft_model, space(raw[:2]), space, spec, ["math", "spelling"], tokenizer=tokenizer), tokenizer


@pytest.fixture(scope="module")
def built():
    return _router()


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    router, _ = built
    folder = tmp_path_factory.mktemp("experts-hf") / "experts"
    router.save_pretrained(folder)
    return folder


def _batch(tokenizer, prompts=PROMPTS):
    return tokenizer(prompts, return_tensors="pt", padding=True)


# ------------------------------------------------------------------------------------------------ pipeline()


@contextlib.contextmanager
def _transformers_errors():
    """The error lines transformers logs inside (its loggers do not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        yield records
    finally:
        library.removeHandler(handler)


def test_pipeline_routes_every_prompt_as_generate_does(built):
    router, tokenizer = built
    assert router.route(**_batch(tokenizer)).tolist() == ROUTES
    with _transformers_errors() as errors:
        generator = pipeline("text-generation", model=router, tokenizer=tokenizer)
    # transformers checks the class name against the causal LMs it knows: the router declared itself, no error line
    assert [record.getMessage() for record in errors] == []
    assert generator.model is router and "ExpertRouter" in repr(generator)
    settings = dict(**GREEDY, return_tensors=True)
    alone = []
    for prompt, expert in zip(PROMPTS, ROUTES):
        single = tokenizer([prompt], return_tensors="pt")
        got = generator(prompt, **settings)[0]["generated_token_ids"]
        assert got == router.generate(**single, **GREEDY)[0].tolist()
        # The other expert answers otherwise: the pipeline's prompt went through its own expert.
        assert got != router.generate(**single, experts=[1 - expert], **GREEDY)[0].tolist()
        alone.append(got)
    batched = generator(PROMPTS, batch_size=4, **settings)  # one left-padded batch mixing both experts
    for rows, single in zip(batched, alone, strict=True):
        assert rows[0]["generated_token_ids"][-len(single):] == single
    text = generator(PROMPTS[1], **GREEDY)[0]["generated_text"]
    assert text.startswith(PROMPTS[1])
    with pytest.raises(ValueError, match="nothing to route"):
        generator("", max_new_tokens=2)


def test_the_pipeline_error_line_is_caught_for_a_class_not_declared(built):
    # The check above can fail: a router whose class never ran ExpertRouter.__init__ is reported by transformers.
    router, tokenizer = built
    undeclared = type("UndeclaredRouter", (ExpertRouter,), {})
    stray = undeclared.__new__(undeclared)
    stray.__dict__.update(vars(router))
    with _transformers_errors() as errors:
        pipeline("text-generation", model=stray, tokenizer=tokenizer)
    assert any("'UndeclaredRouter' is not supported for text-generation" in record.getMessage() for record in errors)


# ------------------------------------------------------------------------------------------------ moves and modes


def test_device_and_dtype_moves_and_modes():
    router, tokenizer = _router()
    batch = _batch(tokenizer)
    expected = router.generate(**batch, **GREEDY)
    assert router.to("cpu") is router and router.cpu() is router and router.device == torch.device("cpu")
    assert router.eval() is router and not router.training
    assert router.train(False) is router and not router.training
    with pytest.raises(ValueError, match="inference only"):
        router.train()
    assert not router.training
    assert router.config is router.model.get_base_model().config
    assert router.generation_config is router.model.get_base_model().generation_config
    assert router.can_generate()
    assert torch.equal(router.generate(**batch, **GREEDY), expected)  # the moves above changed nothing
    assert router.to(torch.bfloat16) is router and router.dtype == torch.bfloat16
    assert {p.dtype for p in router.model.parameters()} == {torch.bfloat16}
    assert router.centroids.dtype == torch.float32  # routing compares float32 embeddings on the CPU
    assert router.route(**batch).tolist() == ROUTES
    out = router.generate(**batch, **GREEDY)
    assert out.shape == expected.shape and torch.equal(out[:, : batch.input_ids.shape[1]], batch.input_ids)


# ------------------------------------------------------------------------------------------------ saved folders


def test_round_trip_in_either_argument_order_generates_the_same(built, saved, fake_hub):
    router, tokenizer = built
    batch = _batch(tokenizer)
    expected = router.generate(**batch, **GREEDY)
    loaded = [ExpertRouter.from_pretrained(saved, tiny_model("llama")[0], tokenizer=tokenizer),
              ExpertRouter.from_pretrained(tiny_model("llama")[0], saved, tokenizer=tokenizer)]  # PEFT's order
    router.push_to_hub("me/tiny-experts-hf")
    loaded.append(ExpertRouter.from_pretrained(tiny_model("llama")[0], "me/tiny-experts-hf", tokenizer=tokenizer))
    for other in loaded:
        assert other.route(**batch).tolist() == ROUTES
        assert torch.equal(other.generate(**batch, **GREEDY), expected)
    assert fake_hub.unhandled == []
    with pytest.raises(TypeError, match="must be the loaded base model"):
        ExpertRouter.from_pretrained(saved, "HuggingFaceTB/SmolLM2-135M")


def test_a_subfolder_and_the_download_keywords_load_as_peft_takes_them(built, saved, fake_hub, tmp_path):
    from fake_hub import FAKE_TOKEN
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    router, tokenizer = built
    batch = _batch(tokenizer)
    HfApi().create_repo("me/several-artifacts")
    HfApi().upload_folder(repo_id="me/several-artifacts", folder_path=str(saved), path_in_repo="experts")
    HfApi().upload_file(repo_id="me/several-artifacts", path_or_fileobj=b"x" * 64, path_in_repo="other/big.bin")
    cache = tmp_path / "cache"
    loaded = ExpertRouter.from_pretrained("me/several-artifacts", tiny_model("llama")[0], tokenizer=tokenizer,
                                          subfolder="experts", cache_dir=str(cache), token=FAKE_TOKEN)
    assert loaded.route(**batch).tolist() == ROUTES
    assert not list(cache.rglob("big.bin"))  # only the subfolder is downloaded
    with pytest.raises(HfHubHTTPError, match="401"):  # the token reaches the Hub
        ExpertRouter.from_pretrained("me/several-artifacts", tiny_model("llama")[0], subfolder="experts",
                                     token="hf_wrong", cache_dir=str(tmp_path / "empty-cache"))
    local = ExpertRouter.from_pretrained(saved.parent, tiny_model("llama")[0], tokenizer=tokenizer,
                                         subfolder=saved.name)
    assert local.route(**batch).tolist() == ROUTES
    assert fake_hub.unhandled == []
    with pytest.raises(ValueError, match="has no subfolder 'nope'"):
        ExpertRouter.from_pretrained(saved.parent, tiny_model("llama")[0], subfolder="nope")
    with pytest.raises(TypeError, match=r"Unexpected keyword argument\(s\) \['adapter_name'\].*subfolder="):
        ExpertRouter.from_pretrained(saved, tiny_model("llama")[0], adapter_name="x")


def test_a_fine_tuned_or_partly_different_base_is_refused(saved, tmp_path):
    def refused(base):
        with pytest.raises(ValueError, match="trained on another base model.*model.layers.*proj"):
            ExpertRouter.from_pretrained(saved, base)
        assert not hasattr(base, "peft_config")  # refused before PEFT touched it

    fine_tuned = tiny_model("llama")[0]  # every weight moved by ~2%: embeddings and block norms barely change
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in fine_tuned.parameters():
            parameter.mul_(1 + 0.02 * torch.randn(parameter.shape, generator=generator))
    refused(fine_tuned)
    other_block = tiny_model("llama")[0]  # block 1 (adapted, not the routing block 0) from another checkpoint
    with torch.no_grad():
        other_block.model.layers[1].load_state_dict(tiny_model("llama", seed=1)[0].model.layers[1].state_dict())
    refused(other_block)
    # Copies of the base in bf16 / fp16 are the same base.
    for dtype in (torch.bfloat16, torch.float16):
        ExpertRouter.from_pretrained(saved, tiny_model("llama")[0].to(dtype))
    # A folder saved before the adapted weights were recorded loads as before (the coarse check only).
    import shutil

    old = tmp_path / "old"
    shutil.copytree(saved, old)
    config = json.loads((old / "experts_config.json").read_text())
    assert set(config["base_model_fingerprint"]["targets"]) == {
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"}
    del config["base_model_fingerprint"]["targets"]
    (old / "experts_config.json").write_text(json.dumps(config))
    ExpertRouter.from_pretrained(old, fine_tuned)


# ------------------------------------------------------------------------------------------------ generate()


def test_generate_keywords_and_edge_cases_as_model_generate(built):
    router, tokenizer = built
    batch = _batch(tokenizer)
    model = router.model
    # PEFT's adapter_names= names the experts, as experts= indexes them (it used to be dropped on the stacked path
    # and to collide with the router's own on PEFT's path).
    by_index = router.generate(**batch, experts=[1, 1, 0, 0], **GREEDY)
    assert not torch.equal(by_index, router.generate(**batch, **GREEDY))
    for path in ("stacked", "peft"):
        router.mixed_batch = path
        try:
            names = ["spelling", "spelling", "math", "math"]
            assert torch.equal(router.generate(**batch, adapter_names=names, **GREEDY), by_index)
            with torch.no_grad():
                torch.testing.assert_close(router(**batch, adapter_names=names).logits,
                                           router(**batch, experts=[1, 1, 0, 0]).logits, rtol=1e-5, atol=1e-5)
        finally:
            router.mixed_batch = "stacked"
    with pytest.raises(ValueError, match=r"\['__base__'\] are not experts of this router"):
        router.generate(**batch, adapter_names=["math", "__base__", "math", "math"], **GREEDY)
    with pytest.raises(TypeError, match="not both"):
        router.generate(**batch, experts=[0] * 4, adapter_names=["math"] * 4, **GREEDY)
    # Scores come back per row as from each row's expert alone.
    out = router.generate(**batch, return_dict_in_generate=True, output_scores=True, **GREEDY)
    assert torch.equal(out.sequences, router.generate(**batch, **GREEDY)) and len(out.scores) == 4
    for row, expert in enumerate(ROUTES):
        model.set_adapter(router.adapter_names[expert])
        alone = model.generate(input_ids=batch.input_ids[row:row + 1], attention_mask=batch.attention_mask[row:row + 1],
                               return_dict_in_generate=True, output_scores=True, **GREEDY)
        for step in range(4):
            torch.testing.assert_close(out.scores[step][row], alone.scores[step][0], rtol=1e-4, atol=1e-4)
    model.set_adapter(router.adapter_names[0])
    # Inputs that cannot be routed are refused with what to do, before any forward.
    empty = torch.zeros(0, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="no rows"):
        router.generate(input_ids=empty, attention_mask=empty, **GREEDY)
    with pytest.raises(ValueError, match="prompts are empty"):
        router.generate(**tokenizer([""], return_tensors="pt"), **GREEDY)
    with pytest.raises(ValueError, match="nothing to route"):
        router.generate(**GREEDY)
    with pytest.raises(TypeError, match=r"\[batch, length\]"):
        router.generate(batch.input_ids[0], **GREEDY)


# ------------------------------------------------------------------------------------------------ repr and hints


def test_repr_says_what_the_router_is_and_public_methods_are_annotated(built):
    router, _ = built
    text = repr(router)
    assert text.startswith("ExpertRouter(2 experts ['math', 'spelling'] on LlamaForCausalLM")
    assert "decoder block 0 of 2" in text and "mixed batches 'stacked'" in text and "torch.float32 on cpu" in text
    for name, member in inspect.getmembers(ExpertRouter):
        if name.startswith("_") and name not in ("__init__", "__call__"):
            continue
        function = member.fget if isinstance(member, property) else member
        if not inspect.isfunction(function) and not inspect.ismethod(function):
            continue
        signature = inspect.signature(function)  # a classmethod comes bound: no cls
        assert signature.return_annotation is not inspect.Signature.empty, name
        parameters = list(signature.parameters.values())[0 if inspect.ismethod(function) else 1:]
        unannotated = [p.name for p in parameters if p.annotation is inspect.Parameter.empty]
        assert not unannotated, (name, unannotated)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_router_cast_to_half_precision_comes_back_with_its_logits(dtype, tmp_path):
    """PEFT loads adapters cast up to float32 by default: a router saved in bf16 reloaded with other logits."""
    router, tokenizer = _router()
    router.to(dtype)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = router(**batch).logits
    router.save_pretrained(tmp_path / "experts")
    loaded = ExpertRouter.from_pretrained(tmp_path / "experts", tiny_model("llama")[0].to(dtype))
    assert {p.dtype for n, p in loaded.model.named_parameters() if "lora_" in n} == {dtype}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
