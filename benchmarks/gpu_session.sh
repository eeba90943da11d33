#!/usr/bin/env bash
# Everything a session with the GPU machine should run, as one command (about 8 minutes on an H200):
#
#   bash benchmarks/gpu_session.sh            # writes into $OUT (the device tool's folder), else ./gpu-out
#
# 1. env.txt      the card, the driver, torch / transformers / peft versions
# 2. tests.txt    the CUDA checks: tests/test_accelerator.py on cuda (fused LoRA linear and its dropout
#                 mask, MergedLinear blocks, Phi-3 + LoRA logits/loss/gradients, generation, a 4-bit
#                 base, the bf16 trainer with resume), the 4-bit model moved to CUDA, fp16 with a
#                 loss scaler; then the rest of the default suite's fast files as a sanity check
# 3. dist.txt     tests/dist_smoke.py --device cuda --nproc 1 (the nccl code paths, DDP and FSDP)
# 4. step.txt / step.json   benchmarks/bench_cuda.py: full-size Phi-3-mini, bf16, batch 4 x 1024,
#                 ours beside transformers + PEFT (issue 10's GPU comparison)
# 5. summary.txt  each part's exit status and seconds
#
# Each part has its own time limit, so one that hangs cannot eat the others' time. The machine's
# python3 holds torch, transformers, peft, pytest, hypothesis, tokenizers, jinja2 and safetensors;
# the package itself is pure Python and runs from the working tree (PYTHONPATH).
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
summary="$OUT/summary.txt"
: >"$summary"

part() { # part NAME LIMIT_S LOGFILE CMD...
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS
    timeout "$limit" "$@" >"$log" 2>&1
    local rc=$?
    echo "$name rc=$rc ${limit}s-limit took=$((SECONDS - t0))s" | tee -a "$summary"
}

{
    nvidia-smi || true
    $PY -c "import torch, transformers, peft, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA'); print('transformers', transformers.__version__, 'peft', peft.__version__)"
} >"$OUT/env.txt" 2>&1

part cuda-tests 240 "$OUT/tests.txt" $PY -m pytest -q -p no:cacheprovider \
    tests/test_accelerator.py \
    "tests/test_qlora.py::test_a_4bit_model_moved_to_cuda_computes_what_it_did_on_cpu" \
    "tests/test_finetune_recipes.py::test_fp16_trains_on_cuda_with_a_loss_scaler_and_resumes_it" \
    tests/test_fused_linear.py tests/test_phi3.py tests/test_layers.py
part dist-smoke 120 "$OUT/dist.txt" $PY tests/dist_smoke.py --device cuda --nproc 1
part bench-cuda 300 "$OUT/step.txt" $PY benchmarks/bench_cuda.py --json "$OUT/step.json"
cat "$summary"
