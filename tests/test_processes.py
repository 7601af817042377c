"""Several processes running one script (``hf_compress.utils.processes``): only the main one writes, pushes, draws
bars and logs below WARNING. ``RANK`` stands for torchrun's process rank (no process group is started here); the
2-process run itself is ``tests/test_training_ddp.py``."""

from __future__ import annotations

import logging

import pytest

from hf_compress.assets import tiny_model
from hf_compress.hub import push_to_hub
from hf_compress.pruning import save_pruned
from hf_compress.speculative import FLy
from hf_compress.utils import get_logger, is_main_process, main_process_only, progress_bar


def test_another_rank_writes_nothing_and_is_told_where_the_folder_is(tmp_path, monkeypatch):
    model, tokenizer = tiny_model("llama", seed=0)
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    assert save_pruned(model, tokenizer, tmp_path / "pruned", recipe={"method": "manual"}) == tmp_path / "pruned"
    assert FLy().save_pretrained(tmp_path / "fly") == tmp_path / "fly"
    assert push_to_hub(tmp_path / "never-written", "me/never") is None  # no folder, no network: nothing was tried
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    assert save_pruned(model, tokenizer, tmp_path / "pruned", recipe={"method": "manual"}) == tmp_path / "pruned"
    assert (tmp_path / "pruned" / "config.json").is_file()


def test_main_process_only_keeps_the_signature_and_binds_the_target_by_name_or_position(monkeypatch):
    @main_process_only("save_dir")
    def save(model, save_dir, *, overwrite=False):
        """Docstring kept."""
        return "written"

    assert save.__doc__ == "Docstring kept." and save(None, "a") == "written"
    monkeypatch.setenv("RANK", "1")
    assert str(save(None, "a")) == "a" and str(save(None, save_dir="b", overwrite=True)) == "b"


def test_other_ranks_draw_no_bars_and_log_warnings_only(monkeypatch, caplog):
    logger = get_logger("hf_compress.test_processes")
    monkeypatch.setenv("RANK", "1")
    assert progress_bar(range(3)).disable
    with caplog.at_level(logging.INFO, logger="hf_compress"):
        logger.info("calibrating block 3")
        logger.warning("the budget is spent")
    assert [record.getMessage() for record in caplog.records] == ["the budget is spent"]
    monkeypatch.setenv("RANK", "0")
    assert not progress_bar(range(3), disable=False).disable
    with caplog.at_level(logging.INFO, logger="hf_compress"):
        logger.info("calibrating block 4")
    assert caplog.records[-1].getMessage() == "calibrating block 4"


def test_every_library_module_logs_through_get_logger():
    """A module's own logging.getLogger would skip the filter that keeps other ranks to warnings."""
    import importlib
    import pathlib
    import re

    package = pathlib.Path(__file__).resolve().parents[1] / "hf_compress"
    bare = [str(path.relative_to(package)) for path in package.rglob("*.py")
            if path.name != "logging.py" and re.search(r"^\w+ = logging\.getLogger\(", path.read_text(), re.M)]
    assert bare == []
    importlib.import_module("hf_compress.cache.query_capture")
    assert logging.getLogger("hf_compress.cache.query_capture").filters


def test_another_rank_does_not_check_a_save_folder_it_will_not_write(tmp_path, monkeypatch):
    from hf_compress.hub.publish import publish
    from hf_compress.utils import check_save_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a model"):
        check_save_dir(tmp_path / "out")
    monkeypatch.setenv("RANK", "1")  # rank 0 saved it first: a late rank must not fail on it
    assert check_save_dir(tmp_path / "out") == tmp_path / "out"
    assert publish(tmp_path / "no-manifest", namespace="me") == []  # nothing read, nothing sent


def test_a_tensor_parallel_model_is_refused_on_every_rank(tmp_path, monkeypatch):
    """Saving it gathers from every rank: rank 0 alone would wait for the others forever."""
    model, tokenizer = tiny_model("llama", seed=0)
    model._tp_size = 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(NotImplementedError, match="tensor-parallel"):
            save_pruned(model, tokenizer, tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists()


def test_the_library_draws_every_bar_through_progress_bar():
    """A bare ``tqdm`` would draw on every rank under torchrun (``progress_bar`` draws on the main process only)."""
    import pathlib
    import re

    package = pathlib.Path(__file__).resolve().parents[1] / "hf_compress"
    bare = [str(path.relative_to(package)) for path in package.rglob("*.py")
            if path.name != "logging.py" and re.search(r"^\s*(from tqdm|import tqdm)", path.read_text(), re.M)]
    assert bare == []
