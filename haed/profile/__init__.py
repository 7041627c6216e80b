"""Memory and speed of the training objectives, measured: `haed profile-memory`.

For every objective x sequence length x batch size ("cell"), a fresh model trains for a few real
optimizer steps through the trainer's own step; per cell: peak allocated and reserved CUDA memory,
the median step time, bytes per second, the IEM candidates per step and an estimate of the matrix
FLOPs per step. An out-of-memory cell is reported as "OOM"; the sweep goes on.

- :mod:`haed.profile.harness`: the device, measuring one cell, out-of-memory detection;
- :mod:`haed.profile.windows`: the byte windows a cell trains on (a dataset's or synthetic);
- :mod:`haed.profile.flops`: matrix FLOPs of one step (`step_flops`);
- :mod:`haed.profile.defaults`: what a run measures when not told (per device);
- :mod:`haed.profile.cells`: one cell (an objective at one length and batch size) through the trainer's pieces;
- :mod:`haed.profile.sweep`: the sweep over objectives, lengths and batch sizes;
- :mod:`haed.profile.context`: the longest-context search;
- :mod:`haed.profile.report`: ratios, merging profiles, one-line descriptions, JSON, the plot.
"""

from haed.layers import attention_flops, linear_weights
from haed.profile.cells import (
    build_for_objective,
    objective_cell,
    objective_model_config,
    objective_train_config,
    parameter_counts,
)
from haed.profile.context import max_context
from haed.profile.defaults import CPU_DEFAULTS, CUDA_DEFAULTS, SweepDefaults, SweepPlan, default_sweep, plan_sweep
from haed.profile.flops import DEFAULT_PEAK_TFLOPS, FLOPS_CONVENTION, add_fraction_of_peak, step_flops
from haed.profile.harness import (
    CPU_MEMORY_NOTE,
    GIB,
    NO_CUDA_MESSAGE,
    environment,
    is_oom,
    measure_cell,
    profile_device,
)
from haed.profile.report import (
    SCHEMA,
    command_line,
    compute_ratios,
    describe_cell,
    describe_defaults,
    describe_max_context,
    describe_measured,
    merge_profiles,
    plot_profile,
    profile_to_json,
    read_profile_json,
    write_profile_json,
)
from haed.profile.sweep import profile_memory
from haed.profile.windows import RANDOM_BYTES, SYNTHETIC_NOTE, WindowSource, distinct_patches

__all__ = [
    "CPU_DEFAULTS",
    "CPU_MEMORY_NOTE",
    "CUDA_DEFAULTS",
    "DEFAULT_PEAK_TFLOPS",
    "FLOPS_CONVENTION",
    "GIB",
    "NO_CUDA_MESSAGE",
    "RANDOM_BYTES",
    "SCHEMA",
    "SYNTHETIC_NOTE",
    "SweepDefaults",
    "SweepPlan",
    "WindowSource",
    "add_fraction_of_peak",
    "attention_flops",
    "build_for_objective",
    "command_line",
    "compute_ratios",
    "default_sweep",
    "describe_cell",
    "describe_defaults",
    "describe_max_context",
    "describe_measured",
    "distinct_patches",
    "environment",
    "is_oom",
    "linear_weights",
    "max_context",
    "measure_cell",
    "merge_profiles",
    "objective_cell",
    "objective_model_config",
    "objective_train_config",
    "parameter_counts",
    "plan_sweep",
    "plot_profile",
    "profile_device",
    "profile_memory",
    "profile_to_json",
    "read_profile_json",
    "step_flops",
    "write_profile_json",
]
