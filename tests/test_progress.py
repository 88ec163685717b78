"""The live lines as an 80-column terminal shows them: one line per member, every figure on it.

(The live lines of a real run on a pseudo-terminal are tested in tests/test_pseudo_label.py.)
"""

import re

from rich.console import Console

from ensemble.progress import Progress


def rendered(names: list[str], width: int) -> list[str]:
    progress = Progress(name_of=lambda run, member: member, epochs=12, live=False)
    rows = {
        name: {
            "epoch": 3,
            "step": 117,
            "steps": 156,
            "loss": 0.0648,
            "accuracy": 0.9796,
            "seconds": 88.5,
            "images_per_second": 1352.4,
        }
        for name in names
    }
    console = Console(width=width, record=True, color_system=None)
    console.print(progress._render(rows))
    return console.export_text().splitlines()


def test_each_member_keeps_one_whole_line_on_80_columns() -> None:
    lines = rendered([f"member-{index:02d}" for index in range(4)], width=80)
    assert len(lines) == 5, lines
    for index, line in enumerate(lines[:4]):
        assert re.fullmatch(
            rf"member-{index:02d} +epoch 3/12 +step 117/156 +loss 0\.0648 +acc 0\.9796 +1,352 img/s +18:11 left *",
            line,
        ), line
    assert lines[4].strip() == "run: 18:11 left at least"


def test_a_narrow_terminal_cuts_lines_short_rather_than_wrapping_them() -> None:
    lines = rendered(["member-00-round-1", "member-01-round-1"], width=60)
    assert len(lines) == 3, lines
    assert all(line.startswith("member-0") for line in lines[:2]), lines
