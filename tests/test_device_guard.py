"""The CPU-side device guard: the CUDA journeys of ``test_cuda.py``, run on the CPU, where every tensor the
library creates must name its device.

The commonest CUDA bug is a tensor built inside the library without ``device=`` (it lands on the CPU) that
then meets the model's tensors on the GPU (Týr's ``removed`` mask was one). On a CPU-only machine both
devices are the CPU, so the bug is invisible. :class:`LibraryDeviceGuard` makes it visible: while active, a
factory call (``torch.zeros``, ``torch.tensor``, ``torch.arange``, ...) made *from a file of hf_compress*
without a ``device`` puts its tensor on ``"meta"`` (a different device, as CUDA would be) and records where
it was called. The journeys then fail where the CUDA run would, and the test names each call site.

A different default device (``torch.set_default_device("meta")``) would do the same for the library, but
also for transformers, tokenizers and torch.nn's own module construction, which legitimately build on the
default device; the guard only looks at calls made from ``hf_compress/``. A tensor the library means to
keep on the CPU names ``device="cpu"``, which the guard accepts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import hf_compress
from test_cuda import JOURNEYS


# Tiny models on one thread: under load, two threads made the CoSpec journey 95 s instead of 6 s.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


_LIBRARY = str(Path(hf_compress.__file__).resolve().parent) + "/"
_TORCH = str(Path(torch.__file__).resolve().parent) + "/"
# Functions that create a tensor on the default device unless given ``device``. The *_like and new_* forms
# follow their input and are not listed.
_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.as_tensor, torch.eye,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.logspace, torch.empty_strided,
    torch.range, torch.tril_indices, torch.triu_indices,
}


# Call sites in files this suite's authors do not own, CPU by design, each with its reason; keep this short.
_CPU_BY_DESIGN: dict[str, set[str]] = {}  # none today: the byte tables of cache/read.py name device="cpu"


class LibraryDeviceGuard(TorchFunctionMode):
    """While active, library factory calls without ``device`` create on ``"meta"``; ``sites`` says where.

    Example:
        >>> with LibraryDeviceGuard() as guard:  # doctest: +SKIP
        ...     run_a_journey()
        >>> guard.sites  # doctest: +SKIP
        ['hf_compress/pruning/tyr/local_pruner.py:79 (prune): torch.zeros']
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES and kwargs.get("device") is None and not _follows_its_input(func, args, kwargs):
            caller, building_a_module = _first_caller_outside_torch()
            if caller is not None and caller.f_code.co_filename.startswith(_LIBRARY) and not building_a_module:
                where = caller.f_code.co_filename[len(_LIBRARY) - len("hf_compress/"):]
                if caller.f_code.co_name in _CPU_BY_DESIGN.get(where, ()):
                    return func(*args, **kwargs)
                site = f"{where}:{caller.f_lineno} ({caller.f_code.co_name}): torch.{func.__name__}"
                if site not in self.sites:
                    self.sites.append(site)
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _follows_its_input(func, args, kwargs) -> bool:
    # torch.as_tensor(t) / torch.tensor(t) of a tensor keep that tensor's device; a draw from a generator is
    # on the generator's device (torch refuses any other).
    if func in (torch.as_tensor, torch.tensor) and args and isinstance(args[0], torch.Tensor):
        return True
    return kwargs.get("generator") is not None


def _builds_a_module(frame) -> bool:
    # nn.Module construction follows torch.nn's own convention: parameters on the default device, moved
    # with .to() by whoever builds the module (e.g. DraftHeads.for_model moves heads to the model's device).
    return frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), torch.nn.Module)


def _first_caller_outside_torch():
    """The first frame outside torch above the factory call, and whether the call builds an nn.Module
    (inside torch.nn, e.g. ``nn.Linear(...)``, or in a library module's own ``__init__``)."""
    frame = sys._getframe(2)
    building = False
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH):
        building = building or _builds_a_module(frame)
        frame = frame.f_back
    return frame, building or (frame is not None and _builds_a_module(frame))


def run_guarded(journey, tmp_path) -> None:
    """Run ``journey`` on the CPU under the guard; fail naming every library call site without a device."""
    guard = LibraryDeviceGuard()
    error = None
    with guard:
        try:
            journey("cpu", tmp_path)
        except Exception as err:  # a meta tensor meeting a CPU one; the sites below say where it came from
            error = err
    assert not guard.sites, "tensors created without a device (pass device=<the input's device>):\n  " + "\n  ".join(guard.sites)
    if error is not None:
        raise error


@pytest.mark.parametrize("journey", JOURNEYS, ids=[j.__name__.removeprefix("journey_") for j in JOURNEYS])
def test_journey_creates_every_tensor_on_its_inputs_device(journey, tmp_path):
    run_guarded(journey, tmp_path)


def test_the_guard_catches_a_tensor_created_without_a_device(tmp_path, monkeypatch):
    """A library function that builds a mask on the default device, as Týr's local pruner once did, fails
    under the guard and is named; the same function passing ``device=`` passes."""
    from hf_compress.pruning import masks

    def slipped(scores: torch.Tensor) -> torch.Tensor:
        removed = torch.zeros(scores.shape[-1], dtype=torch.bool)
        return scores.masked_fill(removed, 0.0)

    def clean(scores: torch.Tensor) -> torch.Tensor:
        removed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        return scores.masked_fill(removed, 0.0)

    # Compile both into a file of the library so the guard treats them as library code.
    library_file = masks.__file__
    namespace: dict = {"torch": torch}
    for function in (slipped, clean):
        source = "\n".join(line[4:] for line in __import__("inspect").getsource(function).splitlines())
        exec(compile(source, library_file, "exec"), namespace)

    with pytest.raises(AssertionError, match=r"masks\.py:\d+ \(slipped\): torch.zeros"):
        run_guarded(lambda device, _: namespace["slipped"](torch.ones(2, 4, device=device)), tmp_path)
    run_guarded(lambda device, _: namespace["clean"](torch.ones(2, 4, device=device)), tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_a_device_this_machine_lacks_before_loading(capsys, monkeypatch, tmp_path):
    from hf_compress.cli.main import main

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr("hf_compress.assets.load_model", refuse)
    monkeypatch.setattr("hf_compress.assets.resolve.load_model", refuse)
    assert main(["eval", "--model", "tiny-llama", "--device", "cuda"]) == 2
    assert "no CUDA GPU is available here; pass --device cpu" in capsys.readouterr().err
    assert main(["prune", "magnitude", "--model", "tiny-llama", "--sparsity", "2:4", "--save-dir",
                 str(tmp_path / "unused"), "--device", "mps"]) == 2
    assert "hf_compress runs on cpu or cuda" in capsys.readouterr().err
    assert not (tmp_path / "unused").exists()
