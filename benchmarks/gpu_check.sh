#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA device (run from the repository root):
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (on a lent machine: OUT_DIR "$OUT", whose files come back)
# 0. beside the tests, every Triton kernel specialisation the benchmark will launch compiled ahead in parallel
#    (benchmarks/warm_triton.py: its processes then find them in Triton's cache instead of compiling each in turn),
# 1. the CUDA tests (Triton backend against the loop reference, CUDA graphs, no host sync),
# 2. where a step's time goes (benchmarks/profile_gpu.py, one-token and 8192-token bf16 forwards, a one-token fp32
#    forward),
# 3. the layer benchmark (benchmarks/bench_gpu.py, one process per shape and dtype).
# Each step has a time limit (seconds, environment: WARM_S, TESTS_S, PROFILE_S, DECODE_S, LARGE_S) so the whole
# fits a short lease (under 590 s in all by default; the warm-up runs during the tests).
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
cache_entries() { ls -d "${TRITON_CACHE_DIR:-${TRITON_HOME:-$HOME}/.triton/cache}"/*/ 2>/dev/null | wc -l; }
echo "Triton cache: $(cache_entries) entries at the start"
timeout "${WARM_S:-120}" python3 benchmarks/warm_triton.py --workers "$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))" \
    > "$out/gpu_warm.log" 2>&1 &
warm=$!
timeout "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_triton.py -k TestCUDA \
    > "$out/gpu_tests.log" 2>&1
echo "tests: exit $? ($(tail -1 "$out/gpu_tests.log"))"
wait $warm
echo "warm-up: exit $? ($(grep -E '^(warm_triton|  failed)' "$out/gpu_warm.log" | head -4))"
echo "Triton cache: $(cache_entries) entries after the tests and the warm-up"
timeout "${PROFILE_S:-45}" python3 benchmarks/profile_gpu.py --tokens 1 8192 > "$out/gpu_profile.txt" 2>&1
# (fp32 one-token: the few-row tiles on the CUDA cores)
timeout "${PROFILE_S:-45}" python3 benchmarks/profile_gpu.py --dtype float32 --tokens 1 >> "$out/gpu_profile.txt" 2>&1
grep '^## ' "$out/gpu_profile.txt"
# the decode sizes first (T <= 16: the fewest-kernel and few-row-tile paths), then the large ones, each in its own
# time limit, so one that runs long leaves the other's rows; merged into layer_cuda.json
timeout "${DECODE_S:-190}" python3 benchmarks/bench_gpu.py --tokens 1 16 --budget-s "${BUDGET_S:-0.5}" \
    --out "$out/layer_cuda_decode.json" > "$out/gpu_bench.log" 2>&1
echo "bench T <= 16: exit $?"
timeout "${LARGE_S:-170}" python3 benchmarks/bench_gpu.py --tokens 128 1024 8192 --budget-s "${BUDGET_S:-0.5}" \
    --out "$out/layer_cuda_large.json" >> "$out/gpu_bench.log" 2>&1
echo "bench T >= 128: exit $?"
# (with the part a killed run left of the group it was measuring: layer_cuda_<run>.<shape>.<dtype>.json)
python3 benchmarks/bench_gpu.py --merge "$out"/layer_cuda_decode*.json "$out"/layer_cuda_large*.json \
    --out "$out/layer_cuda.json" | grep -v 'max|' | tail -80
# (what the runs compiled that the warm-up had not: the entries the cache gained after it)
echo "Triton cache: $(cache_entries) entries at the end"
# The logs and the runs' own results (merged above) in one archive, so that OUT_DIR holds three files: a lease
# returns only a few files from its output folder (run it as `bash benchmarks/gpu_check.sh "$OUT"` there).
(cd "$out" && parts=$(ls gpu_warm.log gpu_tests.log gpu_bench.log layer_cuda_decode*.json layer_cuda_large*.json \
    2>/dev/null); [ -n "$parts" ] && tar czf gpu_check_logs.tar.gz $parts && rm -f $parts \
    && echo "logs: $out/gpu_check_logs.tar.gz")
