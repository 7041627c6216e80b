# Source this in the repository root on the device machine (the `run` tool), with `.whl` carried:
#
#     source benchmarks/device_setup.sh
#
# It installs the carried wheels (MEGABYTE-pytorch 0.3.6 and beartype; everything else the
# benchmarks need -- torch, einops, tqdm, packaging, numpy, typer, rich, safetensors, matplotlib --
# is on the GPU image) into /tmp/site, and puts them and this checkout (haed, haed_cli) on the
# Python path. Make the wheels here first (see benchmarks/README.md).
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "device_setup: no wheels in .whl/ (carry .whl; see benchmarks/README.md)" >&2
    return 1 2>/dev/null || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_setup: installing .whl/*.whl failed" >&2; return 1 2>/dev/null || exit 1; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
