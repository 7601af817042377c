"""hf_compress.experts (SilverSight / ASSL): selection, clustering, routing, PEFT mixed batches, saving.

Tiny random models; one set of experts is trained (through ``Trainer``) once per module and shared. The
few training steps leave LoRA's B matrices near zero, so the shared experts get random B matrices after
training: every expert then really changes the model's outputs, and the equality tests below could fail.
"""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import TrainingArguments

from hf_compress import _compat
from hf_compress.assets import tiny_model, tiny_tokenizer
from hf_compress.experts import (
    ExpertConfig,
    ExpertRouter,
    completion_losses,
    coverage,
    embed_texts,
    packed_instruction_dataset,
    instruction_rows,
    select_data,
    select_indices,
)
from hf_compress.experts.clustering import assign, kmeans
from hf_compress.experts.embedding import EmbeddingSpec, default_embedding_layer, embed_batch, embed_texts
from hf_compress.experts.joint import JointExpertsTrainingModule, rows_through_experts
from hf_compress.experts import training as training_module
from hf_compress.experts.training import split_steps, train_experts
from hf_compress.training import TrainingSettings


def _clustered(sizes=(300, 80, 30, 12, 6), dim=16, noise=0.15, seed=0):
    """Unit vectors around ``len(sizes)`` random centres, imbalanced; returns (embeddings, cluster labels)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(len(sizes), dim, generator=generator), dim=1)
    points, labels = [], []
    for index, size in enumerate(sizes):
        points.append(centres[index] + noise * torch.randn(size, dim, generator=generator))
        labels += [index] * size
    return torch.nn.functional.normalize(torch.cat(points), dim=1), torch.tensor(labels)


# Two tasks that look nothing alike, byte-level: digits arithmetic vs. upper-case words.
def _task_rows(count: int, offset: int = 0) -> tuple[list[dict], list[int]]:
    rows, tasks = [], []
    for i in range(offset, offset + count):
        rows.append({"prompt": f"{i % 10} + {(3 * i) % 10} = ", "completion": f"{(i % 10) + (3 * i) % 10}"})
        tasks.append(0)
        word = "".join(chr(65 + (i * 7 + j) % 26) for j in range(5))
        rows.append({"prompt": f"Spell {word}: ", "completion": " ".join(word)})
        tasks.append(1)
    return rows, tasks


# ---------------------------------------------------------------------------------------------- selection


def test_selection_keeps_budget_is_deterministic_and_covers_better_than_random():
    x, labels = _clustered()
    count = round(0.1 * len(x))
    chosen = select_indices(x, count)
    assert len(chosen) == count == len(set(chosen)) and chosen == sorted(chosen)
    assert select_indices(x, count) == chosen
    # The random baseline is deterministic for a seed and differs across seeds.
    assert select_indices(x, count, "random", seed=3) == select_indices(x, count, "random", seed=3)
    assert select_indices(x, count, "random", seed=3) != select_indices(x, count, "random", seed=4)
    mean_fl, max_fl = coverage(x, chosen)
    random_means = [coverage(x, select_indices(x, count, "random", seed))[0] for seed in range(5)]
    # Facility location serves the average example clearly better than any of 5 random subsets ...
    assert mean_fl < 0.85 * min(random_means)
    # ... and, unlike a random 10%, it keeps a representative of even the smallest cluster (6 of 428 rows).
    assert set(labels[chosen].tolist()) == set(range(5))
    # k-center greedy minimises the worst distance instead.
    assert coverage(x, select_indices(x, count, "k_center"))[1] <= max_fl + 1e-6
    # Duplicates add nothing: 3 copies of 2 points, budget 2 -> one of each.
    twins = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3), dim=1)
    assert sorted(x // 3 for x in select_indices(twins, 2)) == [0, 1]
    # More kept rows than distinct points: every method still keeps distinct rows, exactly the budget.
    for method in ("facility_location", "k_center", "random"):
        assert sorted(select_indices(twins, 5, method)) == sorted(set(select_indices(twins, 5, method)))
        assert len(select_indices(twins, 5, method)) == 5


def test_given_embeddings_must_be_finite_and_as_wide_as_the_routing_space():
    """A NaN row made the selection loop forever; a narrower space trained experts whose folder never loaded."""
    model, tokenizer = tiny_model("llama")
    rows, _ = _task_rows(6)
    embeddings = torch.randn(len(rows), model.config.hidden_size)
    embeddings[3, 0] = float("nan")
    for method in ("facility_location", "k_center"):
        with pytest.raises(ValueError, match="embeddings row 3 holds NaN or inf"):
            select_data(rows, model, budget=0.5, tokenizer=tokenizer, embeddings=embeddings, method=method)
    with pytest.raises(ValueError, match="embeddings row 3 holds NaN"):
        train_experts(model, rows, ExpertConfig(num_experts=2), tokenizer=tokenizer, embeddings=embeddings)
    with pytest.raises(ValueError, match=r"embeddings are 3 wide, but the router embeds queries .* \(64 wide\)"):
        train_experts(model, rows, ExpertConfig(num_experts=2), tokenizer=tokenizer, embeddings=torch.rand(12, 3))


def test_a_routed_base_is_refused_up_front():
    """It failed deep inside: the routing's left-padding check (with padding_side='left' set)."""
    from hf_compress.routing.layer import install_routing
    from hf_compress.routing.schedule import RoutingSchedule

    rows, _ = _task_rows(4)
    model, tokenizer = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.5, 0.5]), mode="static")
    with pytest.raises(ValueError, match="The model is token-routed: train the experts on the model it was routed from"):
        train_experts(model, rows, ExpertConfig(num_experts=2), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="The model is token-routed: select with the model it was routed from"):
        select_data(rows, model, budget=0.5, tokenizer=tokenizer)


def test_experts_train_on_a_packed_base_and_load_onto_it_only(tmp_path):
    """LoRA adapts packed layers (quantization/packed_lora.py): the experts train over the frozen codes, mixed batches
    equal each row's own expert, and the folder's fingerprint is the packed base's."""
    from hf_compress.quantization import quantize_rtn

    rows, _ = _task_rows(16)
    model, tokenizer = tiny_model("llama")
    packed = quantize_rtn(model, bits=4, group_size=32)
    router = _two_experts(packed, tokenizer, rows, steps=2)
    prompts = [row["prompt"] for row in rows[:6]]
    routes = router.route_texts(prompts).tolist()
    assert sorted(set(routes)) == [0, 1]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    mixed = router.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
    for row, (prompt, expert) in enumerate(zip(prompts, routes)):
        router.model.set_adapter(router.adapter_names[expert])
        alone = router.model.generate(**tokenizer([prompt], return_tensors="pt"), max_new_tokens=4, do_sample=False)
        assert alone[0, -4:].tolist() == mixed[row].tolist()
    router.save_pretrained(tmp_path / "experts")
    loaded = ExpertRouter.from_pretrained(tmp_path / "experts", quantize_rtn(tiny_model("llama")[0], bits=4,
                                                                             group_size=32), tokenizer=tokenizer)
    assert loaded.route_texts(prompts).tolist() == routes
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, router(**batch).logits)
    with pytest.raises(ValueError, match="a quantized copy"):  # the float model the codes came from is another base
        ExpertRouter.from_pretrained(tmp_path / "experts", tiny_model("llama")[0], tokenizer=tokenizer)


def test_embedding_inputs_of_the_wrong_kind_are_named():
    model, tokenizer = tiny_model("llama")
    rows, _ = _task_rows(3)
    with pytest.raises(ValueError, match="batch_size must be"):  # was range()'s "arg 3 must not be zero"
        select_data(rows, model, budget=0.5, tokenizer=tokenizer, batch_size=0)
    spec = EmbeddingSpec.for_model(model)
    with pytest.raises(TypeError, match=r"texts\[0\] is a dict \(pass each row's prompt text\)"):
        embed_texts(model, tokenizer, [{"prompt": "x"}], spec)


def test_select_data_on_a_dataset():
    model, tokenizer = tiny_model("llama")
    rows, _ = _task_rows(15)
    dataset = Dataset.from_list(rows)
    subset, report = select_data(dataset, model, budget=0.2, tokenizer=tokenizer, return_report=True)
    assert len(subset) == report.kept == 6 and report.pool_size == 30
    assert [subset[i]["prompt"] for i in range(6)] == [rows[i]["prompt"] for i in report.indices]
    assert json.loads(subset.info.description)["hf_compress_selection"]["kept"] == 6
    again = select_data(dataset, model, budget=0.2, tokenizer=tokenizer)
    assert again["prompt"] == subset["prompt"]
    assert len(select_data(rows, model, budget=1.0, tokenizer=tokenizer)) == 30
    assert len(select_data(rows, model, budget=0.001, tokenizer=tokenizer)) == 1


def test_weighted_selection_covers_what_is_worth_covering():
    x, labels = _clustered()
    count = round(0.1 * len(x))
    # Uniform weights are the unweighted objective, whatever their scale.
    assert select_indices(x, count, weights=torch.full((len(x),), 3.0)) == select_indices(x, count)
    # Weight only the two smallest clusters: every pick serves them, none the big cluster that dominates unweighted.
    worth = (labels >= 3).float()
    chosen = select_indices(x, 8, weights=worth)
    assert set(labels[chosen].tolist()) <= {3, 4} and {3, 4} <= set(labels[chosen].tolist())
    assert 0 in set(labels[select_indices(x, 8)].tolist())
    with pytest.raises(ValueError, match="one per example"):
        select_indices(x, count, weights=torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        select_indices(x, count, weights=-torch.ones(len(x)))
    with pytest.raises(ValueError, match="facility_location"):
        select_indices(x, count, "k_center", weights=torch.ones(len(x)))


def test_completion_losses_score_the_completion_and_eos_as_training_does():
    model, tokenizer = tiny_model("llama")
    rows = [{"prompt": "Q: 12 + 30?\nA:", "completion": " 42"}, {"prompt": "Spell CAT:", "completion": " C A T"}]
    losses = completion_losses(model, tokenizer, rows, progress=False)
    # The same numbers from the packed training window's labels and the model's own loss, one row at a time.
    for row, loss in zip(rows, losses):
        packed = packed_instruction_dataset(instruction_rows([row]), tokenizer, seq_len=64)[0]
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([packed["input_ids"]]), labels=torch.tensor([packed["labels"]])).loss
        assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    # Batched with other lengths (padding) changes nothing.
    alone = completion_losses(model, tokenizer, rows[1:], progress=False)
    assert float(alone[0]) == pytest.approx(float(losses[1]), rel=1e-4)


def test_select_data_weighted_by_loss_records_it():
    model, tokenizer = tiny_model("llama")
    rows, _ = _task_rows(15)
    subset, report = select_data(rows, model, budget=0.2, tokenizer=tokenizer, weights="loss", return_report=True)
    assert len(subset) == report.kept == 6 and report.weighting == "loss"
    losses = completion_losses(model, tokenizer, rows, progress=False)
    given = select_data(rows, model, budget=0.2, tokenizer=tokenizer, weights=losses, return_report=True)[1]
    assert given.indices == report.indices and given.weighting == "given"
    with pytest.raises(ValueError, match="weights must be one of"):
        select_data(rows, model, budget=0.2, tokenizer=tokenizer, weights="entropy")


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, float("nan"), "0%", "150%", "half"])
def test_select_data_refuses_bad_budgets(budget):
    model, tokenizer = tiny_model("llama")
    with pytest.raises(ValueError, match="budget must be a number in \\(0, 1\\]"):
        select_data(["a", "b"], model, budget=budget, tokenizer=tokenizer)


def test_select_data_reads_a_percentage_budget():
    model, tokenizer = tiny_model("llama")
    texts = [f"example number {i}" for i in range(20)]
    assert select_data(texts, model, budget="25%", tokenizer=tokenizer) == select_data(
        texts, model, budget=0.25, tokenizer=tokenizer)
    assert len(select_data(texts, model, budget="100%", tokenizer=tokenizer)) == 20


def test_bad_datasets_are_refused():
    with pytest.raises(ValueError, match="needs `prompt` and `completion` columns"):
        instruction_rows(Dataset.from_list([{"question": "q"}]))
    with pytest.raises(ValueError, match="is empty"):
        instruction_rows([])
    with pytest.raises(TypeError, match="must be a string"):
        instruction_rows([{"prompt": "a", "completion": 3}])


# ---------------------------------------------------------------------------------------------- clustering


def test_kmeans_recovers_hand_built_clusters_and_routes_queries():
    x, labels = _clustered(sizes=(40, 30, 20, 10), noise=0.1)
    result = kmeans(x, 4, seed=3)
    assert sorted(result.sizes()) == [10, 20, 30, 40]
    # Each k-means cluster is exactly one hand-built cluster.
    mapping = {int(c): int(labels[result.labels == c].unique().item()) for c in range(4)}
    assert sorted(mapping.values()) == [0, 1, 2, 3]
    assert kmeans(x, 4, seed=3).labels.tolist() == result.labels.tolist()
    # Fresh queries near a cluster's centre route to that cluster's centroid.
    queries, truth = _clustered(sizes=(5, 5, 5, 5), noise=0.1, seed=0)
    queries = torch.nn.functional.normalize(queries + 0.02 * torch.randn(queries.shape, generator=torch.Generator().manual_seed(9)), dim=1)
    routed = [mapping[int(c)] for c in assign(queries, result.centroids)]
    assert routed == truth.tolist()


def test_kmeans_refuses_too_many_clusters():
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4), dim=1)
    with pytest.raises(ValueError, match="fewer than 3 distinct examples"):
        kmeans(x, 3)
    with pytest.raises(ValueError, match="Cannot make 9 clusters from 8 examples"):
        kmeans(x, 9)


def test_split_steps_and_packing():
    assert split_steps(10, [5, 3, 2]) == [5, 3, 2] and sum(split_steps(7, [10, 1, 1])) == 7
    assert split_steps(2, [1, 1, 1]) == [1, 1, 1]
    _, tokenizer = tiny_model("llama")
    rows = instruction_rows([{"prompt": "ab", "completion": "cd"}, {"prompt": "ef", "completion": "gh"}])
    data = packed_instruction_dataset(rows, tokenizer, seq_len=8)
    ids = sum(data["input_ids"], [])
    labels = sum(data["labels"], [])
    assert all(len(row) == 8 for row in data["input_ids"])
    # the loss is on completions and EOS only: 2 x (2 completion bytes + EOS)
    assert sum(label != -100 for label in labels) == 6
    assert tokenizer.decode([i for i, label in zip(ids, labels) if label != -100 and i != tokenizer.eos_token_id]) in ("cdgh", "ghcd")


@pytest.mark.parametrize(("blocks", "layer"), [(1, 0), (2, 0), (3, 0), (4, 1), (18, 2), (30, 4), (32, 4), (36, 5)])
def test_default_embedding_layer_is_an_eighth_of_the_way_up(blocks, layer):
    assert default_embedding_layer(blocks) == layer


def test_embedding_ignores_padding_side():
    model, tokenizer = tiny_model("llama")
    spec = EmbeddingSpec.for_model(model)
    texts = ["short", "a somewhat longer prompt"]
    alone = torch.cat([embed_batch(model, tokenizer(t, return_tensors="pt").input_ids, None, spec) for t in texts])
    for side in ("left", "right"):
        tokenizer.padding_side = side
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        torch.testing.assert_close(embed_batch(model, batch.input_ids, batch.attention_mask, spec), alone)
    torch.testing.assert_close(embed_texts(model, tokenizer, texts, spec, progress=False), alone)


# ---------------------------------------------------------------------------------------------- experts


def _two_experts(model, tokenizer, rows, steps: int) -> ExpertRouter:
    """Two experts trained on ``rows`` for ``steps``, given random LoRA B matrices so that routing shows in outputs."""
    settings = TrainingSettings(max_steps=steps, per_device_batch_size=2, learning_rate=1e-3, logging_steps=2,
                                use_cpu=True)
    router = train_experts(model, Dataset.from_list(rows), ExpertConfig(num_experts=2, r=4, seq_len=32),
                           args=settings, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in router.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return router


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two experts trained on two distinct tasks (tiny Llama), given random LoRA B matrices, and saved."""
    model, tokenizer = tiny_model("llama")
    rows, tasks = _task_rows(16)
    router = _two_experts(model, tokenizer, rows, steps=4)
    folder = tmp_path_factory.mktemp("experts") / "experts"
    router.save_pretrained(folder)
    return router, tokenizer, rows, tasks, folder


def test_training_clusters_tasks_and_routes_held_out_queries(trained):
    router, tokenizer, rows, tasks, _ = trained
    info = router.info
    assert info["training"]["total_steps"] == 4 and sum(info["cluster_sizes"]) == len(rows)
    assert router.model.active_adapters and not router.model.training
    train_routes = router.route_texts([row["prompt"] for row in rows]).tolist()
    expert_of_task = {t: max(set(r for r, tt in zip(train_routes, tasks) if tt == t),
                             key=[r for r, tt in zip(train_routes, tasks) if tt == t].count) for t in (0, 1)}
    assert expert_of_task[0] != expert_of_task[1]
    held_out, held_tasks = _task_rows(6, offset=100)
    routes = router.route_texts([row["prompt"] for row in held_out]).tolist()
    assert routes == [expert_of_task[t] for t in held_tasks]


def test_mixed_batch_generate_equals_each_row_alone(trained):
    router, tokenizer, _, _, _ = trained
    prompts = ["3 + 4 = ", "Spell ABCDE: ", "Spell QWXYZ: ", "9 + 1 = "]
    experts = [0, 1, 1, 0]
    prompts = [p.ljust(13) for p in prompts]  # one length: the batch has no padding
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    mixed = router.generate(**batch, experts=experts, max_new_tokens=6, do_sample=False)
    model = router.model
    alone = []
    for row, expert in enumerate(experts):
        model.set_adapter(router.adapter_names[expert])
        alone.append(model.generate(input_ids=batch.input_ids[row : row + 1], attention_mask=batch.attention_mask[row : row + 1],
                                    max_new_tokens=6, do_sample=False)[0])
    assert torch.equal(mixed, torch.stack(alone))
    # The experts do differ, so the equality above says each row went through its own adapter.
    other = router.generate(**batch, experts=[1 - e for e in experts], max_new_tokens=6, do_sample=False)
    assert not torch.equal(mixed, other)
    # Without `experts=`, generate() routes itself.
    routed = router.route(**batch)
    assert torch.equal(router.generate(**batch, max_new_tokens=6, do_sample=False),
                       router.generate(**batch, experts=routed, max_new_tokens=6, do_sample=False))


def test_batch_of_one_expert_skips_the_mixed_path_with_equal_numbers_and_restores_the_adapter(trained, monkeypatch):
    router, tokenizer, _, _, _ = trained
    batch = tokenizer(["3 + 4 = ", "9 + 1 = "], return_tensors="pt", padding=True)
    model = router.model
    model.set_adapter(router.adapter_names[0])
    activated = []
    set_adapter = model.set_adapter
    monkeypatch.setattr(model, "set_adapter", lambda name: (activated.append(name), set_adapter(name)))
    names = [router.adapter_names[1]] * 2
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).logits  # PEFT's per-row path
        shortcut = router(**batch, experts=[1, 1]).logits
    torch.testing.assert_close(shortcut, mixed, rtol=0, atol=1e-6)
    assert activated == [router.adapter_names[1], router.adapter_names[0]]  # expert 1 active, then restored
    assert model.active_adapter == router.adapter_names[0]
    out = router.generate(**batch, experts=[1, 1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, model.generate(**batch, adapter_names=names, max_new_tokens=4, do_sample=False))
    assert model.active_adapter == router.adapter_names[0]


def test_saved_folder_layout_has_no_machine_paths(trained):
    router, _, _, _, folder = trained
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "expert_0", "expert_1", "experts_config.json", "router.safetensors"]
    config = json.loads((folder / "experts_config.json").read_text())
    assert config["experts"] == ["expert_0", "expert_1"] and config["base_model"] is None
    assert load_file(folder / "router.safetensors")["centroids"].shape == (2, 64)
    for path in folder.rglob("*"):
        if path.suffix in (".json", ".md"):
            assert str(folder) not in path.read_text() and "/tmp/" not in path.read_text()
    adapter = json.loads((folder / "expert_0" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["base_model_name_or_path"] is None


def test_each_expert_loads_alone_with_peft_and_gives_equal_logits(trained):
    from peft import PeftModel

    router, tokenizer, _, _, folder = trained
    batch = tokenizer(["7 + 2 = ", "Spell KLMNO: "], return_tensors="pt", padding=True)
    for index, name in enumerate(router.adapter_names):
        base, _ = tiny_model("llama")
        alone = PeftModel.from_pretrained(base, folder / name).eval()
        with torch.no_grad():
            expected = router(**batch, experts=[index, index]).logits
            torch.testing.assert_close(alone(**batch).logits, expected, rtol=0, atol=1e-6)


def test_reload_gives_identical_routes_and_logits(trained):
    router, tokenizer, rows, _, folder = trained
    base, _ = tiny_model("llama")
    loaded = ExpertRouter.from_pretrained(folder, base_model=base, tokenizer=tokenizer)
    assert loaded.adapter_names == router.adapter_names
    prompts = [row["prompt"] for row in rows]
    assert torch.equal(loaded.route_texts(prompts), router.route_texts(prompts))
    batch = tokenizer(prompts[:6], return_tensors="pt", padding=True)
    assert torch.equal(loaded.route(**batch), router.route(**batch))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, router(**batch).logits, rtol=0, atol=1e-6)


def test_push_to_fake_hub_and_load_back(trained, fake_hub):
    router, tokenizer, rows, _, _ = trained
    router.push_to_hub("me/tiny-experts")
    stored = fake_hub.files("me/tiny-experts")
    assert {"README.md", "experts_config.json", "router.safetensors", "expert_0/adapter_model.safetensors",
            "expert_1/adapter_config.json"} <= set(stored)
    assert 'ExpertRouter.from_pretrained("me/tiny-experts"' in stored["README.md"].decode()
    assert 'PeftModel.from_pretrained(base, "me/tiny-experts", subfolder="expert_1")' in stored["expert_1/README.md"].decode()
    base, _ = tiny_model("llama")
    loaded = ExpertRouter.from_pretrained("me/tiny-experts", base_model=base, tokenizer=tokenizer)
    prompts = [row["prompt"] for row in rows[:8]]
    assert torch.equal(loaded.route_texts(prompts), router.route_texts(prompts))
    assert fake_hub.unhandled == []


def test_expert_folder_errors(trained, tmp_path):
    router, _, rows, _, folder = trained
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="trained on another base model"):
        ExpertRouter.from_pretrained(folder, base_model=other)
    with pytest.raises(ValueError, match="trained on another base model"):
        ExpertRouter.from_pretrained(folder, base_model=tiny_model("gpt2")[0])
    with pytest.raises(ValueError, match="already carries PEFT adapters"):
        ExpertRouter.from_pretrained(folder, base_model=router.model)
    with pytest.raises(ValueError, match="is not an expert folder"):
        ExpertRouter.from_pretrained(tmp_path, base_model=tiny_model("llama")[0])

    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    tensors = load_file(tampered / "router.safetensors")
    tensors["centroids"] = torch.cat([tensors["centroids"], tensors["centroids"][:1]])
    save_file(tensors, tampered / "router.safetensors")
    with pytest.raises(ValueError, match="has 3 clusters but the folder lists 2 experts"):
        ExpertRouter.from_pretrained(tampered, base_model=tiny_model("llama")[0])
    shutil.copytree(folder, tmp_path / "incomplete")
    shutil.rmtree(tmp_path / "incomplete" / "expert_1")
    with pytest.raises(ValueError, match=r"lacks the expert folder\(s\) \['expert_1'\]"):
        ExpertRouter.from_pretrained(tmp_path / "incomplete", base_model=tiny_model("llama")[0])

    def damaged(name, change):
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        change(copy)
        base = tiny_model("llama")[0]
        with pytest.raises(ValueError, match="incomplete or damaged; re-save it"):
            ExpertRouter.from_pretrained(copy, base_model=base)
        assert not hasattr(base, "peft_config")  # refused before PEFT touched the base model

    damaged("no-router", lambda f: (f / "router.safetensors").unlink())
    damaged("no-mean", lambda f: save_file({k: v for k, v in load_file(f / "router.safetensors").items()
                                            if k != "mean"}, f / "router.safetensors"))
    damaged("narrow", lambda f: save_file({k: v[..., :32].contiguous() for k, v in
                                          load_file(f / "router.safetensors").items()}, f / "router.safetensors"))
    damaged("no-weights", lambda f: (f / "expert_1" / "adapter_model.safetensors").unlink())

    def truncate(f):
        weights = f / "expert_1" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])

    damaged("truncated", truncate)

    def edited(f):  # a valid file with other numbers: only the digests recorded at save can tell
        weights = f / "expert_1" / "adapter_model.safetensors"
        tensors = load_file(weights)
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] + 1e-3
        save_file(tensors, weights)

    damaged("edited", edited)

    def malformed_record(f):  # one file's digests replaced by a string
        config = json.loads((f / "experts_config.json").read_text())
        config["integrity"]["files"]["expert_0/adapter_model.safetensors"] = "sha256"
        (f / "experts_config.json").write_text(json.dumps(config))

    damaged("malformed-record", malformed_record)
    with pytest.raises(ValueError, match=r"malformed 'integrity' record for expert_0/adapter_model.safetensors"):
        ExpertRouter.from_pretrained(tmp_path / "malformed-record", base_model=tiny_model("llama")[0])
    with pytest.raises(ValueError, match=r"expert_1/adapter_model.safetensors differs from what was saved"):
        ExpertRouter.from_pretrained(tmp_path / "edited", base_model=tiny_model("llama")[0])
    assert set(json.loads((folder / "experts_config.json").read_text())["integrity"]["files"]) == {
        "router.safetensors", "expert_0/adapter_model.safetensors", "expert_1/adapter_model.safetensors"}
    # Built by hand: more clusters than experts, or an expert that is not loaded.
    with pytest.raises(ValueError, match="3 centroids but 2 experts"):
        ExpertRouter(router.model, torch.cat([router.centroids, router.centroids[:1]]), router.space, router.spec,
                     router.adapter_names)
    with pytest.raises(ValueError, match=r"no adapter\(s\) \['expert_9'\]"):
        ExpertRouter(router.model, router.centroids, router.space, router.spec, ["expert_0", "expert_9"])
    with pytest.raises(FileExistsError, match="already holds|is not empty"):
        router.save_pretrained(folder)


def test_train_experts_bad_inputs():
    model, tokenizer = tiny_model("llama")
    rows, _ = _task_rows(2)
    with pytest.raises(ValueError, match="num_experts=5 exceeds the 4 examples"):
        train_experts(model, rows, ExpertConfig(num_experts=5), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"Cluster\(s\) \[1\] are empty"):
        train_experts(model, rows, ExpertConfig(num_experts=3), tokenizer=tokenizer, clusters=[0, 0, 2, 2])
    for labels, shown in (([0, 0.7, 1, 1], "0.7"), ([0, True, 1, 1], "True")):  # not truncated to 0, read as 1
        with pytest.raises(ValueError, match=f"clusters must be integers in 0..1 .*got {shown}"):
            train_experts(model, rows, ExpertConfig(num_experts=2), tokenizer=tokenizer, clusters=labels)
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        ExpertConfig(num_experts=0)


def test_a_failed_training_run_hands_the_base_model_back_plain(monkeypatch, tmp_path):
    model, tokenizer = tiny_model("llama")
    rows, _ = _task_rows(4)
    before = {name: type(module) for name, module in model.named_modules()}
    calls = []

    def fail_on_the_second_expert(peft_model, data, scratch, args):
        calls.append(args.max_steps)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"global_step": 1, "train_seconds": 0.0, "training_loss": 1.0}

    monkeypatch.setattr(training_module, "train_with_trainer", fail_on_the_second_expert)
    args = TrainingArguments(str(tmp_path), max_steps=2, report_to=[], use_cpu=True)
    with pytest.raises(KeyboardInterrupt):
        train_experts(model, rows, ExpertConfig(num_experts=2, r=2), args=args, tokenizer=tokenizer)
    assert len(calls) == 2
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert not hasattr(model, "peft_config")
    monkeypatch.undo()  # and the same model trains again
    router = train_experts(model, rows, ExpertConfig(num_experts=2, r=2), args=args, tokenizer=tokenizer)
    assert router.adapter_names == ["expert_0", "expert_1"]


def test_training_is_reproducible_from_the_config_seed_whatever_the_callers_generator():
    # The first LoRA's random A was drawn from the caller's generator: two calls gave two sets of experts.
    rows, _ = _task_rows(8)
    settings = TrainingSettings(max_steps=1, per_device_batch_size=2, learning_rate=1e-3, use_cpu=True, progress=False)
    weights = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        model, tokenizer = tiny_model("llama")
        router = train_experts(model, Dataset.from_list(rows), ExpertConfig(num_experts=2, r=2, seq_len=32),
                               args=settings, tokenizer=tokenizer)
        weights.append({n: p.detach().clone() for n, p in router.model.named_parameters() if "lora_" in n})
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_shared_warmup_starts_every_expert_from_one_lora_trained_on_all_data(monkeypatch, tmp_path):
    model, tokenizer = tiny_model("llama")
    rows, tasks = _task_rows(6)
    starts = []  # per training run: the adapter trained and its LoRA weights when the run begins

    def recording(peft_model, data, scratch, args):
        name = peft_model.active_adapter
        starts.append((name, {k: v.clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=name).items()}))
        return real(peft_model, data, scratch, args)

    real = training_module.train_with_trainer
    monkeypatch.setattr(training_module, "train_with_trainer", recording)
    settings = TrainingSettings(max_steps=6, per_device_batch_size=2, learning_rate=1e-2, use_cpu=True, logging_steps=1)
    config = ExpertConfig(num_experts=2, r=2, seq_len=16, shared_warmup=0.5)
    router = train_experts(model, rows, config, args=settings, tokenizer=tokenizer, clusters=tasks)
    training = router.info["training"]
    assert training["shared_warmup"]["steps"] == 3 and [e["steps"] for e in training["experts"]] == [2, 1]
    assert training["total_steps"] == 6  # the same budget as without the warm start
    assert [name for name, _ in starts] == ["shared_warmup", "expert_0", "expert_1"]
    assert set(router.model.peft_config) == {"expert_0", "expert_1"}  # the warm-up adapter is gone
    fresh, warm_expert_0, warm_expert_1 = (weights for _, weights in starts)
    assert all(not value.any() for key, value in fresh.items() if "lora_B" in key)  # PEFT's zero init
    # both experts began from the warm-up's trained weights (nonzero B), not from a fresh init
    assert any(value.any() for key, value in warm_expert_0.items() if "lora_B" in key)
    for key, value in warm_expert_0.items():
        assert torch.equal(value, warm_expert_1[key])
    epochs = TrainingArguments(output_dir=str(tmp_path), max_steps=-1, num_train_epochs=1, use_cpu=True)
    with pytest.raises(ValueError, match="max_steps >= 2"):
        train_experts(tiny_model("llama")[0], rows, config, args=epochs, tokenizer=tokenizer, clusters=tasks)
    with pytest.raises(ValueError, match="shared_warmup"):
        ExpertConfig(shared_warmup=1.0)


def test_each_training_run_saves_its_checkpoints_in_its_own_folder_of_output_dir(tmp_path):
    # One Trainer per run in one output_dir: expert_1's checkpoint-N overwrote expert_0's (and the warm-up's).
    model, tokenizer = tiny_model("llama")
    rows, tasks = _task_rows(4)
    out = tmp_path / "out"
    args = TrainingArguments(str(out), max_steps=6, save_strategy="steps", save_steps=1, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    config = ExpertConfig(num_experts=2, r=2, seq_len=16, shared_warmup=0.5)
    router = train_experts(model, rows, config, args=args, tokenizer=tokenizer, clusters=tasks)
    runs = {run["adapter"]: run["steps"] for run in router.info["training"]["experts"]}
    runs["shared_warmup"] = router.info["training"]["shared_warmup"]["steps"]
    assert runs == {"shared_warmup": 3, "expert_0": 2, "expert_1": 1}
    assert sorted(path.name for path in out.iterdir()) == sorted(runs)  # nothing written next to the run folders
    for adapter, steps in runs.items():
        checkpoints = sorted(path.name for path in (out / adapter).iterdir())
        assert checkpoints == [f"checkpoint-{step}" for step in range(1, steps + 1)]
        for step in range(1, steps + 1):  # each checkpoint is its own run's: its trainer state counts that run's steps
            state = json.loads((out / adapter / f"checkpoint-{step}" / "trainer_state.json").read_text())
            assert state["global_step"] == step and state["max_steps"] == steps
    assert args.output_dir == str(out)  # the caller's arguments are left as given


def _gpt2_router():
    """Two rank-2 experts on a tiny GPT-2 (Conv1D layers), one per task."""
    model, tokenizer = tiny_model("gpt2")
    rows, tasks = _task_rows(4)
    router = train_experts(model, rows, ExpertConfig(num_experts=2, r=2, seq_len=16),
                           args=TrainingSettings(max_steps=2, per_device_batch_size=2, use_cpu=True, logging_steps=1),
                           tokenizer=tokenizer, clusters=tasks)
    return router, tokenizer, rows, tasks


def test_gpt2_experts_train_and_route():
    # Conv1D layers (GPT-2) get LoRA too, and the router works on another architecture.
    router, tokenizer, rows, tasks = _gpt2_router()
    assert router.route_texts([row["prompt"] for row in rows]).tolist() == tasks
    batch = tokenizer([rows[0]["prompt"], rows[1]["prompt"]], return_tensors="pt", padding=True)
    assert router.generate(**batch, max_new_tokens=3, do_sample=False).shape == (2, batch.input_ids.shape[1] + 3)


def _with_random_b(router, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in router.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return router


def _stacked_equals_peft(router, batch, experts):
    """The stacked mixed batch against PEFT's per-row path: logits and greedy tokens."""
    import contextlib
    from unittest import mock

    import hf_compress.experts.router as router_module

    stacked_calls = []
    original = router_module.stacked_lora

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        with original(*args, **kwargs) as stacked:
            stacked_calls.append(stacked)
            yield stacked

    def both(run):
        router.mixed_batch = "peft"
        reference = run()
        router.mixed_batch = "stacked"
        stacked_calls.clear()
        with mock.patch.object(router_module, "stacked_lora", recording):
            result = run()
        # Did stack: a silent fallback to PEFT would compare PEFT with itself.
        assert stacked_calls and all(stacked_calls), stacked_calls
        return result, reference

    with torch.no_grad():
        stacked, peft = both(lambda: router(**batch, experts=experts).logits)
    torch.testing.assert_close(stacked, peft, rtol=1e-5, atol=1e-5)
    stacked, peft = both(lambda: router.generate(**batch, experts=experts, max_new_tokens=5, do_sample=False))
    assert torch.equal(stacked, peft)


def test_stacked_mixed_batch_equals_peft_per_row_path_and_supports_beams(trained):
    router, tokenizer, _, _, _ = trained
    prompts = [p.ljust(13) for p in ["3 + 4 = ", "Spell ABCDE: ", "Spell QWXYZ: ", "9 + 1 = "]]  # no padding
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    experts = [0, 1, 1, 0]
    _stacked_equals_peft(router, batch, experts)
    assert router.mixed_batch == "stacked" and not router.model.training
    # Beams expand every row in place; PEFT's per-row path refuses them (adapter_names no longer matches the
    # rows), the stacked one keeps each row's expert: equal to each row's beams with its adapter alone.
    settings = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 5, "do_sample": False}
    beams = router.generate(**batch, experts=experts, **settings)
    alone = []
    for row, expert in enumerate(experts):
        router.model.set_adapter(router.adapter_names[expert])
        alone.append(router.model.generate(input_ids=batch.input_ids[row : row + 1],
                                           attention_mask=batch.attention_mask[row : row + 1], **settings))
    assert torch.equal(beams, torch.cat(alone))
    # Outside a routed call the model is untouched: PEFT's adapters are on again, no hook is left.
    assert all(not module._forward_hooks for module in router.model.modules() if hasattr(module, "lora_A"))


def test_stacked_mixed_batch_on_gpt2_conv1d_with_unequal_ranks():
    from peft import LoraConfig

    router, tokenizer, rows, _ = _gpt2_router()
    # A third expert of another rank: the stacked factors are [2 + 2 + 4, in] and the row masks follow.
    router.model.add_adapter("wide", LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    router.adapter_names.append("wide")
    router.centroids = torch.cat([router.centroids, router.centroids[:1]])
    _with_random_b(router, seed=1)
    batch = tokenizer([rows[0]["prompt"], rows[1]["prompt"], rows[2]["prompt"]], return_tensors="pt", padding=True)
    _stacked_equals_peft(router, batch, [2, 0, 1])


def test_stacked_path_falls_back_to_peft_for_layers_it_cannot_stack(trained, monkeypatch):
    from hf_compress import _compat

    router, tokenizer, _, _, _ = trained
    batch = tokenizer(["3 + 4 = ", "Spell ABCDE: "], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = router(**batch, experts=[0, 1]).logits
    monkeypatch.setattr(_compat, "lora_linear_factors", lambda module, names: None)  # e.g. DoRA layers
    seen = []
    forward = router.model.forward
    monkeypatch.setattr(router.model, "forward", lambda *a, **k: (seen.append(k.get("adapter_names")), forward(*a, **k))[1])
    with torch.no_grad():
        torch.testing.assert_close(router(**batch, experts=[0, 1]).logits, expected, rtol=1e-5, atol=1e-5)
    assert seen == [router.adapter_names_for([0, 1])]  # PEFT's per-row path ran
    with pytest.raises(ValueError, match="mixed_batch must be one of"):
        ExpertRouter(router.model, router.centroids, router.space, router.spec, router.adapter_names, mixed_batch="fast")
    with pytest.raises(ValueError, match="mixed_batch must be one of"):
        router.mixed_batch = "fast"
    assert router.mixed_batch == "stacked"


# ---------------------------------------------------------------------------------------------- hand-built routers


def _two_adapter_router(arch="llama", target_modules=("q_proj", "v_proj"), **lora):
    """Adapters "first" and "second" (random B, and bias if any) on a tiny model, routed by hand (experts=...)."""
    from peft import LoraConfig, get_peft_model

    from hf_compress.experts.embedding import EmbeddingSpace, EmbeddingSpec

    model, tokenizer = tiny_model(arch)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=list(target_modules), **lora)
    peft_model = get_peft_model(model, config, adapter_name="first")
    peft_model.add_adapter("second", config)
    hidden = model.config.hidden_size
    router = ExpertRouter(peft_model, torch.eye(2, hidden), EmbeddingSpace(torch.zeros(hidden), torch.ones(hidden)),
                          EmbeddingSpec.for_model(model), ["first", "second"], tokenizer=tokenizer)
    router.model.eval()
    return _with_random_b(router), tokenizer


def _rows_alone(router, batch, experts):
    rows = []
    with torch.no_grad():
        for row, expert in enumerate(experts):
            router.model.set_adapter(router.adapter_names[expert])
            rows.append(router.model(input_ids=batch.input_ids[row:row + 1],
                                     attention_mask=batch.attention_mask[row:row + 1]).logits)
    return torch.cat(rows)


def test_lora_bias_experts_mix_with_their_bias():
    router, tokenizer = _two_adapter_router(lora_bias=True)
    batch = tokenizer(["3 + 4 = ", "Spell ABCDE: "], return_tensors="pt", padding=True)
    with torch.no_grad():
        mixed = router(**batch, experts=[0, 1]).logits
    torch.testing.assert_close(mixed, _rows_alone(router, batch, [0, 1]), rtol=1e-5, atol=1e-5)


def test_dora_experts_refuse_a_mixed_batch_clearly_and_run_alone():
    router, tokenizer = _two_adapter_router(use_dora=True)
    batch = tokenizer(["3 + 4 = ", "Spell ABCDE: "], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match=r"Experts \['first', 'second'\] use DoRA"):
        router(**batch, experts=[0, 1])
    with torch.no_grad():
        alone = router(**batch, experts=[1, 1]).logits
    router.model.set_adapter("second")
    with torch.no_grad():
        assert torch.equal(alone, router.model(**batch).logits)


def test_the_per_row_path_on_layers_fed_the_whole_batch_says_to_stack():
    """OPT runs its FFN on the batch's tokens flattened together: PEFT's adapter_names check failed with a count of
    rows against a count of tokens. The stacked default serves the same batch."""
    router, tokenizer = _two_adapter_router("opt", target_modules=("fc1",))
    batch = tokenizer(["3 + 4 = ", "Spell ABCDE: "], return_tensors="pt", padding=True)
    router.mixed_batch = "peft"
    with pytest.raises(ValueError, match="OPTForCausalLM runs some layers on the tokens of the whole batch at once.*"
                                         "mixed_batch='stacked'"):
        router(**batch, experts=[0, 1])
    router.mixed_batch = "stacked"
    with torch.no_grad():
        mixed = router(**batch, experts=[0, 1]).logits
    torch.testing.assert_close(mixed, _rows_alone(router, batch, [0, 1]), rtol=1e-5, atol=1e-5)


def test_lora_on_fused_expert_parameters_is_refused_before_any_training(monkeypatch):
    """Mixtral's all-linear reaches its fused experts and router through peft's ParamWrapper, which cannot mix
    adapters in one batch: routed generation failed after the training was paid for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_compress.experts import training

    config = AutoConfig.for_model("mixtral", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(config)
    monkeypatch.setattr(training, "embed_texts", lambda *a, **k: pytest.fail("embedded before refusing"))
    rows, _ = _task_rows(8)
    with pytest.raises(ValueError, match="puts LoRA on MixtralForCausalLM's fused parameters .*ParamWrapper"):
        train_experts(model, rows, ExpertConfig(num_experts=2), tokenizer=tiny_tokenizer())
    assert not hasattr(model, "peft_config")


def test_a_failed_per_row_call_leaves_no_peft_hook_behind():
    router, tokenizer = _two_adapter_router()
    router.mixed_batch = "peft"
    batch = tokenizer(["3 + 4 = ", "Spell ABCDE: "], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = router(**batch, experts=[1, 1]).logits
        # labels of the wrong shape: the loss fails inside PEFT's hooked forward (not an error of the call itself,
        # raised before any hook is installed, which would leave nothing to clean up)
        with pytest.raises(ValueError, match="Expected input batch_size .* to match target batch_size"):
            router(**batch, experts=[0, 1], labels=torch.zeros(5, 3, dtype=torch.long))
        assert all(not module._forward_pre_hooks for module in router.model.modules() if hasattr(module, "lora_A"))
        assert torch.equal(router(**batch, experts=[1, 1]).logits, before)


def test_sampled_copies_keep_their_rows_expert_on_both_mixed_paths():
    router, tokenizer = _two_adapter_router()
    tokenizer.padding_side = "left"
    batch = tokenizer(["3 + 4 = ", "Spell ABCDE: "], return_tensors="pt", padding=True)
    settings = {"do_sample": True, "num_return_sequences": 2, "max_new_tokens": 4, "top_k": 0}
    outputs = {}
    for path in ("peft", "stacked"):
        router.mixed_batch = path
        torch.manual_seed(0)
        outputs[path] = router.generate(**batch, experts=[0, 1], **settings)
    assert outputs["peft"].shape[0] == 4 and torch.equal(outputs["peft"], outputs["stacked"])


def test_generate_without_a_mask_finds_the_padding_as_generate_does(trained):
    router, tokenizer, _, _, _ = trained
    tokenizer.padding_side = "left"
    batch = tokenizer(["3 + 4 = ", "Spell ABCDEFGHIJ: ", "9 + 1 = "], return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()
    settings = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(router.generate(input_ids=batch.input_ids, **settings), router.generate(**batch, **settings))
    assert torch.equal(router.generate(inputs=batch.input_ids, **settings), router.generate(**batch, **settings))
    # Other index types and tokenizers' token_type_ids are taken as they come.
    import numpy

    with torch.no_grad():
        assert torch.equal(router(**batch, experts=numpy.array([0, 1, 0])).logits,
                           router(**batch, experts=[0, 1, 0]).logits)
    assert torch.equal(router.route(**batch, token_type_ids=torch.zeros_like(batch.input_ids)), router.route(**batch))


def test_an_adapter_named_default_routes_but_is_refused_at_save(tmp_path):
    from peft import LoraConfig, get_peft_model

    from hf_compress.experts.embedding import EmbeddingSpace, EmbeddingSpec

    model, tokenizer = tiny_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))  # adapter "default"
    peft_model.add_adapter("math", LoraConfig(r=2, target_modules=["q_proj"]))
    hidden = model.config.hidden_size
    router = ExpertRouter(peft_model, torch.eye(2, hidden), EmbeddingSpace(torch.zeros(hidden), torch.ones(hidden)),
                          EmbeddingSpec.for_model(model), ["default", "math"])
    batch = tokenizer(["3 + 4 = ", "Spell ABCDE: "], return_tensors="pt", padding=True)
    with torch.no_grad():
        router(**batch, experts=[0, 1])  # in memory, PEFT's default name routes like any other
    with pytest.raises(ValueError, match='named "default" cannot be saved'):
        router.save_pretrained(tmp_path / "experts")
    assert not (tmp_path / "experts").exists()


def test_one_expert_on_a_model_with_narrower_embeddings_reloads(tmp_path):
    model, tokenizer = tiny_model("opt", word_embed_proj_dim=32)  # OPT-350m's layout: embeddings 32, blocks 64
    rows, _ = _task_rows(2)
    router = train_experts(model, rows, ExpertConfig(num_experts=1, r=2, seq_len=16),
                           args=TrainingSettings(max_steps=1, per_device_batch_size=2, use_cpu=True, logging_steps=1),
                           tokenizer=tokenizer)
    router.save_pretrained(tmp_path / "one")
    loaded = ExpertRouter.from_pretrained(tmp_path / "one", base_model=tiny_model("opt", word_embed_proj_dim=32)[0])
    batch = tokenizer(["3 + 4 = "], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, router(**batch).logits)


def test_edited_adapter_configs_routing_fields_or_a_removed_record_are_refused(trained, tmp_path):
    import shutil

    _, _, _, _, folder = trained

    def edit_json(relative, change):
        def edit(copy):
            path = copy / relative
            data = json.loads(path.read_text())
            change(data)
            path.write_text(json.dumps(data))
        return edit

    edits = {
        "alpha": edit_json("expert_0/adapter_config.json", lambda c: c.update(lora_alpha=4 * c["lora_alpha"])),
        "rslora": edit_json("expert_0/adapter_config.json", lambda c: c.update(use_rslora=True)),
        "swapped": edit_json("experts_config.json", lambda c: c["experts"].reverse()),
        "no-record": edit_json("experts_config.json", lambda c: c.pop("integrity")),
    }
    for name, edit in edits.items():
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        edit(copy)
        base = tiny_model("llama")[0]
        with pytest.raises(ValueError, match="incomplete or damaged"):
            ExpertRouter.from_pretrained(copy, base_model=base)
        assert not hasattr(base, "peft_config"), name
    with pytest.raises(ValueError, match="pooling must be 'mean'"):
        from hf_compress.experts.embedding import EmbeddingSpec

        EmbeddingSpec(layer=0, pooling="last")


@pytest.mark.parametrize("failing_adapter", [1, 2])  # inside PeftModel.from_pretrained, or a later load_adapter
def test_a_load_that_fails_while_attaching_hands_the_base_model_back(trained, monkeypatch, failing_adapter):
    from peft import PeftModel

    _, _, _, _, folder = trained
    base, _ = tiny_model("llama")
    ids = torch.tensor([[1, 72, 101, 108]])
    with torch.no_grad():
        expected = base(ids).logits
    calls, load_adapter = [], PeftModel.load_adapter

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == failing_adapter:
            raise RuntimeError("size mismatch for lora_A")
        return load_adapter(self, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "load_adapter", failing)
    with pytest.raises(RuntimeError, match="size mismatch"):
        ExpertRouter.from_pretrained(folder, base_model=base)
    assert not hasattr(base, "peft_config")
    assert not any("lora_" in name for name, _ in base.named_modules())
    with torch.no_grad():
        assert torch.equal(base(ids).logits, expected)


def test_seeds_numpy_cannot_take_are_refused_when_configured():
    with pytest.raises(ValueError, match=r"seed must be an integer seed \(0 to 2\*\*32 - 1\), got 4294967296"):
        ExpertConfig(seed=2**32)
    with pytest.raises(ValueError, match=r"seed must be an integer seed \(0 to 2\*\*32 - 1\), got -1"):
        select_indices(torch.eye(4), 2, "random", seed=-1)


def test_the_base_model_checks_keep_their_earlier_import_paths(monkeypatch):
    """The checks moved to hf_compress.modeling.identity; the names users imported before still work:
    ``weight_fingerprint`` from ``hf_compress.quantization.dlqat`` (it was in its ``__all__``) and the module
    ``hf_compress.speculative.base_identity`` (with a FutureWarning naming the new home)."""
    import importlib
    import sys

    from hf_compress.modeling import identity
    from hf_compress.quantization import dlqat

    assert dlqat.weight_fingerprint is identity.weight_fingerprint and "weight_fingerprint" in dlqat.__all__
    monkeypatch.delitem(sys.modules, "hf_compress.speculative.base_identity", raising=False)
    with pytest.warns(FutureWarning, match="hf_compress.modeling.identity"):
        old = importlib.import_module("hf_compress.speculative.base_identity")
    assert old.check_base_model is identity.check_base_model and old.base_model_identity is identity.base_model_identity


def test_modules_to_save_experts_mix_with_their_own_modules():
    # disable_adapter() switches modules_to_save off too: the stacked path must leave such experts to PEFT.
    router, tokenizer = _two_adapter_router(modules_to_save=["lm_head"])
    with torch.no_grad():
        for name, parameter in router.model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(len(name))))
    batch = tokenizer(["3 + 4 = ", "Spell ABCDE: "], return_tensors="pt", padding=True)
    with torch.no_grad():
        mixed = router(**batch, experts=[0, 1]).logits
    torch.testing.assert_close(mixed, _rows_alone(router, batch, [0, 1]), rtol=1e-5, atol=1e-5)


def test_a_base_with_fewer_blocks_than_the_embedding_block_is_refused_clearly(tmp_path):
    from hf_compress.experts.embedding import EmbeddingSpec

    router, _ = _two_adapter_router()
    router.spec = EmbeddingSpec(layer=1)
    router.save_pretrained(tmp_path / "experts")
    shallow, _ = tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match="trained on another base model .*block 1.* 1 blocks"):
        ExpertRouter.from_pretrained(tmp_path / "experts", base_model=shallow)
    assert not hasattr(shallow, "peft_config")


def test_a_missing_folder_and_texts_given_as_ids_get_errors_that_say_so(trained, tmp_path):
    # "nope/" was taken for a Hub id (HFValidationError), or hidden behind "already carries PEFT adapters".
    router, tokenizer, rows, _, _ = trained
    with pytest.raises(FileNotFoundError, match="nope/: no such expert folder"):
        ExpertRouter.from_pretrained("nope/", base_model=tiny_model("llama")[0])
    with pytest.raises(FileNotFoundError, match="no such expert folder"):
        ExpertRouter.from_pretrained(str(tmp_path / "missing"), base_model=router.model)  # a base already wrapped
    with pytest.raises(TypeError, match=r"route takes token ids.*not list \(texts: route_texts\(texts\)\)"):
        router.route([rows[0]["prompt"]])
    assert router.route_texts(rows[0]["prompt"]).tolist() == router.route_texts([rows[0]["prompt"]]).tolist()


def test_router_refuses_repeated_adapter_names_and_centroids_of_another_width():
    router, _ = _two_adapter_router()
    args = (router.model, torch.eye(2, 64), router.space, router.spec)
    with pytest.raises(ValueError, match=r"Adapter\(s\) \['first'\] are named for more than one cluster"):
        ExpertRouter(*args, ["first", "first"])
    with pytest.raises(ValueError, match=r"centroids \(2, 32\) do not fit the embedding space of width 64"):
        ExpertRouter(router.model, torch.eye(2, 32), router.space, router.spec, ["first", "second"])
    assert router.route_texts([]).tolist() == []
    with pytest.raises(ValueError, match=r"Text\(s\) \[0\] tokenise to no tokens"):
        router.route_texts(["", "x"])


@pytest.mark.parametrize(("rows", "message"), [
    ([{"prompt": "Q: hi\nA:", "completion": ""}], "row 0: `completion` is empty"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "", "completion": "b"}], "row 1: `prompt` is empty"),
    (["text", ""], "row 1: `text` is empty"),
])
def test_empty_prompts_and_completions_are_refused_before_training(rows, message):
    # An empty completion read as a text row: the expert would be trained to write the prompt.
    with pytest.raises(ValueError, match=message):
        instruction_rows(rows)


# ---------------------------------------------------------------------------------------------- joint training


def _two_lora_experts(seed: int = 0):
    """A tiny Llama with two LoRA adapters whose B matrices are random (PEFT starts them at zero)."""
    from peft import get_peft_model

    model, tokenizer = tiny_model("llama")
    config = ExpertConfig(num_experts=2, r=2, seq_len=16)
    peft_model = get_peft_model(model, config.lora_config(model), adapter_name="expert_0")
    peft_model.add_adapter("expert_1", config.lora_config(model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return peft_model, tokenizer


def test_rows_through_experts_gives_each_row_its_own_expert_and_only_its_gradient():
    peft_model, _ = _two_lora_experts()
    peft_model.double()  # the batch and the rows alone block their matmuls differently: float32 rounding is ~1e-5
    names = ["expert_0", "expert_1"]
    ids = torch.randint(3, 200, (3, 7), generator=torch.Generator().manual_seed(1))
    experts = torch.tensor([1, 0, 1])
    alone = []
    with torch.no_grad():
        for row, expert in zip(ids, experts.tolist()):
            peft_model.set_adapter(names[expert])
            alone.append(peft_model(input_ids=row[None]).logits)
    module = JointExpertsTrainingModule(peft_model, names)  # no adapter active in PEFT, both trainable
    assert {name for name, p in peft_model.named_parameters() if p.requires_grad} == {
        name for name, _ in peft_model.named_parameters() if "lora_" in name}
    logits = module(input_ids=ids, expert=experts).logits
    torch.testing.assert_close(logits, torch.cat(alone), rtol=1e-5, atol=1e-5)
    # Outside, no expert changes the model: the hooks add every update.
    with torch.no_grad():
        assert not torch.allclose(peft_model(input_ids=ids).logits, logits, atol=1e-3)
    # An expert active in PEFT would add its update to every row too: refused.
    peft_model.base_model.set_adapter("expert_1")
    with pytest.raises(ValueError, match=r"set_adapter\(\[\]\)"):
        module(input_ids=ids, expert=experts)
    JointExpertsTrainingModule(peft_model, names)
    # Row 1's loss (expert_0) reaches expert_0's weights only.
    peft_model.zero_grad()
    module(input_ids=ids[1:2], expert=torch.tensor([0]), labels=ids[1:2]).loss.backward()
    grads = {name: parameter.grad for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert all(grad is not None and grad.abs().sum() > 0 for name, grad in grads.items() if "expert_0" in name)
    assert all(grad is None or not grad.any() for name, grad in grads.items() if "expert_1" in name)
    # The checkpoint Trainer writes holds the experts' weights only, and loads back.
    state = module.state_dict()
    assert state and all("lora_" in name for name in state)
    assert not module.load_state_dict({name: torch.zeros_like(value) for name, value in state.items()}).missing_keys
    assert all(not parameter.any() for name, parameter in peft_model.named_parameters() if name.endswith(
        "lora_B.expert_1.weight"))
    for other in ({**state, "model.unknown": torch.zeros(1)},  # another run's experts: refused even when lenient
                  {name: value[:1] for name, value in state.items()}):  # another rank would broadcast silently
        with pytest.raises(RuntimeError, match="does not match these experts"):
            module.load_state_dict(other, strict=False)
    # Trainer passes num_items_in_batch on (gradient accumulation weighs tokens as the per-expert runs do).
    mean = module(input_ids=ids, expert=experts, labels=ids).loss
    summed = module(input_ids=ids, expert=experts, labels=ids, num_items_in_batch=torch.tensor(1)).loss
    torch.testing.assert_close(summed, mean * ids[:, 1:].numel())
    with pytest.raises(ValueError, match="one index in 0..1 per batch row"):
        module(input_ids=ids, expert=torch.tensor([0, 2, 1]))


def test_joint_training_updates_every_expert_in_one_run_of_max_steps(monkeypatch):
    model, tokenizer = tiny_model("llama")
    rows, tasks = _task_rows(8)
    runs = []

    def recording(module, data, scratch, args):
        runs.append((type(module).__name__, len(data), sorted(set(data["expert"]))))
        return real(module, data, scratch, args)

    real = training_module.train_with_trainer
    monkeypatch.setattr(training_module, "train_with_trainer", recording)
    settings = TrainingSettings(max_steps=4, per_device_batch_size=4, learning_rate=1e-2, use_cpu=True, logging_steps=1)
    config = ExpertConfig(num_experts=2, r=2, seq_len=16, joint_training=True)
    router = train_experts(model, rows, config, args=settings, tokenizer=tokenizer, clusters=tasks)
    training = router.info["training"]
    assert runs == [("JointExpertsTrainingModule", training["joint"]["windows"], [0, 1])]
    assert training["joint"]["steps"] == training["total_steps"] == 4
    assert sum(e["windows"] for e in training["experts"]) == training["joint"]["windows"]
    for name in ("expert_0", "expert_1"):  # PEFT starts B at zero: both moved, in one run of 4 steps
        assert any(parameter.any() for key, parameter in router.model.named_parameters()
                   if key.endswith(f"lora_B.{name}.weight"))
    assert router.model.active_adapters == ["expert_0"] and not router.model.training
    # The experts differ (each trained on its own task's rows), and route as the sequential ones do.
    lora_b = {name: torch.cat([p.flatten() for key, p in router.model.named_parameters()
                               if key.endswith(f"lora_B.{name}.weight")]) for name in ("expert_0", "expert_1")}
    assert not torch.allclose(lora_b["expert_0"], lora_b["expert_1"])
    with pytest.raises(ValueError, match="joint_training"):
        ExpertConfig(joint_training="yes")


def test_joint_training_refuses_gradient_checkpointing(tmp_path):
    # The backward pass would recompute the blocks without the per-row updates (and train nothing, silently).
    rows, tasks = _task_rows(4)
    config = ExpertConfig(num_experts=2, r=2, seq_len=16, joint_training=True)
    model, tokenizer = tiny_model("llama")
    asked = TrainingArguments(str(tmp_path), max_steps=2, activation_checkpointing=True, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        train_experts(model, rows, config, args=asked, tokenizer=tokenizer, clusters=tasks)
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        train_experts(model, rows, config, args=TrainingSettings(max_steps=2, use_cpu=True), tokenizer=tokenizer,
                      clusters=tasks)
    assert not hasattr(model, "peft_config")  # refused before any change


def test_joint_training_refuses_lora_variants():
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model("llama")
    dora = LoraConfig(r=2, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, dora, adapter_name="expert_0")
    with pytest.raises(ValueError, match="plain LoRA"):
        with rows_through_experts(peft_model, ["expert_0"], torch.tensor([0])):
            pass


def test_a_joint_run_resumes_from_its_checkpoint(tmp_path):
    # One Trainer run for every expert: resume_from_checkpoint is honoured (refused for one run per expert).
    rows, tasks = _task_rows(4)
    config = ExpertConfig(num_experts=2, r=2, seq_len=16, joint_training=True)

    def arguments(steps, **extra):
        return TrainingArguments(str(tmp_path / "out"), max_steps=steps, save_strategy="steps", save_steps=2,
                                 per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                                 disable_tqdm=True, seed=0, **extra)

    model, tokenizer = tiny_model("llama")
    whole = train_experts(model, rows, config, args=arguments(4), tokenizer=tokenizer, clusters=tasks)
    expected = {n: p.detach().clone() for n, p in whole.model.named_parameters() if "lora_" in n}
    assert sorted(p.name for p in (tmp_path / "out" / "experts").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    (tmp_path / "out" / "experts" / "checkpoint-4").rename(tmp_path / "moved")  # as if stopped after step 2
    model, _ = tiny_model("llama")
    resumed = train_experts(model, rows, config, args=arguments(4, resume_from_checkpoint=True), tokenizer=tokenizer,
                            clusters=tasks)
    assert resumed.info["training"]["joint"]["steps"] == 4
    for name, parameter in resumed.model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(parameter, expected[name])
    with pytest.raises(ValueError, match=r"joint_training=True\) without shared_warmup"):
        train_experts(tiny_model("llama")[0], rows, ExpertConfig(num_experts=2, r=2, seq_len=16),
                      args=arguments(4, resume_from_checkpoint=True), tokenizer=tokenizer, clusters=tasks)


def test_an_absolute_warm_up_is_the_same_share_of_every_experts_run(tmp_path):
    """max_steps is the budget of all the experts' runs together; warmup_steps was applied whole to each short run,
    which then ended before its learning rate rose to the one asked for."""
    from transformers import TrainingArguments

    from hf_compress.experts.training import _with_steps

    settings = TrainingSettings(max_steps=12, warmup_steps=6, use_cpu=True)
    assert [_with_steps(settings, steps, str(tmp_path), "e").warmup_steps for steps in (4, 5, 3)] == [2, 3, 2]
    assert _with_steps(settings, 12, str(tmp_path), "e").warmup_steps == 6  # one run of the whole budget
    arguments = TrainingArguments(str(tmp_path), max_steps=12, warmup_steps=6, use_cpu=True, report_to=[])
    assert _with_steps(arguments, 4, str(tmp_path), "e").warmup_steps == 2
    ratio = TrainingArguments(str(tmp_path), max_steps=12, warmup_steps=0.5, use_cpu=True, report_to=[])
    assert _with_steps(ratio, 4, str(tmp_path), "e").warmup_steps == 0.5  # a ratio is each run's already


def test_inputs_embeds_with_the_experts_given_run_each_row_through_its_expert():
    """Nothing needs routing when experts= is given, yet inputs_embeds were refused as impossible to route."""
    router, tokenizer = _two_adapter_router()
    tokenizer.padding_side = "left"
    batch = tokenizer(["3 + 4 = ", "Spell ABCDE: "], return_tensors="pt", padding=True)
    embeddings = router.model.get_input_embeddings()(batch.input_ids).detach()
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    from_ids = router.generate(**batch, experts=[0, 1], **greedy)[:, batch.input_ids.shape[1]:]
    from_embeddings = router.generate(inputs_embeds=embeddings, attention_mask=batch.attention_mask, experts=[0, 1],
                                      **greedy)
    assert torch.equal(from_embeddings, from_ids)
    router.mixed_batch = "peft"  # PEFT's per-row path repeats the rows itself for sampled copies
    sampled = dict(max_new_tokens=4, do_sample=True, num_return_sequences=2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    from_ids = router.generate(**batch, experts=[0, 1], **sampled)[:, batch.input_ids.shape[1]:]
    torch.manual_seed(0)
    from_embeddings = router.generate(inputs_embeds=embeddings, attention_mask=batch.attention_mask, experts=[0, 1],
                                      **sampled)
    assert from_embeddings.shape[0] == 4 and torch.equal(from_embeddings, from_ids)
    with pytest.raises(ValueError, match="pass experts=.*with inputs_embeds"):
        router.generate(inputs_embeds=embeddings, attention_mask=batch.attention_mask, **greedy)


def test_a_router_loaded_for_inference_stays_frozen_whatever_it_routes(trained):
    """peft's set_adapter (one expert's batch) and disable_adapter (the routing pass) mark adapters trainable."""
    router, tokenizer, _, _, folder = trained
    loaded = ExpertRouter.from_pretrained(folder, base_model=tiny_model("llama")[0], tokenizer=tokenizer)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    one = tokenizer(["Spell ABCDE: "], return_tensors="pt")
    loaded.route(**one)
    assert not loaded(**one).logits.requires_grad  # one expert: the set_adapter path
    loaded.generate(**one, max_new_tokens=2, do_sample=False)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_a_forward_from_a_cache_takes_the_first_passs_experts(trained):
    router, tokenizer, _, _, _ = trained
    tokenizer.padding_side = "left"
    batch = tokenizer(["3 + 4 = ", "Spell ABCDEFGHIJ: "], return_tensors="pt", padding=True)
    experts = router.route(**batch)
    name = _compat.cache_kwarg_name(router.model)  # past_key_values before transformers 5.24
    with torch.no_grad():
        first = router(**batch, use_cache=True)
        step = first.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([batch.attention_mask, torch.ones_like(step)], dim=1)
        with pytest.raises(ValueError, match="pass the experts the first pass chose"):
            router(input_ids=step, attention_mask=mask, **{name: _compat.cache_of_output(first)})
        cached = router(input_ids=step, attention_mask=mask, **{name: _compat.cache_of_output(first)}, experts=experts)
        whole = router(input_ids=torch.cat([batch.input_ids, step], 1), attention_mask=mask, experts=experts)
    torch.testing.assert_close(cached.logits[:, -1], whole.logits[:, -1], rtol=1e-4, atol=1e-5)


def test_route_without_a_mask_finds_the_padding_as_generate_does(trained, monkeypatch):
    router, tokenizer, _, _, _ = trained
    tokenizer.padding_side = "left"
    batch = tokenizer(["3 + 4 = ", "Spell ABCDEFGHIJ: ", "9 + 1 = "], return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()
    masks = []
    embed = router.embed
    monkeypatch.setattr(router, "embed", lambda ids, mask=None: masks.append(mask) or embed(ids, mask))
    assert torch.equal(router.route(batch.input_ids), router.route(**batch))
    assert torch.equal(masks[0], batch.attention_mask)  # the pads were found, not embedded as prompt tokens


def test_a_window_longer_than_learned_positions_is_refused_before_the_embedding_pass(monkeypatch):
    from hf_compress.experts import training as experts_training

    model, tokenizer = tiny_model("gpt2")
    monkeypatch.setattr(experts_training, "embed_texts", lambda *a, **k: pytest.fail("embedded before refusing"))
    with pytest.raises(ValueError, match=r"seq_len is 1024 tokens.*positions for 512 only; use seq_len <= 512"):
        train_experts(model, _task_rows(4)[0], ExpertConfig(num_experts=2, r=2, seq_len=1024),
                      args=TrainingSettings(max_steps=2, use_cpu=True), tokenizer=tokenizer)


def test_the_folder_cards_single_expert_snippet_names_an_expert_of_the_folder(tmp_path):
    router, _ = _two_adapter_router()
    router.save_pretrained(tmp_path / "named")
    card = (tmp_path / "named" / "README.md").read_text()
    assert 'subfolder="first"' in card and "expert_0" not in card
