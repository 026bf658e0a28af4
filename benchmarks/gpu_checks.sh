#!/usr/bin/env bash
# Every check that needs a GPU, in one go (about 7 minutes on an H200 before the last step gained the CUDA
# graphs variant, which may add up to its 240-s limit), for a session lent one for minutes,
# the most wanted first, so that a run cut short still brings those back:
#   0. tests/test_cuda.py: the CUDA-only choices against the CPU's results, and training in bf16 and fp16
#   1. benchmarks/gpu.py: base in bf16 against the measured bf16 peak, and the peers at the same size
#   2. `transformer train` on the bundled Multi30k in bf16 for 90 seconds, then test2016 with beam 4
#   3. fp16 with loss scaling, 200 steps
#   4. torchrun with NCCL (one process: NCCL refuses two ranks on one GPU), resumed once
#   5. benchmarks/decode.py on the GPU: cached, uncached and MarianMTModel.generate, fp32 and bf16, and
#      ours without cuDNN's attention (as training decodes; translate and serve still use it)
#   6. benchmarks/gpu.py under torch.compile, without and with CUDA graphs (minutes of compiling): what
#      the step would reach without the host's kernel launches
# Each step has its own time limit, so one that fails or hangs leaves the others their time. Everything
# goes to $OUT (the device tool's folder; runs/gpu-checks elsewhere) as it comes: log.txt, RESULTS.md and
# each run's metrics. Run from the repository's root; the package needs no install (PYTHONPATH).
#
#     bash benchmarks/gpu_checks.sh
set -u
out=${OUT:-runs/gpu-checks}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
exec > >(tee -a "$out/log.txt") 2>&1

step() {  # step NAME SECONDS COMMAND...: run it under a time limit and say how it ended
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@"
    echo "=== $name: exit $?, $((SECONDS - start)) s"
}

step info 30 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=driver_version,memory.total,clocks.max.sm --format=csv;
    $py -c 'import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__,
    torch.cuda.get_device_name())'; nproc"
step tests 120 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step gpu.py 150 "$py" benchmarks/gpu.py --peers --profile --variants ours "ours, eager loss" \
    "ours, fp32 LayerNorm output" "ours, cuDNN attention" "ours, no flash attention" "ours, 4 steps per wait" \
    "ours, as at 6c532e0"
cp benchmarks/RESULTS.md "$out/"
step train-bf16 150 "$py" -m transformer.cli train --out runs/gpu-bf16 precision=bf16 time_budget_minutes=1.5 \
    eval_every=1000
step train-fp16 90 "$py" -m transformer.cli train --out runs/gpu-fp16 precision=fp16 time_budget_minutes=0 \
    max_steps=200 eval_every=100 average_last=0 test_split=
step torchrun 75 "$py" -m torch.distributed.run --standalone --nproc_per_node=1 -m transformer.cli train \
    --out runs/gpu-ddp time_budget_minutes=0 max_steps=60 eval_every=30 average_last=0 test_split=
step torchrun-resume 45 "$py" -m torch.distributed.run --standalone --nproc_per_node=1 -m transformer.cli train \
    --out runs/gpu-ddp --resume time_budget_minutes=0 max_steps=90 eval_every=30 average_last=0 test_split=
for run in gpu-bf16 gpu-fp16 gpu-ddp; do
    cp "runs/$run/metrics.jsonl" "$out/$run.metrics.jsonl" 2>/dev/null
done
step decode.py 75 "$py" benchmarks/decode.py --device cuda --configs small base --repeats 5
cp benchmarks/RESULTS.md "$out/"
step gpu.py-compile 240 "$py" benchmarks/gpu.py --compile --json  # compiling takes its time: last
echo "=== done ($(date -u +%H:%M:%S))"
