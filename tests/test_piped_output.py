"""Off a terminal (a pipe, a file, a CI log) every table prints whole: `haed compare`, `haed evaluate` and
`haed profile-memory` with stdout piped, as `haed compare ... | cat` runs them. Rich alone would fit each
table to 80 columns there and cut cells to `…` (`paramete…`, `2,0…`, `12.…`)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from _tiny import make_text_dataset, write_recipe_toml

from haed.compare_report import describe_phase_ends, describe_phases
from haed.recipe import debug_recipe

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _cells(text: str) -> set[str]:
    """Every cell of every table row in `text`, stripped."""
    return {cell.strip() for line in text.splitlines() if "│" in line or "┃" in line for cell in re.split("[│┃]", line)}


def test_piped_tables_print_every_value_whole(tmp_path):
    data = make_text_dataset(tmp_path / "words")
    recipe = debug_recipe(str(data))
    for phase in (recipe.iem, recipe.decoder, recipe.full):
        phase.log_every = 100
    path = write_recipe_toml(tmp_path / "debug.toml", recipe)
    other = tmp_path / ("also-scored-" + "x" * 60 + ".txt")  # a column header longer than 80 columns alone
    other.write_bytes(b"the cat sat on the mat " * 40)
    out = tmp_path / "compare"
    plan = {
        "commands": [
            ["compare", "--recipe", str(path), "--time-budget", "0.5", "--out", str(out), "--systems", "iem,full"]
            + ["--evals", "1", "--device", "cpu", "--eval-data", str(other)],
            ["evaluate", "--run", str(out / "full"), "--device", "cpu", "--json", str(tmp_path / "eval.json")],
            ["profile-memory", "--recipe", str(path), "--device", "cpu", "--objectives", "iem"]
            + ["--seq-lens", "64,1024", "--batch-sizes", "2", "--steps", "1", "--warmup", "1"]
            + ["--json", str(tmp_path / "profile.json"), "--plot", str(tmp_path / "profile.png")],
        ]
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "FORCE_TERMINAL")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, str(TESTS / "_torchrun_commands.py"), str(tmp_path / "plan.json")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    printed, cells = done.stdout, _cells(done.stdout)
    assert "…" not in printed, printed

    compared = json.loads((out / "compare.json").read_text())
    assert {"system", "parameters", "steps, training MB/s", "valid at phase ends", str(other)} <= cells
    for row in compared["rows"]:
        assert row["label"] in cells
        assert f"{row['parameters'] / 1e6:.2f}M" in cells
        assert describe_phases(row) in cells and describe_phase_ends(row) in cells
        assert f"{row['test_bits_per_byte']:.4f}" in cells and f"{row['other_data'][str(other)]:.4f}" in cells

    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert {evaluated["run"], f"{evaluated['bits_per_byte']:.4f}", evaluated["windowing"]} <= cells

    profiled = json.loads((tmp_path / "profile.json").read_text())
    assert {"peak alloc GiB", "peak reserved GiB", "median step ms", "bytes/s (M)", "1,024"} <= cells
    for cell in profiled["cells"]:
        assert f"{cell['median_step_ms']:.1f}" in cells and f"{cell['seq_len']:,}" in cells
