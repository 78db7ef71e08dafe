#!/usr/bin/env bash
# The CUDA-only tests and benches/perf.py's workloads on the lent GPU machine, from carried wheels.
#
# Here (repo root), once per session: build our wheel and gather the wheels the GPU machine lacks, at the
# versions of the lock (requirements/test.txt; torch, transformers, accelerate, numpy, safetensors,
# huggingface-hub, packaging and triton are the machine's own):
#   echo /.whl/ >> .git/info/exclude; rm -rf .whl; maturin build --release --out .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl diffusers==0.42.1 importlib-metadata==10.2.0 \
#       lazy-importer==0.1.0 zipp==4.1.2 ftfy==6.3.1 wcwidth==0.9.4 pytest==9.2.0 pluggy==1.7.0 \
#       iniconfig==2.3.1 pytest-timeout==2.4.0 pygments==2.21.0
#   # imageio-ffmpeg (imported by the engine's video module): its platform wheel (68 MB, with an ffmpeg
#   # binary) is over what a call carries; the wheel built from its sdist has no binary, which is all that
#   # importing needs (nothing here encodes MP4):
#   python3 -m pip wheel --no-deps --no-binary imageio-ffmpeg -w .whl imageio-ffmpeg==0.8.1
#   # only for perf.py --lossy-attention sage_attn (not in the lock): ... -d .whl sageattention==1.0.6
#   # only for attention-kernels (not in the lock): FastVideo's sparse kernels (cp312, prebuilt CUDA extensions,
#   # 7 MB) and FlashAttention-4 with its pure-Python / small dependencies (8 MB):
#   #   ... -d .whl st-attn==0.0.7 vsa==0.0.4
#   #   ... --pre -d .whl flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
#   #       quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 einops==0.9.0.dev0
#   # FlashAttention-3 (`fa`): fa3-fwd's prebuilt forward-only kernels (cp39-abi3, CUDA 13, torch's stable ABI,
#   # bf16; 28 MB) in a folder of its own, carried with .whl: [".whl", ".whl_fa3"] (59 MB with the tree):
#   #   echo /.whl_fa3/ >> .git/info/exclude; ... -d .whl_fa3 --platform manylinux_2_24_x86_64 fa3-fwd==0.0.3
#   # FA4's CUDA 13 library wheel (nvidia-cutlass-dsl-libs-cu13==4.8.1, 92 MB) is over one call's carry: download
#   # it to /tmp, `split -b 32M <wheel> /tmp/<wheel>.part-`, put part aa in .whl_fa4a/ and parts ab, ac in .whl_fa4b/,
#   # with the DSL's Python and its requirements in .whl_fa4a/ too (14 MB: ... -d .whl_fa4a
#   # nvidia-cutlass-dsl-libs-core==4.8.1 cuda-bindings==13.0.3 cuda-pathfinder==1.9.1 protobuf==7.36.2), then carry
#   # [".whl_fa4a"] and [".whl_fa4b"] in two later calls on the same warm machine (.gitignore names these folders:
#   # ignored paths stay there between calls, untracked ones do not; the next call must come within its idle
#   # release, 30 s); the attention-kernels job joins and unpacks them.
# .whl is about 28 MB: with the tree, under the 64 MiB a call carries, and with .whl_fa3 too.
#
# There (device tool: carry [".whl"] or [".whl", ".whl_fa3"], timeout_s 600), the jobs below in the order given; each fits one
# 10-minute command alone, and one command may run several if their times add up to less:
#   BENCH_COMMIT=<sha> bash benches/gpu_perf.sh JOB [JOB ...]
# Results land in $OUT: gpu_perf.log (everything), cuda_tests.log, and <name>.json / .md per perf.py job:
# at most 8 files come back from one command, so at most 3 perf.py jobs per command.
#
# Run on the H200 on 2026-12-05 (benches/results/perf_h200.md): cuda-tests, flux-forward, wan-forward, flux-e2e,
# wan-e2e, wan-vae, each fitting one command as estimated (cuda-tests 2.5 min, wan-e2e 6 min, wan-vae 3 min).
# Run on the H100 on 2026-12-05 (benches/results/*_h100*.md, gpu_perf_h100_2026-12-05*.log): cuda-tests (4 min),
# attention-kernels (1 min), wan-forward (with fa), hunyuan-forward-33f (4 min), wan-e2e (6 min, with fa and without),
# lora-batch, lora-merge; an H100 session of 30 device minutes holds about five such commands.
# Not yet run at all (CPU smoke only): qwen-forward, qwen-e2e, qwen-e2e-1024, zimage-e2e, flux2-forward,
# hunyuan-forward (129 frames), wan-e2e-50, wan-vsa, hunyuan-sta, one per command; FA4 (attention-kernels with
# .whl_fa4a/b).
# Not yet run with the alternating scheme (each ~6-9 min alone: diffusers' whole transformer compiles once per
# shape for its CUDA graphs, ~2 min each), one per command: flux-graphs-small, flux-graphs-large, wan-graphs.
#
# Jobs:
#   cuda-tests          every test file of tests/python that has CUDA-only tests (found by grep: skipif on
#                       torch.cuda.is_available, needs_cuda, CUDA-parametrized devices), run on the GPU;
#                       log in $OUT/cuda_tests.log, skipped tests listed with their reason at its end
#   flux-forward        ours vs diffusers, eager and compiled, + CUDA graphs on both sides (4096 tokens: ours'
#                       `auto` captures), 5 alternating repetitions x 3 calls after 3 warm-up calls each
#   wan-forward         the same at 32 760 tokens (no graphs: ours' `auto` does not capture that shape), and ours
#                       compiled on each exact attention kernel installed (fa, fa4, auto's measured pick) beside cuDNN
#   wan-vsa             Wan2.1-1.3B forward 832x480x81 with video sparse attention (lossy) at VSA_sparsity 0.8 and 0.9,
#                       eager against ours eager on dense attention and compiled beside ours compiled on cuDNN and fa,
#                       the output difference beside each. Estimate ~5 min.
#   hunyuan-sta         HunyuanVideo forward at 1280x720x33 frames with sliding tile attention (lossy; windows (3,3,3)
#                       and (1,3,5) tiles for every layer and head), eager and compiled, against dense attention
#                       (cuDNN, fa), the output difference beside each. Estimate ~6 min.
#   flux-e2e            FLUX.1-dev 1024² 28 steps: ours (graphs auto) vs diffusers eager and compiled
#                       (reduce-overhead when ours captured), 5 alternating repetitions after 1 warm-up each
#   wan-e2e             Wan2.1-1.3B 480p 81 frames CFG, 20 steps (50 do not fit 5 alternating repetitions of
#                       both sides in 10 minutes), ours vs diffusers + torch.compile; ours with
#                       --attention-backend fa when FlashAttention-3 (.whl_fa3) came along, else the default (cuDNN)
#   wan-e2e-50          the same request at the target's 50 steps, ours alone (3 repetitions, ~5 min): the number
#                       the <= 46 s target names, which wan-e2e's 20 steps only project
#   flux-graphs-small   CUDA-graph sweep, FLUX 256² and 512², batch 1 and 2
#   flux-graphs-large   CUDA-graph sweep, FLUX 768² and 1024², batch 1 and 2
#   wan-graphs          CUDA-graph sweep, Wan 480p with 1, 5 and 9 frames, batch 1 and 2
#   wan-vae             Wan2.1 VAE decode (wan_vae_decode.py's own timing)
#   attention-kernels   benches/attention_kernels.py: cuDNN / FlashAttention-2 through SDPA, FlashAttention-4
#                       (fa4), sliding tile attention (our Triton kernel; FastVideo's st_attn at its 18x48x80 grid)
#                       and video sparse attention (our Triton kernel; FastVideo's vsa) at Wan2.1-1.3B 480p
#                       (21x30x52 tokens), Wan 18x48x80 and FLUX.1 1024² (dense rows only), each sparse row also
#                       checked against its torch reference. Not yet run (added 2026-12-05, CPU smoke only);
#                       estimate ~4 min on an H100 (Triton compiles, FA4's JIT, the references' checks).
#   qwen-forward        Qwen-Image transformer forward at 1328² (6889 image + 128 text tokens): ours eager (torch ops,
#                       fused kernels, packed QKV) and compiled vs diffusers eager and + torch.compile, one set of
#                       weights shared by both models (two 38 GiB copies do not fit an H100); no CUDA-graph rows
#                       (ours cannot capture Qwen's img_shapes list argument). Estimate ~4 min on an H100.
#   flux2-forward       FLUX.2-dev transformer forward at 1024² (4096 image + 512 text tokens): ours eager (torch ops,
#                       fused kernels, packed QKV) and compiled vs diffusers eager and + torch.compile, + CUDA graphs on
#                       both sides (4096 tokens: ours' `auto` captures), one set of weights shared by both models (32.22 B
#                       parameters, 60.0 GiB in bf16: two copies do not fit an H100). Estimate ~6 min on an H100 (random
#                       init of 60 GiB, ~0.4 s per eager forward, compiles of both sides and diffusers' whole-model
#                       reduce-overhead graph); if the graph pools do not fit beside the weights, run it again with
#                       PERF_ARGS_flux2_forward="--cuda-graphs off".
#   hunyuan-forward     HunyuanVideo transformer forward at its defaults, 1280x720x129 frames (118 800 video tokens; diffusers
#                       gets the prompt as 256 rows with its mask, ours its 120 real tokens, as the engine passes them):
#                       ours eager (fused kernels) and compiled vs diffusers eager and + torch.compile, one set of
#                       weights shared by both models (12.82 B parameters, 23.9 GiB); 1 warm-up call and 2 alternating
#                       repetitions of 1 call (a forward's floor is ~19 s: 1.6 PFLOP linear + 10.4 PFLOP attention);
#                       no CUDA-graph rows (ours does not capture that shape). Unmeasured estimate ~8-9 min on an H100;
#                       if it overruns, PERF_ARGS_hunyuan_forward="--no-compile" keeps the eager rows.
#   hunyuan-forward-33f the same at 1280x720x33 frames (9 latent frames, 32 400 video tokens; floor ~1.8 s), every eager
#                       variant of ours (torch ops, fused kernels, packed QKV, and on diffusers' padded inputs) and the
#                       compiled pair, 5 alternating repetitions of 1 call after 3 warm-up calls. Unmeasured estimate
#                       ~5-6 min on an H100.
#   qwen-e2e            Qwen-Image at the engine's defaults for Qwen/Qwen-Image (1328², true CFG 4, negative " ")
#                       but 20 steps (50 do not fit 5 alternating repetitions with compile in 10 minutes; the .md
#                       projects ours to 50 steps), ours vs diffusers + torch.compile. First builds the random folder
#                       (53.7 GiB: transformer 38.1, text encoder 15.4; ~1.5 min), deleting the FLUX/Wan folders first
#                       for disk room. Estimate ~6.5 min on an H100 (~5 min when the folder is already there).
#   qwen-e2e-1024       the same at 1024², the size of SGLang's published H100 baseline (12.8 s for 50 steps with
#                       CFG; shown as a row), ours vs diffusers eager and + torch.compile, 20 steps. Estimate ~6 min
#                       on an H100 with the folder built (run it after qwen-e2e, on the same warm machine), ~7.5 without.
#   zimage-e2e          Z-Image-Turbo at the engine's defaults for Tongyi-MAI/Z-Image-Turbo (1024², 9 steps, no CFG:
#                       the request of SGLang's published H100 number, 0.91 s, shown as a row with its CI baseline's
#                       1.069 s), full-size config with random weights: ours (torch.compile, CUDA graphs auto: 4096
#                       image tokens are captured) vs diffusers eager and + torch.compile (reduce-overhead, as ours
#                       captures). First builds the random folder (19 GiB: transformer 11.5, text encoder 7.5),
#                       deleting the other families' folders first. Estimate ~6 min on an H100 (compilation of both
#                       sides dominates).
#   lora-merge          benches/lora_merge.py: FLUX.1-dev's transformer (random bf16 weights): read, check and merge a
#                       rank-64 LoRA over every attention and feed-forward Linear, a forward with it merged against the
#                       plain one, unmerge, and whether the base came back bit for bit. Estimate ~1.5 min.
#   lora-batch          benches/lora_batch.py: 4 requests with 4 different rank-64 LoRAs at 1024² on FLUX.1-dev's
#                       transformer: one mixed batch (per-request path) vs one at a time with merge/unmerge; the
#                       per-step overhead over no adapters (issue 15: <= 10 %). Estimate ~2 min.
# Extra perf.py flags per job go in PERF_ARGS_<JOB> with - replaced by _, e.g.
#   PERF_ARGS_flux_forward="--cfg-shapes 16 32" PERF_ARGS_wan_e2e="--steps 10"
#
# CPU smoke test of the perf jobs (no wheels, the checkout's virtualenv, tiny models):
#   SMOKE=1 OUT=/tmp/smoke bash benches/gpu_perf.sh flux-forward flux-e2e
set -euo pipefail

OUT=${OUT:-/tmp/bench_out}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_perf.log") 2>&1

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export BENCH_COMMIT=${BENCH_COMMIT:-unknown}
if [[ "$SMOKE" == 1 ]]; then
    PYTHON=${PYTHON:-.venv/bin/python}
    WORK=/tmp/sgl-bench-smoke
    SMOKE_ARGS=(--tiny --device cpu --work-dir "$WORK")
else
    PYTHON=python3
    WORK=/tmp/sgl-bench  # perf.py's default --work-dir
    SMOKE_ARGS=()
    # FlashAttention-3's prebuilt forward (.whl_fa3/, when carried) comes with them.
    wheels=(.whl/*.whl)
    [[ -d .whl_fa3 ]] && wheels+=(.whl_fa3/*.whl)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
    # The fused kernels are a separate pure-Python package; the checkout's copy is the one under test.
    export PYTHONPATH=/tmp/site:$PWD/kernels
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

date -u
# transformers too: the Qwen-Image jobs need 5.x's Qwen2.5-VL (rope_parameters; the lock has 5.25.0).
"$PYTHON" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__)"

# perf.py with the job's flags, the job's PERF_ARGS_ and the smoke flags; a failure is logged, the next
# job still runs.
perf() {
    local job=$1
    shift
    local extra_var="PERF_ARGS_${job//-/_}"
    # shellcheck disable=SC2086  # word splitting of the extra flags is intended
    "$PYTHON" benches/perf.py --out-dir "$OUT" "$@" ${!extra_var:-} "${SMOKE_ARGS[@]}" || echo "$job FAILED"
}

# Before an e2e job: the random folders of the other families go (the Qwen-Image folder alone is 53.7 GiB of a
# 64 GiB disk); the job's own stays, so a later job of the same family skips the build.
make_room() {
    local keep=$1 folder
    for folder in "$WORK"/*; do
        [[ -d "$folder" && "$(basename "$folder")" != "$keep"* ]] && rm -rf "$folder"
    done
    df -h "$(dirname "$WORK")" | tail -1
}

for job in "$@"; do
    echo "== $job ($(date -u +%H:%M:%S))"
    case "$job" in
        cuda-tests)
            # pythonpath= : test the installed wheel (the checkout has no built extension there), kernels
            # from PYTHONPATH. Whole files: their CPU cases run as well, cheaply.
            mapfile -t files < <(grep -l -E 'cuda\.is_available|needs_cuda' tests/python/test_*.py)
            echo "files: ${files[*]}"
            "$PYTHON" -m pytest -v -rs -p no:cacheprovider -o pythonpath= "${files[@]}" 2>&1 \
                | tee "$OUT/cuda_tests.log" || echo "cuda-tests FAILED"
            ;;
        wan-forward)
            # The exact attention kernels beside cuDNN (those installed; a note names each missing one).
            perf "$job" --workload "$job" --ours-attention fa fa4 auto
            ;;
        wan-vsa)
            # Video sparse attention (FastWan's recipe, lossy) against dense attention, eager and compiled.
            perf "$job" --workload wan-forward --name "$job" --eager-variants fused --vsa-sparsity 0.8 0.9 \
                --ours-attention fa
            ;;
        flux-forward | qwen-forward | flux2-forward)
            perf "$job" --workload "$job"
            ;;
        hunyuan-forward)
            perf "$job" --workload "$job" --eager-variants fused --reps 2 --runs 1 --warmup 1 --cuda-graphs off
            ;;
        hunyuan-forward-33f)
            perf "$job" --workload hunyuan-forward --name "$job" --latent-frames 9 --runs 1 --ours-attention fa
            ;;
        hunyuan-sta)
            perf "$job" --workload hunyuan-forward --name "$job" --latent-frames 9 --runs 1 --eager-variants fused \
                --ours-attention fa --sta-window 3 3 3 --sta-window 1 3 5
            ;;
        flux-e2e)
            make_room flux
            perf "$job" --workload "$job"
            ;;
        wan-e2e | wan-e2e-50)
            make_room wan
            fa=()
            [[ -d .whl_fa3 && "$SMOKE" != 1 ]] && fa=(--attention-backend fa)
            if [[ "$job" == wan-e2e ]]; then
                perf "$job" --workload wan-e2e --steps 20 --diffusers compiled "${fa[@]}"
            else
                perf "$job" --workload wan-e2e --name "$job" --steps 50 --diffusers none --reps 3 "${fa[@]}"
            fi
            ;;
        qwen-e2e)
            make_room qwen_image
            perf "$job" --workload qwen-e2e --steps 20 --diffusers compiled
            ;;
        qwen-e2e-1024)
            make_room qwen_image
            perf "$job" --workload qwen-e2e --name "$job" --size 1024 --steps 20
            ;;
        zimage-e2e)
            make_room z_image
            perf "$job" --workload zimage-e2e
            ;;
        flux-graphs-small)
            perf "$job" --workload flux-graphs --name "$job" --graph-shapes 16 32
            ;;
        flux-graphs-large)
            perf "$job" --workload flux-graphs --name "$job" --graph-shapes 48 64
            ;;
        wan-graphs | wan-vae)
            perf "$job" --workload "$job"
            ;;
        lora-merge)
            "$PYTHON" benches/lora_merge.py --out-dir "$OUT" --commit "$BENCH_COMMIT" "${SMOKE_ARGS[@]:0:3}" \
                || echo "$job FAILED"
            ;;
        lora-batch)
            "$PYTHON" benches/lora_batch.py --out-dir "$OUT" --commit "$BENCH_COMMIT" "${SMOKE_ARGS[@]:0:3}" \
                || echo "$job FAILED"
            ;;
        attention-kernels)
            # The parts may come in several folders (.whl_fa4a, .whl_fa4b, ...), one per call; the name sorts them.
            parts=(.whl_fa4*/*.part-*)
            if [[ -e "${parts[0]}" && "$SMOKE" != 1 ]]; then
                wheel=/tmp/$(basename "${parts[0]%.part-*}")
                cat "${parts[@]}" > "$wheel"
                # The CUDA 13 libraries and the DSL's Python (nvidia-cutlass-dsl-libs-core: split out of libs-base
                # in 4.6) land in nvidia_cutlass_dsl/, which libs-base already made: `pip --target` skips a folder
                # that exists (or, with --upgrade, replaces it, losing libs-base). A wheel is a zip: unpack them
                # over it. cuda-bindings, cuda-pathfinder and protobuf (libs-core's requirements) come along only
                # where the machine has none.
                for w in "$wheel" .whl_fa4*/*.whl; do
                    case $(basename "$w") in
                        cuda_bindings-*) python3 -c "import cuda.bindings" 2>/dev/null && continue ;;
                        cuda_pathfinder-*) python3 -c "import cuda.pathfinder" 2>/dev/null && continue ;;
                        protobuf-*) python3 -c "import google.protobuf" 2>/dev/null && continue ;;
                    esac
                    python3 -m zipfile -e "$w" /tmp/site || echo "$(basename "$w") did not unpack"
                done
                # What nvidia-cutlass-dsl's .pth does in a site folder (PYTHONPATH entries read no .pth files).
                export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
                python3 -c "import flash_attn.cute" && echo "FA4 imports"
            fi
            if [[ "$SMOKE" == 1 ]]; then
                "$PYTHON" benches/attention_kernels.py --out-dir "$OUT" --tiny --device cpu || echo "$job FAILED"
            else
                # shellcheck disable=SC2086  # word splitting of the extra flags is intended
                "$PYTHON" benches/attention_kernels.py --out-dir "$OUT" --commit "$BENCH_COMMIT" \
                    ${PERF_ARGS_attention_kernels:-} || echo "$job FAILED"
            fi
            ;;
        *)
            echo "unknown job $job"
            ;;
    esac
done
echo "== done $(date -u +%H:%M:%S)"
