"""The training launcher (``train_with_trainer``): what it checks before Trainer runs."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import safetensors.torch

from hf_compress.assets import tiny_model, tiny_tokenizer
from hf_compress.training import TrainingSettings, causal_lm_dataset, train_with_trainer


def test_a_failed_hub_kernel_download_says_how_to_train_without_it(tmp_path):
    """transformers 5.25 loads models with hub kernels on; train() kernelizes them for their device, which on a GPU
    downloads kernels. Offline that fails deep in the first training step; the launcher says what to do instead."""
    model, _ = tiny_model("llama")
    model._use_kernels = True  # what from_pretrained leaves on a model loaded with hub kernels

    def kernelize_offline(mode: bool = True):
        raise ValueError("Kernel repository 'kernels-community/rotary' could not verify publisher trust status.")

    model.train = kernelize_offline
    data = causal_lm_dataset(["text " * 50], tiny_tokenizer(), num_sequences=2, seq_len=16)
    with pytest.raises(RuntimeError, match="use_kernels=False.*USE_HUB_KERNELS=0"):
        train_with_trainer(model, data, str(tmp_path / "run"), TrainingSettings(max_steps=1, use_cpu=True))


def test_broadcast_from_main_in_one_process_returns_the_object_and_starts_no_process_group():
    import torch

    from hf_compress.training import broadcast_from_main

    decision = {"best_step": 3, "scores": torch.tensor([0.5, 0.25])}
    assert broadcast_from_main(decision) is decision
    assert broadcast_from_main(decision, TrainingSettings(use_cpu=True)) is decision
    assert not torch.distributed.is_initialized()


def test_extra_arguments_change_the_launchers_defaults_and_may_not_shadow_settings(tmp_path):
    from hf_compress.training.trainer import _arguments_from_settings

    arguments = _arguments_from_settings(
        TrainingSettings(use_cpu=True, extra_arguments={"report_to": ["none"], "save_strategy": "steps"}), str(tmp_path))
    assert arguments.save_strategy == "steps"
    with pytest.raises(ValueError, match=r"extra_arguments sets \['learning_rate'\].*TrainingSettings fields"):
        _arguments_from_settings(TrainingSettings(extra_arguments={"learning_rate": 1.0}), str(tmp_path))
    with pytest.raises(ValueError, match="weight_decay"):
        TrainingSettings(weight_decay=-0.1)



# ------------------------------------------------------------------ resuming an interrupted run


def _checkpointing(output_dir, max_steps, resume=None):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, save_strategy="steps", save_steps=2,
                             per_device_train_batch_size=1, learning_rate=1e-2, use_cpu=True, report_to=[], seed=0,
                             disable_tqdm=True, resume_from_checkpoint=resume)


def _step_counter(interrupt_after: int | None = None):
    """A ``TrainerCallback`` counting the optimizer steps this run executed (not the ones restored); with
    ``interrupt_after``, it stops the run there, as a crash would after that step's checkpoint."""
    from transformers import TrainerCallback

    class Counter(TrainerCallback):
        count = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.count += 1
            if state.global_step == interrupt_after:
                control.should_training_stop = True

    return Counter()


def test_dlqat_training_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_does(tmp_path):
    """``TrainingArguments.resume_from_checkpoint`` is for the script to pass on; the launcher is that script. A run
    stopped after its step-2 checkpoint and resumed must end with the uninterrupted run's adapter, not retrain
    from scratch (which it silently did)."""
    import torch
    from peft import get_peft_model

    from hf_compress.quantization import DLQATConfig

    data = causal_lm_dataset(["one two three four five six " * 40], tiny_tokenizer(), num_sequences=8, seq_len=16)

    def adapter(output_dir, resume=None, interrupt_after=None):
        torch.manual_seed(0)
        model = get_peft_model(tiny_model("llama")[0], DLQATConfig(bits=4, group_size=32, r=2))
        steps = _step_counter(interrupt_after)
        result = train_with_trainer(model, data, str(output_dir), _checkpointing(output_dir, 4, resume),
                                    callbacks=[steps])
        trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        return result, steps.count, trained

    _, _, straight = adapter(tmp_path / "straight")
    adapter(tmp_path / "stopped", interrupt_after=2)  # the interrupted run: its last checkpoint is checkpoint-2
    result, steps_run, resumed = adapter(tmp_path / "stopped", resume=True)
    assert (result["global_step"], steps_run) == (4, 2)  # steps 3 and 4 only, not the whole run again
    assert straight.keys() == resumed.keys() and straight
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def test_router_training_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_does(tmp_path):
    import torch

    from hf_compress.routing import RoutingSchedule, TokenRouterConfig, routing_state, train_token_router

    data = causal_lm_dataset(["alpha beta gamma delta epsilon " * 60], tiny_tokenizer(), num_sequences=8, seq_len=24)
    config = TokenRouterConfig(token_sparsity=0.3, validation_windows=0)  # no keep-best: the last router is kept

    def router(output_dir, max_steps=4, resume=None, interrupt_after=None):
        model, _ = tiny_model("llama", tie_word_embeddings=True)  # as SmolLM2: checkpointing the model failed
        schedule = RoutingSchedule([0.3] * model.config.num_hidden_layers)
        interrupt = _step_counter(interrupt_after)
        with _extra_callback(interrupt):
            train_token_router(model, schedule, data, config=config, args=_checkpointing(output_dir, max_steps, resume))
        steps_run = interrupt.count
        return {name: value.clone() for name, value in routing_state(model).router.state_dict().items()}, steps_run

    straight, _ = router(tmp_path / "straight")
    assert not torch.equal(straight["output.weight"], router(tmp_path / "short", 1)[0]["output.weight"])  # it trains
    router(tmp_path / "stopped", interrupt_after=2)
    resumed, steps_run = router(tmp_path / "stopped", resume=str(tmp_path / "stopped" / "checkpoint-2"))
    assert steps_run == 2
    checkpoint = safetensors.torch.load_file(tmp_path / "stopped" / "checkpoint-2" / "model.safetensors")
    assert sorted(checkpoint) == sorted(f"model.model.token_router.{name}" for name in straight)  # the router only
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def test_router_training_with_model_selection_resumes_to_the_uninterrupted_runs_router(tmp_path):
    """The best step so far and its router go into each checkpoint; resumed, selection restarted at the checkpoint's
    step and could keep a worse router than the uninterrupted run did."""
    import torch

    from hf_compress.routing import RoutingSchedule, TokenRouterConfig, routing_state, train_token_router

    data = causal_lm_dataset(["alpha beta gamma delta epsilon zeta eta theta " * 80], tiny_tokenizer(),
                             num_sequences=12, seq_len=24)
    config = TokenRouterConfig(token_sparsity=0.3, validation_windows=2, validation_every=1)

    def router(output_dir, resume=None, interrupt_after=None):
        model, _ = tiny_model("llama")
        args = dataclasses.replace(_checkpointing(output_dir, 6, resume), learning_rate=0.3,
                                   per_device_train_batch_size=2)
        with _extra_callback(_step_counter(interrupt_after)):
            train_token_router(model, RoutingSchedule([0.3] * model.config.num_hidden_layers), data, config=config,
                               args=args)
        state = routing_state(model)
        return state.router.state_dict(), state.mode, state.schedule.search["training"]["selection"]

    straight = router(tmp_path / "straight")
    assert 0 < straight[2]["best_step"] < 4  # kept a step before the interruption: the case that went wrong
    router(tmp_path / "stopped", interrupt_after=4)
    resumed = router(tmp_path / "stopped", resume=True)
    assert resumed[1] == straight[1] and resumed[2] == straight[2]
    for name, value in straight[0].items():
        assert torch.equal(resumed[0][name], value), name


def test_options_a_training_cannot_honour_are_refused_before_any_work(tmp_path):
    """Label smoothing and NEFTune crashed deep inside Trainer for trainings with their own loss; Trainer's
    load_best_model_at_end was silently overridden by the router's model selection; train_experts has no evaluation
    set; the router's output_dir was ignored next to TrainingArguments that carry their own."""
    import torch
    from transformers import TrainingArguments

    from hf_compress.experts import ExpertConfig, train_experts
    from hf_compress.routing import RoutingSchedule, routing_state, train_token_router
    from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads, train_heads

    model, tokenizer = tiny_model("llama")
    before = {name: value.clone() for name, value in model.state_dict().items()}
    data = causal_lm_dataset(["alpha beta gamma delta " * 60], tokenizer, num_sequences=4, seq_len=16)
    schedule = RoutingSchedule([0.3] * model.config.num_hidden_layers)
    arguments = dict(output_dir=str(tmp_path), max_steps=2, use_cpu=True, report_to=[])
    for extra, match in (({"label_smoothing_factor": 0.1}, "Router training cannot honour label_smoothing_factor"),
                         ({"neftune_noise_alpha": 5.0}, "Router training cannot honour neftune_noise_alpha")):
        with pytest.raises(ValueError, match=match):
            train_token_router(model, schedule, data, args=TrainingSettings(use_cpu=True, extra_arguments=extra))
    best = TrainingArguments(**arguments, eval_strategy="steps", save_strategy="steps", load_best_model_at_end=True)
    with pytest.raises(ValueError, match="load_best_model_at_end.*validation_windows=0"):
        train_token_router(model, schedule, data, args=best, eval_dataset=data)
    with pytest.raises(ValueError, match="output_dir=.*differ"):
        train_token_router(model, schedule, data, args=TrainingArguments(**arguments), output_dir=str(tmp_path / "b"))
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2, num_attention_heads=2))
    with pytest.raises(ValueError, match="Heads training cannot honour label_smoothing_factor"):
        train_heads(model, heads, data, args=TrainingArguments(**arguments, label_smoothing_factor=0.1))
    rows = [{"prompt": f"Q{i}: what is {i}?", "completion": f" {i}"} for i in range(8)]
    with pytest.raises(ValueError, match="train_experts cannot honour eval_strategy"):
        train_experts(model, rows, ExpertConfig(num_experts=2), TrainingArguments(**arguments, eval_strategy="steps"),
                      tokenizer=tokenizer)
    with pytest.raises(ValueError, match="Joint expert training cannot honour neftune_noise_alpha"):
        train_experts(model, rows, ExpertConfig(num_experts=2, joint_training=True),
                      TrainingArguments(**arguments, neftune_noise_alpha=5.0), tokenizer=tokenizer)
    assert routing_state(model) is None and not hasattr(model, "peft_config")
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())


def test_a_run_with_no_optimizer_step_is_an_error_not_an_untrained_result(tmp_path):
    """dataloader_drop_last with fewer rows than a batch ran 0 steps: an expert came back (and was saved) untrained."""
    from hf_compress.experts import ExpertConfig, train_experts

    model, tokenizer = tiny_model("llama")
    data = causal_lm_dataset(["alpha beta gamma delta " * 60], tokenizer, num_sequences=3, seq_len=16)
    settings = TrainingSettings(max_steps=2, per_device_batch_size=4, use_cpu=True,
                                extra_arguments={"dataloader_drop_last": True})
    with pytest.raises(ValueError, match="no optimizer step on these 3 training rows.*dataloader_drop_last=False"):
        train_with_trainer(model, data, str(tmp_path), settings)
    # An output_dir that is, or lies under, a file: Trainer's makedirs said only "File exists" / "Not a directory".
    (tmp_path / "a-file").write_text("x")
    for under, message in (("a-file", "a-file is a file; pass a folder path"),
                           ("a-file/expert_0", "a-file/expert_0 cannot be created: .*a-file is a file, not a folder")):
        with pytest.raises(FileExistsError, match=f"output_dir .*{message}"):
            train_with_trainer(model, data, str(tmp_path / under), TrainingSettings(max_steps=1, use_cpu=True))
    # Zero epochs is named as the cause (the message suggested dataloader_drop_last=False, which it already was).
    from transformers import TrainingArguments

    zero_epochs = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=0, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="num_train_epochs=0 and no max_steps; set either above 0"):
        train_with_trainer(model, data, str(tmp_path), zero_epochs)
    rows = [{"prompt": f"Q{i}: what is {i}?", "completion": f" {i}"} for i in range(6)]
    with pytest.raises(ValueError, match="no optimizer step"):
        train_experts(model, rows, ExpertConfig(num_experts=2, seq_len=16), settings, tokenizer=tokenizer,
                      clusters=[0, 0, 0, 0, 0, 1])
    assert not hasattr(model, "peft_config")  # handed back as it came


def test_interrupted_heads_training_hands_the_heads_back_as_they_came(tmp_path):
    import torch
    from transformers import TrainerCallback

    import hf_compress.speculative.heads.training as heads_training
    from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads, train_heads

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    model, tokenizer = tiny_model("llama")
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2, num_attention_heads=2))
    data = causal_lm_dataset(["alpha beta gamma delta " * 60], tokenizer, num_sequences=4, seq_len=16)
    before = {name: value.clone() for name, value in heads.state_dict().items()}
    with _extra_callback(Interrupt(), heads_training), pytest.raises(KeyboardInterrupt):
        train_heads(model, heads, data, TrainingSettings(max_steps=4, learning_rate=1e-2, use_cpu=True))
    assert all(torch.equal(heads.state_dict()[name], value) for name, value in before.items())
    assert heads.config.training is None
    with pytest.raises(ValueError, match="scratch folder.*TrainingArguments\\(output_dir="):
        train_heads(model, heads, data, TrainingSettings(use_cpu=True, extra_arguments={"save_strategy": "steps"}))


@contextlib.contextmanager
def _extra_callback(callback, module=None):
    """Every ``Trainer`` that ``module`` (router training by default) builds gets ``callback`` too (the training
    functions build their own callback lists)."""
    if module is None:
        import hf_compress.routing.training as module

    original = module.train_with_trainer

    def with_callback(*args, callbacks=None, **kwargs):
        return original(*args, callbacks=[*(callbacks or []), callback], **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "train_with_trainer", with_callback)
        yield


def test_router_training_evaluates_on_its_eval_dataset_when_the_arguments_ask(tmp_path):
    """An ``eval_strategy`` in the caller's TrainingArguments made Trainer refuse to start ("you didn't pass an
    eval_dataset to Trainer") although the caller had passed ``eval_dataset`` to ``train_token_router``."""
    from transformers import TrainerCallback, TrainingArguments

    from hf_compress.routing import RoutingSchedule, train_token_router

    class EvalLosses(TrainerCallback):
        def __init__(self):
            self.losses = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.losses.append(metrics["eval_loss"])

    model, tokenizer = tiny_model("llama")
    data = causal_lm_dataset(["alpha beta gamma delta " * 60], tokenizer, num_sequences=8, seq_len=24)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, eval_strategy="steps", eval_steps=1, use_cpu=True,
                             report_to=[], disable_tqdm=True, per_device_train_batch_size=2)
    evaluations = EvalLosses()
    with _extra_callback(evaluations):
        train_token_router(model, RoutingSchedule([0.3] * model.config.num_hidden_layers), data, args=args,
                           eval_dataset=data.select(range(2)))
    assert len(evaluations.losses) == 2 and all(loss > 0 for loss in evaluations.losses)


def test_heads_training_checkpoints_the_heads_only_and_resumes(tmp_path):
    import torch

    from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads, self_distillation_dataset, train_heads
    from hf_compress.speculative.heads import training as heads_training

    base, _ = tiny_model("llama", tie_word_embeddings=True)
    prompts = torch.randint(3, 250, (8, 6), generator=torch.Generator().manual_seed(0))
    data = self_distillation_dataset(base, prompts, 20, batch_size=8)

    def heads(output_dir, resume=None, interrupt_after=None):
        model, _ = tiny_model("llama", tie_word_embeddings=True)
        torch.manual_seed(0)
        trained = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2))
        counter = _step_counter(interrupt_after)
        with _extra_callback(counter, heads_training):
            train_heads(model, trained, data, _checkpointing(output_dir, 4, resume))
        return {name: value.clone() for name, value in trained.state_dict().items()}, counter.count

    straight, _ = heads(tmp_path / "straight")
    heads(tmp_path / "stopped", interrupt_after=2)
    resumed, steps_run = heads(tmp_path / "stopped", resume=True)
    assert steps_run == 2
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    checkpoint = safetensors.torch.load_file(tmp_path / "stopped" / "checkpoint-2" / "model.safetensors")
    assert sorted(checkpoint) == sorted(f"heads.{name}" for name in straight)


def test_heads_training_evaluates_and_keeps_the_best_checkpoint(tmp_path):
    """``eval_strategy`` with ``load_best_model_at_end``: Trainer evaluates the heads on ``eval_dataset`` (cached
    like the training windows) and loads the best checkpoint back into the heads, which are all it holds. "Best" is
    the highest loss here, so that the checkpoint loaded back is not the last step's."""
    import torch
    from transformers import TrainingArguments

    from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads, self_distillation_dataset, train_heads

    model, _ = tiny_model("llama", tie_word_embeddings=True)
    prompts = torch.randint(3, 250, (8, 6), generator=torch.Generator().manual_seed(0))
    data = self_distillation_dataset(model, prompts, 20, batch_size=8)
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, eval_strategy="steps", eval_steps=2,
                             save_strategy="steps", save_steps=2, load_best_model_at_end=True, use_cpu=True,
                             metric_for_best_model="eval_loss", greater_is_better=True,
                             report_to=[], disable_tqdm=True, per_device_train_batch_size=4, learning_rate=3e-3)
    result = train_heads(model, heads, data, args, eval_dataset=data.select(range(4)))
    losses = {row["step"]: row["eval_loss"] for row in result["log_history"] if "eval_loss" in row}
    assert sorted(losses) == [2, 4]
    assert max(losses, key=losses.get) == 2  # training lowered the loss: the "best" is the earlier checkpoint
    loaded_back, last = (safetensors.torch.load_file(tmp_path / f"checkpoint-{step}" / "model.safetensors")
                         for step in (2, 4))
    for name, value in heads.state_dict().items():
        assert torch.equal(value, loaded_back[f"heads.{name}"]), name
    assert any(not torch.equal(value, last[f"heads.{name}"]) for name, value in heads.state_dict().items())


def test_resuming_needs_a_checkpoint_and_experts_refuse_it(tmp_path):
    from hf_compress.experts import ExpertConfig, train_experts

    data = causal_lm_dataset(["text " * 50], tiny_tokenizer(), num_sequences=2, seq_len=16)
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="checkpoint"):  # Trainer's own message: nothing to resume in output_dir
        train_with_trainer(model, data, str(tmp_path), _checkpointing(tmp_path / "empty", 2, resume=True))
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(4)]
    with pytest.raises(ValueError, match="one Trainer per expert.*resume_from_checkpoint unset"):
        train_experts(model, rows, ExpertConfig(num_experts=2, r=2), args=_checkpointing(tmp_path / "x", 2, True))
    settings = TrainingSettings(max_steps=2, extra_arguments={"resume_from_checkpoint": "run/checkpoint-2"})
    with pytest.raises(ValueError, match="one Trainer per expert"):
        train_experts(model, rows, ExpertConfig(num_experts=2, r=2), args=settings)
    # Pushing from every expert's Trainer would send them all to one repo: refused before any work, both ways.
    pushing = dataclasses.replace(_checkpointing(tmp_path / "y", 2), push_to_hub=True, hub_model_id="me/experts")
    for args in (pushing, TrainingSettings(max_steps=2, extra_arguments={"push_to_hub": True})):
        with pytest.raises(ValueError, match="every expert would push to the same Hub repo.*experts.push_to_hub"):
            train_experts(model, rows, ExpertConfig(num_experts=2, r=2), args=args)
    assert not hasattr(model, "peft_config")  # refused before any adapter was added


def test_trainable_parameters_the_backward_never_reaches_are_named_after_the_first_step(caplog, tmp_path):
    """Mamba's mixer reads dt_proj.weight itself: an adapter there never runs and never trains, and a DL-QAT export
    packed the layer all the same. The launcher says so after the first step, naming the layers."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_compress.quantization import DLQATConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mamba", vocab_size=256, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4))
    adapted = get_peft_model(model, DLQATConfig(bits=4, group_size=16, r=2, target_modules="all-linear"))
    ids = torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    with caplog.at_level("WARNING", logger="hf_compress"):
        train_with_trainer(adapted, data, str(tmp_path), TrainingSettings(max_steps=2, use_cpu=True, progress=False,
                                                                          per_device_batch_size=2))
    warned = [record.getMessage() for record in caplog.records if "got no gradient" in record.getMessage()]
    assert len(warned) == 1  # the first step only
    assert "6 trainable tensors" in warned[0]
    assert "backbone.layers.0.mixer.dt_proj, backbone.layers.1.mixer.dt_proj" in warned[0]
    assert "in_proj" not in warned[0]
