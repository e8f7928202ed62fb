#!/usr/bin/env bash
# The README's GPU figures in one go, on a machine with one CUDA GPU:
#
#     bash benchmarks/gpu.sh OUT_DIR          # every step below
#     bash benchmarks/gpu.sh OUT_DIR check    # only the kernel checks (a minute or two)
#
# Needs torch, triton, pyyaml and pytest (transformers for the pretrained-model step, skipped
# without it): the benchmarks import experts/ and lifelong's config, model and training modules,
# none of which imports Avalanche (tests/test_training.py checks that), and run from a plain
# checkout (no install). Writes OUT_DIR/gpu.log (everything printed) and one JSON per benchmark. The
# kernel checks come first: the compiled kernels against the reference, fp32 and bf16, at the
# README's sizes; a fast kernel that is wrong is worth nothing, so a failed check stops the script
# (only the compiled checks: the interpreter of an older triton, e.g. 3.6 with numpy 2.4, fails on
# the kernels' loop bounds, while its compiler builds them; CI runs the interpreted ones with the
# pinned triton). Record the tables in the README's Performance section with the machine.
set -u -o pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [check]}
only=${2:-all}
cd "$(dirname "$0")/.."
mkdir -p "$out"
log="$out/gpu.log"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

step() {  # run a command, copy its output into the log, return its status
    echo "## $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "## exit $rc" | tee -a "$log"
    return "$rc"
}

step nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory --format=csv
step "$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
step "$python" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "cuda or sm90" || exit 1
[ "$only" = check ] && exit 0

# one PEER layer: ours vs the plain reference vs a dense 4x FFN, the README's sizes and the sweep
step "$python" benchmarks/peer_layer.py --device cuda --json "$out/peer_layer.json"
# dense AdamW (single / foreach / fused) vs RowAdamW at a million experts, dim 512
step "$python" benchmarks/optimizer_step.py --device cuda --sizes 1048576 --dim 512 --json "$out/optimizer_step.json"
# tokens/s of the iso presets (the 0.8x target), then a model with a 1024^2-expert layer
step "$python" benchmarks/train_step.py --device cuda --steps 20 --json "$out/train_step.json"
# (one optimizer per process, so that the peak memory is one model's)
million=(--set model.dim=512 --set model.n_heads=8 --set model.peer.num_experts=1048576 --set model.peer.key_dim=256)
for optimizer in adamw rowwise; do
    step "$python" benchmarks/train_step.py --device cuda --presets iso-peer --optimizers "$optimizer" --steps 10 \
        "${million[@]}" --json "$out/train_step_1m_$optimizer.json"
done
# a pretrained model's shape with PEER retrofitted: the plan of benchmarks/pretrained.py --plan, measured
# (random Qwen2.5-0.5B-shaped weights built there, nothing downloaded; needs transformers)
if "$python" -c "import transformers" 2>/dev/null; then
    step "$python" benchmarks/pretrained.py --plan --json "$out/pretrained_plan.json"
    step "$python" benchmarks/pretrained.py --device cuda --shape qwen2.5-0.5b --batch 8 --block-len 1024 --frozen \
        --steps 10 --set model.peer.num_experts=262144 --set model.peer.heads=8 --json "$out/pretrained.json"
else
    echo "## skipped benchmarks/pretrained.py: transformers is not installed" | tee -a "$log"
fi
echo "## done: $out" | tee -a "$log"
