#!/usr/bin/env bash
# FLUX.1 `generate` on a GPU from the abi3 wheel: the tiny fixture, then a full-size FLUX.1-dev
# pipeline with random bf16 weights (benches/build_random_flux.py), 1024x1024, 28 steps, seed 0.
#
# Here (builds the wheel and fetches the pure-Python wheels the GPU machine lacks):
#   echo /.whl/ >> .git/info/exclude; maturin build --release --out .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.0 zipp==3.23.0
# On the device machine (repo root, .whl carried):
#   bash benches/gpu_flux_generate.sh            # writes perf JSONs, log and one PNG to $OUT
# CPU smoke test of this script (tiny sizes, uses the installed package, no wheels):
#   SMOKE=1 OUT=/tmp/smoke bash benches/gpu_flux_generate.sh
set -euo pipefail

OUT=${OUT:-/tmp/bench_out}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
PROMPT="a photo of a red fox sitting in fresh snow, golden hour"
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ "$SMOKE" == 1 ]]; then
    DEVICE=cpu FX_SIZE=64 FX_STEPS=2 FULL_SIZE=64 FULL_STEPS=2 TINY=--tiny PRECISIONS="fp32" NEED_GIB=0
else
    DEVICE=cuda FX_SIZE=256 FX_STEPS=4 FULL_SIZE=1024 FULL_STEPS=28 TINY= PRECISIONS="bf16 fp32" NEED_GIB=40
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi

timed() {  # timed LABEL CMD...: runs CMD, prints its wall time
    local label=$1 start end
    shift
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    echo "[wall] $label: $(python3 -c "print(f'{$end - $start:.1f}')") s"
}

echo "== environment"
date -u
[[ "$SMOKE" == 1 ]] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 - <<'EOF'
import sys, torch, transformers, diffusers, sgl_diffusion
print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| diffusers", diffusers.__version__, "| sgl_diffusion", sgl_diffusion.__version__, sgl_diffusion.__file__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("cuda", torch.version.cuda, "|", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
EOF
which sgl-diffusion

# A folder with room for the 32 GiB full-size pipeline.
MODEL_DIR=
for base in /tmp "$PWD" /dev/shm /root; do
    free=$(df -BG --output=avail "$base" 2>/dev/null | tail -1 | tr -dc 0-9) || continue
    echo "free on $base: ${free:-?} GiB"
    if [[ -n "$free" && "$free" -ge "$NEED_GIB" ]]; then MODEL_DIR="$base/flux1-dev-random"; break; fi
done
[[ -n "$MODEL_DIR" ]] || { echo "no folder with $NEED_GIB GiB free"; exit 1; }
rm -rf "$MODEL_DIR" /tmp/fx /tmp/fx_out

echo "== fixture (tiny random FLUX.1-dev), ${FX_SIZE}x${FX_SIZE}, $FX_STEPS steps, $DEVICE"
python3 -m sgl_diffusion.testing flux1_dev /tmp/fx
for prec in $PRECISIONS; do
    timed "fixture generate $prec" sgl-diffusion generate --model-path /tmp/fx --prompt "$PROMPT" --device "$DEVICE" \
        --height "$FX_SIZE" --width "$FX_SIZE" --num-inference-steps "$FX_STEPS" --seed 0 \
        --dit-precision "$prec" --vae-precision "$prec" --output-path /tmp/fx_out \
        --perf-dump-path "$OUT/fixture_$prec.json"
done

echo "== full-size FLUX.1-dev, random bf16 weights -> $MODEL_DIR"
timed "build_random_flux" python3 "$BENCH_DIR/build_random_flux.py" "$MODEL_DIR" --device "$DEVICE" $TINY
du -sh "$MODEL_DIR"

echo "== generate (CLI, one cold run), ${FULL_SIZE}x${FULL_SIZE}, $FULL_STEPS steps, bf16, seed 0"
timed "full generate bf16" sgl-diffusion generate --model-path "$MODEL_DIR" --prompt "$PROMPT" --device "$DEVICE" \
    --height "$FULL_SIZE" --width "$FULL_SIZE" --num-inference-steps "$FULL_STEPS" --seed 0 \
    --dit-precision bf16 --vae-precision bf16 --output-path "$OUT" --output-file-name flux1_dev_random_1024.png \
    --perf-dump-path "$OUT/full_cli.json"

echo "== DiffGenerator: load once, warm-up + 2 runs"
timed "warm generate" python3 "$BENCH_DIR/flux_warm_generate.py" "$MODEL_DIR" --out "$OUT/full_warm.json" --runs 3 \
    --height "$FULL_SIZE" --width "$FULL_SIZE" --steps "$FULL_STEPS" --seed 0 --device "$DEVICE" --precision bf16

echo "== reference: diffusers FluxTransformer2DModel forward, same card"
timed "diffusers forward" python3 "$BENCH_DIR/diffusers_flux_forward.py" --out "$OUT/diffusers_forward.json" \
    --height "$FULL_SIZE" --width "$FULL_SIZE" --device "$DEVICE" $TINY ||
    echo "diffusers reference forward failed (not our package)"

echo "== summary"
fx_args=()
for prec in $PRECISIONS; do fx_args+=("fixture-$prec=$OUT/fixture_$prec.json"); done
python3 "$BENCH_DIR/summarize_perf.py" "${fx_args[@]}" "full-cli=$OUT/full_cli.json" \
    "full-warm=$OUT/full_warm.json" "diffusers=$OUT/diffusers_forward.json"
ls -la "$OUT"
date -u
