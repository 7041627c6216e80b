"""Several `haed` commands one after another in one process: under torchrun in each process, then
optionally a training run whose rank 0 dies abruptly (no cleanup, no checkpoint) right after logging a
given step; or plainly with `python`, as tests/test_piped_output.py runs it with stdout piped.

Each command goes through the CLI's own entry point, as `torchrun ... -m haed_cli.main -- ARGS`
would run it, but torchrun and the imports start once for all of them.

    torchrun --standalone --nproc-per-node 2 tests/_torchrun_commands.py PLAN.json

PLAN.json: {"commands": [[ARG, ...], ...], "crash": {"recipe": PATH, "objective": NAME, "run": DIR, "after_step": N}}
"""

import json
import os
import sys
from pathlib import Path

from haed.recipe import load_recipe
from haed.train import train
from haed_cli.main import app

plan = json.loads(Path(sys.argv[1]).read_text())
for args in plan.get("commands", []):
    code = app(args, standalone_mode=False)
    if code:
        sys.exit(f"haed {' '.join(args)} exited with {code}")

crash = plan.get("crash")
if crash:

    def on_event(event: dict) -> None:
        if event["event"] == "log" and event["step"] == crash["after_step"]:
            os._exit(9)

    train(load_recipe(crash["recipe"]), crash["objective"], Path(crash["run"]), on_event=on_event)
    sys.exit("the run ended before the step it was to crash at")
