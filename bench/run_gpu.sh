#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run every test that needs CUDA (bf16 kernels, the
# CUDA greedy order), then every benchmark, and leave the Markdown ratio table in ${OUT:-.}/gpu_report.md.
# Copy the figures into bench/RESULTS.md with the date, the device and this command.
#
# The GPU machines have torch, triton, transformers and accelerate but no network: pybind11, math-verify,
# matplotlib and pytest-benchmark may have to travel as wheels (see the device tool's README).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu_device.txt"
AGDO_BUILD_CUDA=1 python3 -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 3
python3 -c "import agdo_kernels, json; print(json.dumps(agdo_kernels.available_backends('cuda'), indent=1))"
python3 -m pytest tests/test_valid_attention.py tests/test_influence.py tests/test_response_attention.py \
    tests/test_greedy_order.py tests/test_triton_attention.py tests/test_models.py -q -ra 2>&1 | tee "$out/gpu_tests.log" | tail -n 25
python3 -m pytest bench -q --bench-report "$out/gpu_report.md" 2>&1 | tee "$out/gpu_bench.log" | tail -n 5
cat "$out/gpu_report.md"
