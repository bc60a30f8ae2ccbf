#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run every test that needs CUDA (bf16 kernels, the
# CUDA greedy order), then every benchmark, and leave the Markdown ratio tables in ${OUT:-.}/gpu_report.md.
# Each stage has its own time limit (seconds, arguments 1-3; defaults fit one 10-minute device call) so a
# slow stage cannot swallow the others; logs go to ${OUT:-.}. Copy the figures into bench/RESULTS.md with
# the date, the device and this command.
#
# The GPU machines have torch, triton, transformers, accelerate, pytest-xdist and pytest-benchmark but no
# network; math-verify is not needed by these stages.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
build_limit="${1:-100}" tests_limit="${2:-150}" bench_limit="${3:-200}"
export PYTHONUNBUFFERED=1

stage() {  # stage NAME LIMIT COMMAND...: run with a time limit, log to $out/NAME.log, print its tail
    local name="$1" limit="$2" start=$SECONDS rc
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
    tail -n 25 "$out/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu_device.txt"
stage build "$build_limit" bash -c 'AGDO_BUILD_CUDA=1 python3 -m pip install --no-deps --no-build-isolation -e . &&
    python3 -c "import agdo_kernels, json; print(json.dumps(agdo_kernels.available_backends(\"cuda\"), indent=1))"'
stage gpu_tests "$tests_limit" python3 -m pytest -n 8 -q -ra tests/test_cuda_attention.py tests/test_valid_attention.py \
    tests/test_influence.py tests/test_response_attention.py tests/test_greedy_order.py tests/test_triton_attention.py \
    tests/test_nonfinite_attention.py tests/test_launch_configs.py \
    tests/test_block_cache.py::test_cuda_bf16_cached_step_and_its_triton_s_follow_the_full_forward
stage profile 60 python3 bench/profile_kernels.py
# One pytest per benchmark file so a time-out loses one table, not all (and each table is rewritten after
# every case, so a cut keeps what finished); files in order of what the open targets need, each with its
# -k filter (the CPU cases are left to CPU runs; decoding: the 1,024-token cases of the cache targets; RL:
# AGDO-RL against its baseline TraceRL) and its share of the bench limit in percent, so the first entries
# cannot use up the time of the next ones; the last entry takes whatever is left.
: >"$out/gpu_report.md"
bench_start=$SECONDS
for entry in "bench_attention|not cpu|30" "bench_decoding|gpu and 1024|30" "bench_rl_step|cuda and (agdo or tracerl)|10" \
    "bench_greedy_order|not cpu|5" "bench_capture|not cpu|5" "bench_sft_step|not cpu|5" \
    "bench_decoding|gpu and not 1024|100"; do
    file="${entry%%|*}" rest="${entry#*|}"
    filter="${rest%|*}" share="${rest##*|}"
    left=$((bench_limit - (SECONDS - bench_start)))
    cap=$((bench_limit * share / 100))
    [ "$cap" -lt "$left" ] || cap=$left
    [ "$cap" -gt 10 ] || { echo "== $file ($filter): skipped, bench time used up" | tee -a "$out/gpu_bench.log"; continue; }
    timeout "$cap" python3 -m pytest "bench/$file.py" -q -k "$filter" --bench-report "$out/$file.md" >>"$out/gpu_bench.log" 2>&1
    echo "== $file ($filter): exit $? after $((SECONDS - bench_start)) s" | tee -a "$out/gpu_bench.log"
    [ -f "$out/$file.md" ] && { cat "$out/$file.md" >>"$out/gpu_report.md"; rm "$out/$file.md"; }
done
tail -n 5 "$out/gpu_bench.log"
cat "$out/gpu_report.md"
