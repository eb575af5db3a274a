#!/usr/bin/env bash
# One command for a machine with NVIDIA GPUs: the GPU tests, a 1-rank NCCL training run, and with >= 2 GPUs
# the distributed engine against the CPU float64 reference and the communication benchmark, on NCCL.
#
#   bash launch/gpu_check.sh            # from anywhere; PYTHON=/path/to/python to pick the interpreter
#
# Steps (each with a time limit, and all of them within BUDGET seconds, default 420):
#   a. install the package with its test extras unless it is importable (torch is expected to be present)
#   b. python -m pytest -q tests/test_gpu.py (every topology on one GPU, blocking and overlapped, vs the CPU reference)
#   c. torchrun --standalone --nproc_per_node=1 launch/train.py --set steps=50
#   c2. the same with overlap on (algorithm.overlap, algorithm.overlap_slow: NCCL's asynchronous work handles)
#   d. G >= 2 GPUs: torchrun --nproc_per_node=G bench/nccl_equivalence.py (ring, one-peer exponential, push-sum;
#      blocking and overlapped)
#   e. G >= 2 GPUs: torchrun --nproc_per_node=G bench/comm.py --backend nccl (timings are reported, not judged)
# Ends with a PASS/FAIL line per step and an overall verdict; the exit status is 0 only when every step passed.
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lookahead_dist-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
BUDGET=${BUDGET:-420}
SUMMARY=()
FAILED=0

step() {  # step NAME LIMIT_SECONDS COMMAND...   (the limit is cut to what is left of BUDGET)
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    if [ $((BUDGET - SECONDS)) -lt "$limit" ]; then
        limit=$((BUDGET - SECONDS))
    fi
    if [ "$limit" -lt 5 ]; then
        SUMMARY+=("FAIL  $name (not started: the $BUDGET s budget is spent)")
        FAILED=1
        return
    fi
    echo
    echo "=== $name: $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("PASS  $name ($((SECONDS - start)) s)")
    else
        [ "$rc" -eq 124 ] && rc="$rc, over the ${limit} s limit"
        SUMMARY+=("FAIL  $name (exit $rc, $((SECONDS - start)) s)")
        FAILED=1
    fi
}

skip() {
    SUMMARY+=("SKIP  $1: $2")
}

# a. install if needed (checked from outside the checkout, so that the source tree does not count as installed)
if (cd / && "$PY" -c "import lookahead_dist, pytest, torch") >/dev/null 2>&1; then
    skip "install" "lookahead_dist, pytest and torch already importable"
else
    step "install" 120 "$PY" -m pip install -q -e '.[test]'
fi

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
GPUS=${GPUS:-0}
echo "CUDA GPUs visible: $GPUS"
if [ "$GPUS" -lt 1 ]; then
    SUMMARY+=("FAIL  cuda: no CUDA GPU visible to $PY (torch.cuda.is_available() is false)")
    FAILED=1
else
    # b. the GPU tests (they skip without CUDA; here they must run)
    step "tests/test_gpu.py" 90 "$PY" -m pytest -q -rs tests/test_gpu.py
    # c. the trainer on one GPU (NCCL is chosen automatically when CUDA is present)
    step "train.py on 1 rank (NCCL)" 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
        launch/train.py --set steps=50 --out "$WORK/train"
    # c2. the trainer with the gossip and the slow step overlapped (asynchronous NCCL work handles)
    step "train.py on 1 rank (NCCL, overlap)" 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
        launch/train.py --set steps=50 --set algorithm.overlap=true --set algorithm.overlap_slow=true \
        --set algorithm.tau=10 --out "$WORK/train_overlap"
    if [ "$GPUS" -ge 2 ]; then
        # d. the engine on G GPUs vs the CPU float64 reference
        step "NCCL equivalence on $GPUS GPUs" 90 "$PY" -m torch.distributed.run --standalone \
            --nproc_per_node="$GPUS" bench/nccl_equivalence.py --backend nccl
        # e. one mixing step against its floor, and the bytes per rank (asserted equal to the minimum)
        step "bench/comm.py on $GPUS GPUs (NCCL)" 90 "$PY" -m torch.distributed.run --standalone \
            --nproc_per_node="$GPUS" bench/comm.py --backend nccl --reps 21
    else
        skip "NCCL equivalence" "needs >= 2 GPUs, found $GPUS"
        skip "bench/comm.py (NCCL)" "needs >= 2 GPUs, found $GPUS"
    fi
fi

echo
echo "=== summary ($SECONDS s)"
for line in "${SUMMARY[@]}"; do
    echo "$line"
done
if [ "$FAILED" -eq 0 ]; then
    echo "GPU CHECK: PASS"
else
    echo "GPU CHECK: FAIL"
fi
exit "$FAILED"
