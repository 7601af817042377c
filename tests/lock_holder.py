"""``held_by_another_process(path)``: a lock file held by a live subprocess, for tests of lock refusals."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HOLDER = (
    "import sys, time; from hf_compress.utils import file_lock\n"
    "with file_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n"
)


@contextmanager
def held_by_another_process(lock_path: Path) -> Iterator[None]:
    """While inside, another process holds ``file_lock(lock_path)``; it is killed on exit (releasing the lock)."""
    process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        yield
    finally:
        process.kill()
        process.wait()
