#!/usr/bin/env bash
# benches/perf.py workloads on the lent GPU machine, from carried wheels.
#
# Here (repo root): build our wheel and gather the pure-Python wheels the GPU machine lacks:
#   echo /.whl/ >> .git/info/exclude; rm -f .whl/sgl_diffusion-*.whl; maturin build --release --out .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl diffusers==0.42.1 importlib_metadata==8.7.0 \
#       zipp==3.23.0 ftfy==6.3.1 wcwidth==0.7.0 sageattention==1.0.6 pytest==9.2.0 pluggy iniconfig \
#       pytest-timeout pygments
# There (device tool, carry [".whl"]), any of the workloads in order, plus `kernels` / `graph-tests` (the
# CUDA-only tests of the fused kernels / of CUDA graphs):
#   BENCH_COMMIT=<sha> bash benches/gpu_perf.sh kernels flux-forward wan-forward
# Results land in $OUT (<workload>.json / .md and a log). Extra perf.py flags per workload go in
# PERF_ARGS_<WORKLOAD> with - replaced by _, e.g. PERF_ARGS_flux_forward="--cfg-shapes 16 32".
set -euo pipefail

OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_perf.log") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# The fused kernels are a separate pure-Python package; the checkout's copy is the one under test.
export PYTHONPATH=/tmp/site:$PWD/kernels PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export BENCH_COMMIT=${BENCH_COMMIT:-unknown}

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"

for workload in "$@"; do
    echo "== $workload ($(date -u +%H:%M:%S))"
    # The CUDA-only tests, on the GPU. pythonpath= : test the installed wheel (the checkout has no built
    # extension there), kernels from PYTHONPATH.
    if [[ "$workload" == kernels ]]; then
        # Kernels against their references at full size, GEMM epilogues.
        python3 -m pytest -q -s -p no:cacheprovider -o pythonpath= tests/python/test_kernels.py \
            tests/python/test_linear_fusions.py || echo "kernel tests FAILED"
        continue
    fi
    if [[ "$workload" == graph-tests ]]; then
        # CUDA-graph replay against the plain forward, per model and through the engine.
        python3 -m pytest -q -p no:cacheprovider -o pythonpath= tests/python/test_cuda_graphs.py \
            || echo "graph tests FAILED"
        continue
    fi
    extra_var="PERF_ARGS_${workload//-/_}"
    # shellcheck disable=SC2086  # word splitting of the extra flags is intended
    python3 benches/perf.py --workload "$workload" --out-dir "$OUT" ${!extra_var:-} || echo "$workload FAILED"
done
echo "== done $(date -u +%H:%M:%S)"
