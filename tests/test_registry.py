"""A new method is one folder: defining its config and pruner makes it known to the registry, SDS, the CLI
and ``PruningConfig.from_dict``, with no list anywhere else to edit; strategies load the same way."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from hf_compress.cli.main import build_parser, main
from hf_compress.modeling import set_weight_matrix, weight_matrix
from hf_compress.pruning import PRUNERS, MaskPruner, PruningConfig, SDSConfig
from hf_compress.pruning import registry
from hf_compress.pruning.config import _REGISTRY as config_registry
from hf_compress.pruning.sds import sds_bases
from hf_compress.speculative import strategy_from_dict


@pytest.fixture
def lowest_row_pruner():
    @dataclass
    class LowestRowConfig(PruningConfig):
        """Zero the first inputs of every row (a toy method for the test).

        Args:
            offset: where the zeros start.
        """

        method: ClassVar[str] = "test_lowest_row"
        offset: int = field(default=0, metadata={"cli": ["--start"]})

    class LowestRowPruner(MaskPruner):
        """A toy pruner defined outside the package."""

        config_class = LowestRowConfig
        requires_calibration = False

        def prune_layer(self, name, layer, stats, config):
            weight = weight_matrix(layer).clone()
            count = int(config.pattern.ratio * weight.shape[1])
            weight[:, config.offset : config.offset + count] = 0
            set_weight_matrix(layer, weight)

    yield LowestRowPruner
    registry._PRUNERS.pop("test_lowest_row", None)
    config_registry.pop("test_lowest_row", None)  # later CLI listings in this process would name it


def test_a_defined_pruner_is_known_everywhere(lowest_row_pruner, tmp_path, capsys):
    assert PRUNERS["test_lowest_row"] is lowest_row_pruner
    assert "test_lowest_row" in sds_bases()
    assert type(PruningConfig.from_dict({"method": "test_lowest_row", "offset": 2})).__name__ == "LowestRowConfig"
    SDSConfig(sparsity=0.5, base="test_lowest_row")  # accepted as an SDS base

    with pytest.raises(SystemExit):
        main(["prune", "test_lowest_row", "--help"])
    help_text = capsys.readouterr().out
    # Python 3.13's argparse names the metavar once for all aliases ("--offset, --start OFFSET").
    assert re.search(r"--offset( OFFSET)?, --start OFFSET", help_text) and "where the zeros start" in help_text

    code = main(["-q", "prune", "test_lowest_row", "--model", "tiny-llama", "--sparsity", "0.25", "--start", "1",
                 "--save-dir", str(tmp_path / "out")])
    assert code == 0
    assert "test_lowest_row 0.25: overall sparsity 0.2500" in capsys.readouterr().out


def test_family_bases_are_not_registered_and_every_method_folder_is():
    assert set(PRUNERS) == {"magnitude", "wanda", "sparsegpt", "sds", "tyr", "block_removal", "sleb", "block_pruner"}
    assert "" not in PRUNERS and all(cls.config_class.method == name for name, cls in PRUNERS.items())


def test_configs_list_every_method_without_torch_and_a_lookup_imports_one_pruner():
    """`hf-compress prune --help` lists the methods from their configs; `prune wanda ...` imports Wanda's pruner
    only (every pruner, and torch, were imported for either before)."""
    script = (
        "import sys\n"
        "from hf_compress.pruning import CONFIGS, PRUNERS\n"
        "names = list(CONFIGS)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'listing imported torch'\n"
        "assert PRUNERS['wanda'].config_class is CONFIGS['wanda']\n"
        "others = [m for m in sys.modules if m.endswith('.pruner') and 'wanda' not in m]\n"
        "assert not others, others\n"
        "print(' '.join(names))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == sorted(PRUNERS)
    with pytest.raises(KeyError, match="unknown pruning method 'nope'; known: block_pruner"):
        PRUNERS["nope"]


def test_a_config_without_a_pruner_is_left_out_or_refused(capsys):
    """A config a script defines (no package to find a pruner in), with no pruner: the registry says it has none,
    the full parser leaves it out, and naming it is a usage error, not a traceback."""
    orphan = type("OrphanConfig", (PruningConfig,), {"__module__": "a_script", "method": "test_orphan"})
    try:
        assert config_registry["test_orphan"] is orphan
        assert "test_orphan" not in PRUNERS and PRUNERS.get("test_orphan") is None
        with pytest.raises(SystemExit) as error:
            main(["prune", "test_orphan", "--help"])
        assert error.value.code == 2
        assert "no pruner is registered for method 'test_orphan'" in capsys.readouterr().err
        parser = build_parser()  # every command and method built, as the README check does
        with pytest.raises(SystemExit):
            parser.parse_args(["prune", "test_orphan", "--save-dir", "out"])
        assert "invalid choice: 'test_orphan'" in capsys.readouterr().err
        assert parser.parse_args(["prune", "wanda", "--save-dir", "out"]).pruner_class is PRUNERS["wanda"]
    finally:
        config_registry.pop("test_orphan", None)


def test_methods_are_found_in_a_zipped_install(tmp_path):
    """Discovery asks the import system, not the file system: a zipped (or .pyc-only) package finds its methods."""
    import zipfile
    from pathlib import Path

    import hf_compress

    package = Path(hf_compress.__file__).parent
    archive = tmp_path / "hf_compress.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in package.rglob("*.py"):
            zipped.write(path, path.relative_to(package.parent).as_posix())
    script = ("import hf_compress.pruning as p\n"
              "assert p.__file__.startswith(%r), p.__file__\n"
              "print(' '.join(p.CONFIGS), type(p.PruningConfig.from_dict({'method': 'wanda'})).__name__)\n"
              % str(archive))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(archive)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [*sorted(PRUNERS), "WandaConfig"]


def test_cli_exposes_each_config_field_and_refuses_unknown_methods(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "tyr", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--generations", "--allocation", "--selection-tokens", "--work-dir", "--sparsity", "--tyr-options"):
        assert flag in help_text
    with pytest.raises(SystemExit):
        main(["prune", "no_such_method", "--save-dir", "x"])
    assert "invalid choice" in capsys.readouterr().err


def test_strategies_are_discovered_by_method_name():
    script = (
        "import sys\n"
        "from hf_compress.speculative import strategy_from_dict\n"
        "assert 'hf_compress.speculative.heads' not in sys.modules\n"
        "try:\n"
        "    strategy_from_dict({'method': 'amphista'})\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Amphista drafts with trained heads" in result.stdout  # found in its folder, then built
    with pytest.raises(ValueError, match="Unknown decoding strategy 'nope'"):
        strategy_from_dict({"method": "nope"})


def test_calibration_text_option_reads_a_file(tmp_path, capsys, monkeypatch):
    from hf_compress.pruning import WandaPruner

    received = []
    original = WandaPruner.prune

    def recording(self, config, calibration, *args, **kwargs):
        received.append(calibration)
        return original(self, config, calibration, *args, **kwargs)

    monkeypatch.setattr(WandaPruner, "prune", recording)
    text = tmp_path / "calibration.txt"
    text.write_text(("some calibration words " * 40 + "\n\n") * 4)
    code = main(["-q", "prune", "wanda", "--model", "tiny-llama", "--calibration-text", str(text),
                 "--calibration-sequences", "2", "--seq-len", "16", "--save-dir", str(tmp_path / "out")])
    assert code == 0
    assert len(received) == 1  # the pruner calibrated on the file's text, not on the default Wikipedia split
    texts = received[0]["text"] if hasattr(received[0], "column_names") else list(received[0])
    assert texts and all(t.strip().startswith("some calibration words") for t in texts), texts[:2]
    assert main(["-q", "prune", "wanda", "--model", "tiny-llama", "--calibration-text", str(tmp_path / "missing.txt"),
                 "--save-dir", str(tmp_path / "out2")]) == 2
    error = capsys.readouterr().err
    assert "calibration text" in error and "missing.txt" in error
