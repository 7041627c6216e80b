"""The PTX of haed's Triton kernels for a GPU, compiled on a machine without one: to show that a change to a
kernel's source leaves its machine code alone (a refactor) or to see what it changes.

Triton compiles a kernel for a named target without a GPU (its LLVM and ptxas come with it); only a launch
needs one. This stands in for the GPU (a driver that names the target and never launches), builds each
recipe's model with random bf16 weights on the CPU, and runs the kernels' steps as `generate` would:
`DecoderKernels` for each stream count and each sampling rule the kernel draws with (greedy, temperature,
and logits out for top-k/top-p), `MainKernels` for one stream. Every specialization Triton compiles is
written as `DIR/{kernel}-{recipe}-{n}.ptx` (the recipe's n-th of that kernel), without its line information
(`.loc`, `.file`, the debug sections and their labels), which moves with the source and is not machine code:

    python3 benchmarks/kernel_ptx.py --out /tmp/ptx-before     # speech, enwik8, music, code; sm_90, 132 SMs
    (change a kernel)
    python3 benchmarks/kernel_ptx.py --out /tmp/ptx-after --compare /tmp/ptx-before

`--compare DIR` prints, per file, whether the instructions are the same, and exits 1 where any differ. It
needs Triton (part of a CUDA build of torch; with a CPU build, `pip install triton`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from haed.model import build_model  # noqa: E402
from haed.recipe import load_recipe  # noqa: E402
from haed.samplers import linear_weights_in  # noqa: E402
from haed.sampling import SamplingOptions, StreamNoise  # noqa: E402

RULES = (SamplingOptions(1.0, 0, 1.0), SamplingOptions(0.0, 0, 1.0), SamplingOptions(1.0, 5, 1.0))


def machine_code(ptx: str) -> str:
    """The PTX without what only places it in the source: line directives, debug sections, their labels."""
    kept = []
    for line in ptx.splitlines():
        text = line.strip()
        if text.startswith(".section") and ".debug" in text:
            break  # the debug sections close the file
        if text.startswith((".loc", ".file", "//")) or re.fullmatch(r"\$L__tmp\d+:", text):
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


def compile_only(arch: int, sms: int) -> list[tuple[str, str]]:
    """From now on Triton compiles for sm_{arch} and never launches: the list returned gathers each kernel
    compiled, as (its name, its machine code)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import haed.kernels.decoder as decoder_module
    import haed.kernels.main as main_module
    import haed.kernels.support as support

    class NamedTarget:  # what JITFunction.run asks of a driver before it compiles
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def is_active(self):
            return True

    driver.set_active(NamedTarget())
    # The kernels' own checks would refuse a CPU tensor; the program counts follow the named GPU's SMs.
    support.config_unsupported_reason = lambda cfg, device: None
    decoder_module.sm_count = main_module.sm_count = lambda device: sms
    compiled = []
    run = JITFunction.run

    def compile_without_launch(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, machine_code(kernel.asm["ptx"])))
        print(f"compiled {self.fn.__name__}", flush=True)
        return kernel

    JITFunction.run = compile_without_launch
    return compiled


def compile_recipe(name: str, streams: list[int]) -> None:
    """The kernels' steps for recipe `name`'s model: the decoder's for each stream count and sampling rule,
    and the encoder and main model's for one stream where the model's widths allow it."""
    from haed.kernels import DecoderKernels, MainKernels, main_unsupported_reason

    torch.manual_seed(0)
    model = linear_weights_in(build_model(load_recipe(name).model), torch.bfloat16).eval()
    decoder, K, cpu = model.decoder, model.patch_size, torch.device("cpu")
    width = decoder.stack.cfg.dim
    with torch.no_grad():
        for batch, rule in ((batch, rule) for batch in streams for rule in RULES):
            cond = torch.zeros(batch, K if decoder.conditioning == "add" else 1, width, dtype=torch.bfloat16)
            patch = torch.zeros(batch, 1, K, dtype=torch.uint8)
            cache = decoder.stack.new_cache(batch, K, cpu, torch.bfloat16)
            noise = StreamNoise(list(range(batch)), cpu)
            DecoderKernels(decoder, cache, cond, patch, rule, noise, torch.arange(K)).step(0)
        if main_unsupported_reason(model, 1) is None:
            cache = model.main.new_cache(1, 1025, cpu, torch.bfloat16)
            cond = torch.zeros(1, decoder.condition.out_features // width, width, dtype=torch.bfloat16)
            patch = torch.zeros(1, 1, K, dtype=torch.uint8)
            MainKernels(model, cache, patch, torch.tensor(0), cond).step()


def compare(out: Path, before: Path) -> int:
    """Per file of `before`, whether `out` has the same instructions; 1 where any differ or is missing."""
    olds = sorted(before.glob("*.ptx"))
    differ = 0
    for old in olds:
        new = out / old.name
        same = new.exists() and new.read_text() == old.read_text()
        differ += not same
        print(f"{old.name}: {'same instructions' if same else 'missing' if not new.exists() else 'DIFFERENT'}")
    extra = sorted({p.name for p in out.glob("*.ptx")} - {p.name for p in olds})
    for name in extra:
        print(f"{name}: only in {out}")
    print(f"{len(olds) - differ} of {len(olds)} the same" + (f", {len(extra)} new" if extra else ""))
    return 1 if differ or extra else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="Where the PTX files go (emptied).")
    parser.add_argument(
        "--recipes", default="speech,enwik8,music,code", metavar="LIST", help="Recipes whose models to compile."
    )
    parser.add_argument("--streams", default="1,16,64", metavar="N,N", help="Stream counts of the decoder kernel.")
    parser.add_argument("--arch", type=int, default=90, metavar="SM", help="Compute capability (90: H100, H200).")
    parser.add_argument("--sms", type=int, default=132, metavar="N", help="The GPU's SMs (132: H100 SXM, H200).")
    parser.add_argument("--compare", type=Path, metavar="DIR", help="Another --out to compare with.")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*.ptx"):
        stale.unlink()
    compiled = compile_only(args.arch, args.sms)
    for name in args.recipes.split(","):
        start = len(compiled)
        compile_recipe(name, [int(n) for n in args.streams.split(",")])
        for n, (kernel, code) in enumerate(compiled[start:]):
            nth = sum(k == kernel for k, _ in compiled[start : start + n])
            (args.out / f"{kernel}-{name}-{nth}.ptx").write_text(code)
    return compare(args.out, args.compare) if args.compare else 0


if __name__ == "__main__":
    sys.exit(main())
