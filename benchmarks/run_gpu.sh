#!/usr/bin/env bash
# The GPU benchmark suite, step by step, each step bounded in time (see benchmarks/README.md).
#
#   bash benchmarks/run_gpu.sh                  # list the steps
#   bash benchmarks/run_gpu.sh env moe-mixtral  # run steps in order (each under `timeout`)
#   bash benchmarks/run_gpu.sh all              # every step, in the order below
#   bash benchmarks/run_gpu.sh summary          # merge the MoE files into one table + plot (no GPU needed)
#
# Everything goes under benchmarks/results/ (RESULTS=... moves it; git ignores it): per step a log
# (<step>.log), the MoE benchmark's JSON/CSV/TXT/PNG per step (moe_<arch>_<model>[_compile].*,
# moe_<arch>_tuned[_<model>].*), their merge (moe_<arch>_summary.*: every method and peer of a model
# at every T in one table and plot, with the target verdicts; redone after every MoE step), the
# autotune file (tune.json) and MoBA's tables (moba*.txt). With COPY_RESULTS_TO=<dir> the results
# folder is also copied to <dir>/results after every step (e.g. a folder synced off the machine).
# STEP_TIMEOUT (default 560 s; the merge after an MoE step adds at most 25 s) bounds each step, so
# a step that runs long is cut off and the files of the work that finished stay (moe.py rewrites
# its JSON after every row).
set -u
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results}
STEP_TIMEOUT=${STEP_TIMEOUT:-560}
export PYTHONUNBUFFERED=1
TUNE_FILE="$RESULTS/tune.json"
NO_TUNE="$RESULTS/no-tune-file.json"          # never written: model tiles, not tuned ones
MODELS="mixtral qwen3 deepseek olmoe"
FAST="moec moec+graph eager grouped_mm"
TRAIN_MODELS="mixtral qwen3 deepseek"

steps() {
    echo "install"
    echo "env"
    for m in $MODELS; do echo "moe-$m"; done
    for m in $MODELS; do echo "compile-$m"; done
    for m in $MODELS; do echo "tune-$m"; done
    echo "moe-tuned"
    for m in $TRAIN_MODELS; do echo "train-$m"; done
    echo "summary"
    echo "predict"
    echo "moba"
    echo "moba-large"
    echo "moba-train"
    echo "hf-layer"
}

describe() {
    case "$1" in
        install) echo "pip install --no-deps --no-build-isolation -e . (this checkout; no network needed); run first by itself when moec is not importable from here";;
        env) echo "GPU, driver, torch/triton versions, pip freeze (seconds)";;
        moe-tuned) echo "MoE benchmark again with the tuned tiles (moec, moec+graph), all four models, T = 1..16384 (moe-tuned-<model>: one model)";;
        moe-tuned-*) echo "MoE benchmark of ${1#moe-tuned-} with the tuned tiles (moec, moec+graph), T = 1..16384";;
        moe-*) echo "MoE layer benchmark of ${1#moe-}, the cost model's tiles: moec, moec+graph, eager, grouped_mm, floor; T = 1..16384";;
        summary) echo "merge every moe_*.json into moe_<arch>_summary.* (one table + plot per model, verdicts); no GPU needed";;
        predict) echo "benchmarks/predict.py: the cost model's predicted forward times (sm90, sm100) into predict.{md,json}; no GPU needed";;
        tune-*) echo "autotune ${1#tune-}'s kernels per token-count bucket into $TUNE_FILE";;
        moba) echo "benchmarks/moba.py, N = 8K..64K (moec vs SDPA vs FlexAttention)";;
        moba-large) echo "benchmarks/moba.py, N = 128K..512K";;
        moba-train) echo "benchmarks/moba_train.py: MoBA forward + backward, moec vs SDPA vs FlexAttention, N = 8K..128K";;
        hf-layer) echo "benchmarks/hf_layer.py: a transformers decoder layer at Mixtral / Qwen3-30B-A3B sizes, T = 1 and 4096";;
        train-*) echo "benchmarks/moe_train.py: forward + backward of ${1#train-}: moec, eager, torch.compile, grouped_mm, floor; T = 128..16384";;
        compile-*) echo "torch.compile baseline of ${1#compile-} (one compile, automatic dynamic shapes), T = 1..16384";;
    esac
}

summarize() {
    # Re-merge every MoE result so far into moe_<arch>_summary.* (seconds, bounded; never fails the step).
    if timeout 25 python benchmarks/moe.py --merge "$RESULTS" --out "$RESULTS" > "$RESULTS/summary.log" 2>&1; then
        grep '^VERDICT' "$RESULTS/summary.log" || true
    else
        echo "(summary not updated: see $RESULTS/summary.log)"
    fi
}

run_step() {
    local step=$1 rc start
    start=$(date +%s)
    echo "=== [$(date +%H:%M:%S)] step $step: $(describe "$step")"
    case "$step" in
        install)
            python -m pip install --no-deps --no-build-isolation -e . > "$RESULTS/install.log" 2>&1
            rc=$?
            tail -3 "$RESULTS/install.log"
            python -c "import moec; print('moec', moec.__version__, 'from', moec.__file__)" || rc=1;;
        env)
            { nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; pip freeze; } \
                > "$RESULTS/env.log" 2>&1
            rc=$?; head -20 "$RESULTS/env.log";;
        moe-tuned|moe-tuned-*)
            if [ ! -f "$TUNE_FILE" ]; then
                echo "no $TUNE_FILE: run the tune-* steps first (or carry the file to this machine)"; return 2
            fi
            local which="" tag=tuned
            [ "$step" != moe-tuned ] && which="--models ${step#moe-tuned-}" && tag="tuned_${step#moe-tuned-}"
            MOEC_TUNE_FILE="$TUNE_FILE" timeout "$STEP_TIMEOUT" python benchmarks/moe.py $which --methods moec moec+graph \
                --tag "$tag" --out "$RESULTS" 2>&1 | tee "$RESULTS/$step.log"
            rc=${PIPESTATUS[0]}; summarize;;
        moe-*)
            MOEC_TUNE_FILE="$NO_TUNE" timeout "$STEP_TIMEOUT" python benchmarks/moe.py --models "${step#moe-}" \
                --methods $FAST --tag "${step#moe-}" --out "$RESULTS" 2>&1 | tee "$RESULTS/$step.log"
            rc=${PIPESTATUS[0]}; summarize;;
        summary)
            python benchmarks/moe.py --merge "$RESULTS" --out "$RESULTS" 2>&1 | tee "$RESULTS/summary.log"
            rc=${PIPESTATUS[0]};;
        predict)
            MOEC_TUNE_FILE="$NO_TUNE" timeout "$STEP_TIMEOUT" python benchmarks/predict.py --json "$RESULTS/predict.json" \
                > "$RESULTS/predict.md" 2> "$RESULTS/predict.log"
            rc=$?; tail -3 "$RESULTS/predict.md";;
        tune-*)
            MOEC_TUNE_FILE="$TUNE_FILE" timeout "$STEP_TIMEOUT" python benchmarks/moe.py --tune-only \
                --models "${step#tune-}" 2>&1 | tee "$RESULTS/$step.log"
            rc=${PIPESTATUS[0]};;
        compile-*)
            MOEC_TUNE_FILE="$NO_TUNE" timeout "$STEP_TIMEOUT" python benchmarks/moe.py --models "${step#compile-}" \
                --methods compile --tag "${step#compile-}_compile" --out "$RESULTS" 2>&1 | tee "$RESULTS/$step.log"
            rc=${PIPESTATUS[0]}; summarize;;
        train-*)
            MOEC_TUNE_FILE="$NO_TUNE" timeout "$STEP_TIMEOUT" python benchmarks/moe_train.py --models "${step#train-}" \
                --out "$RESULTS/train_${step#train-}" 2>&1 | tee "$RESULTS/$step.log"
            rc=${PIPESTATUS[0]};;
        hf-layer)
            timeout "$STEP_TIMEOUT" python benchmarks/hf_layer.py --out "$RESULTS/hf_layer.json" 2>&1 \
                | tee "$RESULTS/hf_layer.txt"
            rc=${PIPESTATUS[0]};;
        moba)
            timeout "$STEP_TIMEOUT" python benchmarks/moba.py --sizes 8192 16384 32768 65536 2>&1 | tee "$RESULTS/moba.txt"
            rc=${PIPESTATUS[0]};;
        moba-train)
            timeout "$STEP_TIMEOUT" python benchmarks/moba_train.py 2>&1 | tee "$RESULTS/moba_train.txt"
            rc=${PIPESTATUS[0]};;
        moba-large)
            timeout "$STEP_TIMEOUT" python benchmarks/moba.py --sizes 131072 262144 524288 2>&1 \
                | tee "$RESULTS/moba_large.txt"
            rc=${PIPESTATUS[0]};;
        *)
            echo "unknown step $step; steps:"; steps; return 2;;
    esac
    local note=""
    [ "$rc" = 124 ] && note=" (cut off after ${STEP_TIMEOUT} s: the files of what finished are kept)"
    echo "=== [$(date +%H:%M:%S)] step $step: rc=$rc in $(( $(date +%s) - start )) s$note"
    if [ -n "${COPY_RESULTS_TO:-}" ]; then
        mkdir -p "$COPY_RESULTS_TO/results" && cp -r "$RESULTS"/. "$COPY_RESULTS_TO/results/"
    fi
    return "$rc"
}

if [ $# -eq 0 ]; then
    echo "usage: bash benchmarks/run_gpu.sh STEP... | all   (each step under STEP_TIMEOUT); steps:"
    for s in $(steps); do printf "  %-16s %s\n" "$s" "$(describe "$s")"; done
    exit 0
fi
[ "$1" = all ] && set -- $(steps)
if [ "$*" != summary ] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: these are GPU steps (the CPU smoke run is: python benchmarks/moe.py --small)"
    exit 1
fi
mkdir -p "$RESULTS"
status=0
# moec from this checkout: install it first (no network: no dependencies, no build isolation) unless
# the steps start with `install` anyway or it already imports from here
if [ "$1" != install ] && [ "$1" != summary ] && ! python -c "import moec, pathlib, sys; \
sys.exit(0 if pathlib.Path(moec.__file__).resolve().parent == pathlib.Path('moec').resolve() else 1)" 2>/dev/null; then
    run_step install || exit 1
fi
for step in "$@"; do
    run_step "$step" || status=1
done
exit "$status"
