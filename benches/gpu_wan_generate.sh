#!/usr/bin/env bash
# Wan2.1-T2V-1.3B `generate` on a GPU from the abi3 wheel: a full-size pipeline with random bf16
# weights (benches/build_random_wan.py), 832x480, 81 frames, 4 steps, CFG 5 with a negative prompt;
# then a warm DiffGenerator run, diffusers' AutoencoderKLWan decode times (Wan2.1 z16 832x480x81 fp32 /
# bf16, Wan2.2 TI2V-5B z48 1280x704x121 bf16) and one transformer forward, ours vs diffusers eager.
#
# Here (builds the wheel and gathers the pure-Python wheels the GPU machine lacks):
#   echo /.whl/ >> .git/info/exclude; maturin build --release --out .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.0 zipp==3.23.0 \
#       ftfy==6.3.1 wcwidth==0.7.0 imageio-ffmpeg==0.8.1
#   # imageio-ffmpeg 0.8.1's wheel (68 MB, its ffmpeg binary 173 MB) is over the 64 MiB a call carries:
#   # repack it without the binary and carry the binary xz-compressed (48 MB) beside it:
#   #   unzip the wheel; xz -9e -T0 imageio_ffmpeg/binaries/ffmpeg-linux-x86_64-v9.0.2 (moved to .whl/);
#   #   drop its line from RECORD; zip the rest back to .whl/imageio_ffmpeg-0.8.1-py3-none-manylinux_2_28_x86_64.whl
# On the device machine (repo root, .whl carried):
#   bash benches/gpu_wan_generate.sh            # writes perf JSONs and a log (and a small MP4) to $OUT
# CPU smoke test of this script (tiny sizes, uses the installed package, no wheels):
#   SMOKE=1 OUT=/tmp/smoke bash benches/gpu_wan_generate.sh
set -euo pipefail

OUT=${OUT:-/tmp/bench_out}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
PROMPT="a red fox running through fresh snow in a forest, golden hour, cinematic"
NEG="blurry"
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FFMPEG_XZ=.whl/ffmpeg-linux-x86_64-v9.0.2.xz

if [[ "$SMOKE" == 1 ]]; then
    DEVICE=cpu H=64 W=64 FRAMES=5 STEPS=2 TINY=--tiny NEED_GIB=0
else
    DEVICE=cuda H=480 W=832 FRAMES=81 STEPS=4 TINY= NEED_GIB=24
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
    # imageio-ffmpeg's own binary, carried xz-compressed; unpacked in the background while the model builds.
    FF=/tmp/site/imageio_ffmpeg/binaries/$(basename "$FFMPEG_XZ" .xz)
    (python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'), 16 << 20)" \
        "$FFMPEG_XZ" "$FF" && chmod +x "$FF") &
    FF_PID=$!
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
import sys, torch, transformers, diffusers, sgl_diffusion, ftfy
print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| diffusers", diffusers.__version__, "| ftfy", ftfy.__version__, "| sgl_diffusion", sgl_diffusion.__version__,
      sgl_diffusion.__file__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("cuda", torch.version.cuda, "|", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
EOF
which sgl-diffusion

# A folder with room for the ~14.5 GiB full-size pipeline.
MODEL_DIR=
for base in /tmp "$PWD" /dev/shm /root; do
    free=$(df -BG --output=avail "$base" 2>/dev/null | tail -1 | tr -dc 0-9) || continue
    echo "free on $base: ${free:-?} GiB"
    if [[ -n "$free" && "$free" -ge "$NEED_GIB" ]]; then MODEL_DIR="$base/wan21-1.3b-random"; break; fi
done
[[ -n "$MODEL_DIR" ]] || { echo "no folder with $NEED_GIB GiB free"; exit 1; }
TI2V_VAE="$MODEL_DIR-ti2v5b-vae"
rm -rf "$MODEL_DIR" "$TI2V_VAE" /tmp/wan_out

echo "== full-size Wan2.1-T2V-1.3B + Wan2.2 TI2V-5B VAE, random bf16 weights -> $MODEL_DIR, $TI2V_VAE"
timed "build_random_wan" python3 "$BENCH_DIR/build_random_wan.py" "$MODEL_DIR" --ti2v-vae "$TI2V_VAE" \
    --device "$DEVICE" $TINY
du -sh "$MODEL_DIR" "$TI2V_VAE"
if [[ "$SMOKE" != 1 ]]; then
    wait "$FF_PID"
    python3 -c "import imageio_ffmpeg, subprocess; e = imageio_ffmpeg.get_ffmpeg_exe(); print(e); \
print(subprocess.run([e, '-version'], capture_output=True, text=True).stdout.splitlines()[0])"
fi

echo "== a. generate (CLI, one cold run), ${W}x${H}, $FRAMES frames, $STEPS steps, CFG 5 + negative prompt, bf16, seed 0"
timed "cli generate" sgl-diffusion generate --model-path "$MODEL_DIR" --device "$DEVICE" \
    --dit-precision bf16 --vae-precision bf16 --prompt "$PROMPT" --height "$H" --width "$W" \
    --num-frames "$FRAMES" --num-inference-steps "$STEPS" --guidance-scale 5.0 --negative-prompt "$NEG" \
    --seed 0 --output-path /tmp/wan_out --output-file-name wan_480p.mp4 --perf-dump-path "$OUT/wan_cli.json"
ls -la /tmp/wan_out
mp4_bytes=$(stat -c %s /tmp/wan_out/wan_480p.mp4)
if [[ "$mp4_bytes" -lt $((5 * 1024 * 1024)) ]]; then cp /tmp/wan_out/wan_480p.mp4 "$OUT/"; else
    echo "MP4 is $mp4_bytes bytes (>= 5 MiB): not copied"; fi

echo "== b. DiffGenerator: load once, warm-up + 1 run"
timed "warm generate" python3 "$BENCH_DIR/wan_warm_generate.py" "$MODEL_DIR" --out "$OUT/wan_warm.json" --runs 2 \
    --height "$H" --width "$W" --num-frames "$FRAMES" --steps "$STEPS" --guidance-scale 5.0 \
    --negative-prompt "$NEG" --seed 0 --device "$DEVICE" --precision bf16 --prompt "$PROMPT"

echo "== c. VAE decode (diffusers AutoencoderKLWan.decode): Wan2.1 z16 fp32/bf16, Wan2.2 TI2V-5B z48 bf16"
timed "vae decode" python3 "$BENCH_DIR/wan_vae_decode.py" --z16 "$MODEL_DIR/vae" --z48 "$TI2V_VAE" \
    --out "$OUT/wan_vae_decode.json" --runs 3 --device "$DEVICE" $TINY ||
    echo "VAE decode timing failed (diffusers' VAE, not our package)"

echo "== d. one transformer forward, ours vs diffusers eager, same weights, same card"
timed "forward compare" python3 "$BENCH_DIR/wan_forward_compare.py" "$MODEL_DIR" --out "$OUT/wan_forward.json" \
    --height "$H" --width "$W" --num-frames "$FRAMES" --device "$DEVICE" $TINY ||
    echo "forward comparison failed"

echo "== summary"
python3 "$BENCH_DIR/summarize_perf.py" "cli=$OUT/wan_cli.json" "warm=$OUT/wan_warm.json"
ls -la "$OUT"
date -u
