"""The model-card templates in ``model_cards/`` say each thing once: no paragraph is repeated."""

from __future__ import annotations

from pathlib import Path

import pytest


TEMPLATES = sorted((Path(__file__).resolve().parents[1] / "model_cards").glob("*.md"))


@pytest.mark.parametrize("template", TEMPLATES, ids=[path.stem for path in TEMPLATES])
def test_no_run_of_lines_appears_twice(template):
    # Three consecutive lines of prose seen twice is a pasted-twice paragraph (decoding_strategy.md had one).
    lines = [line.strip() for line in template.read_text(encoding="utf-8").splitlines()]
    seen: dict[tuple[str, ...], int] = {}
    for number in range(len(lines) - 2):
        run = tuple(lines[number : number + 3])
        if not all(run) or any(line.startswith(("{%", "|", "```", "---")) for line in run):
            continue
        first = seen.get(run, 0) + 1
        assert run not in seen, f"{template.name}: lines {first} and {number + 1} start the same paragraph"
        seen[run] = number


def test_templates_are_found():
    assert {"decoding_strategy", "adapter", "compressed_model"} <= {path.stem for path in TEMPLATES}
