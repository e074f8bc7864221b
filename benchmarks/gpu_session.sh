#!/usr/bin/env bash
# The GPU checks the issues owe, as one prepared command for a short lease on a GPU machine.
#
#   benchmarks/gpu_session.sh STEP [STEP ...]
#
# Steps run in the order given, each under its own time limit and all within $DEADLINE_S seconds
# (default 570, inside a lease's 600-second command limit, so the archive is always written); a
# failed or timed-out step is logged and the next one still runs. `budget:` saves after every class;
# `drocc:` only when it ends, so give it one class per step (drocc:0 drocc:1, not drocc:0,1).
# Two files land in $OUT (default ./gpu-out): log.txt and results.tar.gz (result folders named as
# under benchmarks/results/, to unpack there and commit); the result folders themselves are
# written outside $OUT, since a lease returns only a few files.
#
#   env                  GPU, driver and package versions
#   kernel-tests         dispatch and CUDA C tests on the device (compiled Triton and CUDA C vs float64)
#   kernels              benchmarks/kernels.py (issue 5)
#   train                CIFAR-10 fast net on 9 classes, cat held out (issue 2/3; classifier reused below)
#   evaluate             detection table on CIFAR-10 vs held-out class, MNIST, Tiny ImageNet (issue 3)
#   train:C, evaluate:C  the same with class C held out (issue 3's "each held-out class"); in one command
#   budget:C1,C2         Table 4 for these novel classes, budgets $BUDGETS (default 500,1000; issue 4), added to
#                        the table committed in benchmarks/results/cifar10_budget by earlier leases
#   drocc:I1,I2          DROCC / DROCC-LF one-class CIFAR-10, paper recipe, these class indices (issue 6)
#
# The machine gets the checkout without .git and without ../shared: copy the data sets into the
# git-ignored .data/ first and carry it, and name the commit the results belong to:
#   mkdir -p .data && cp ../shared/data/*.tar.gz ../shared/tools/check_results.py .data/
#   run(command="EDGE_RUNTIME_COMMIT=<sha> benchmarks/gpu_session.sh env kernel-tests kernels",
#       carry=[".data"], timeout_s=600)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
RESULTS="$(mktemp -d)/results"
LOG="$OUT/log.txt"
mkdir -p "$OUT" "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export EDGE_RUNTIME_DATA="${EDGE_RUNTIME_DATA:-$PWD/.data}"
# The tests check results with ../shared/tools/check_results.py; the machine has no ../shared, so use the carried copy.
if [ -z "${EDGE_RUNTIME_RESULT_CHECKER:-}" ] && [ -f "$EDGE_RUNTIME_DATA/check_results.py" ]; then
  export EDGE_RUNTIME_RESULT_CHECKER="$EDGE_RUNTIME_DATA/check_results.py"
fi
PYTHON="${PYTHON:-python3}"
CIFAR_CONFIG="${CIFAR_CONFIG:-configs/cifar10-fastnet.yaml}"  # another config only to try the steps on a CPU
BUDGETS="${BUDGETS:-500,1000}"
DEADLINE_S="${DEADLINE_S:-570}"
PACKING_S=15  # kept back for the archive

# step_limit STEP: seconds the step may take before it is stopped.
step_limit() {
  case "$1" in
    env) echo 60 ;; kernel-tests) echo 240 ;; kernels) echo 240 ;; train|train:*) echo 420 ;;
    evaluate|evaluate:*) echo 480 ;; budget:*) echo 1200 ;; drocc:*) echo 1200 ;; *) echo 0 ;;
  esac
}

edge_runtime() { "$PYTHON" -m edge_runtime.cli.main "$@" --no-progress; }

# held_out STEP: the class after "train:" / "evaluate:", empty for the config's own (cat).
held_out() { case "$1" in *:*) echo "${1#*:}" ;; esac; }
# classifier_args CLASS: the classifier an earlier train step of this command left for CLASS, if any.
classifier_args() {
  local classifier="$RESULTS/cifar10_fastnet_train${1:+_$1}/classifier.safetensors"
  if [ -f "$classifier" ]; then echo "--classifier $classifier"; fi
}

run_step() {
  case "$1" in
    env) nvidia-smi -L; "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name(0), 'triton', triton.__version__)"; nvcc --version | tail -1 ;;
    kernel-tests) "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_reference_kernels.py tests/test_dispatch.py \
        tests/test_kernels_cuda.py ;;  # test_kernels_triton.py is interpreter-only (CI)
    kernels) # Named after the leased GPU (kernels-h100, kernels-h200): timings hold for that card only.
      local card; card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | grep -oE 'h100|h200|a100|l40s|l4' | head -1)
      "$PYTHON" benchmarks/kernels.py --out "$RESULTS/kernels-${card:-gpu}" ;;
    train|train:*) local held; held=$(held_out "$1")
      edge_runtime train --config "$CIFAR_CONFIG" ${held:+--set data.novel_class=$held} \
        --out "$RESULTS/cifar10_fastnet_train${held:+_$held}" ;;
    evaluate|evaluate:*) local held; held=$(held_out "$1")
      edge_runtime evaluate --config "$CIFAR_CONFIG" ${held:+--set data.novel_class=$held} $(classifier_args "$held") \
        --out "$RESULTS/cifar10_fastnet_evaluate${held:+_$held}" ;;
    budget:*) # One table over leases: start from the committed one, add these classes (--resume).
      local table="$RESULTS/cifar10_budget"
      [ -d "$table" ] || { mkdir -p "$table"; cp benchmarks/results/cifar10_budget/result.json "$table/" 2>/dev/null || true; }
      edge_runtime bench budget --config "$CIFAR_CONFIG" --budgets "$BUDGETS" --novel "${1#budget:}" --resume \
        --out "$table" ;;
    drocc:*) local classes="${1#drocc:}"
      "$PYTHON" benchmarks/one_class.py --dataset cifar10 --device cuda --profile paper --methods drocc,drocc_lf \
        --classes "$classes" --no-progress --out "$RESULTS/one_class_cifar10_drocc_${classes//,/_}" ;;
  esac
}

for step in "$@"; do
  limit=$(step_limit "$step")
  if [ "$limit" = 0 ]; then echo "unknown step '$step' (see the header of $0)" | tee -a "$LOG"; continue; fi
  left=$((DEADLINE_S - PACKING_S - SECONDS))
  if [ "$left" -lt 30 ]; then echo "=== $step: skipped, ${left}s left before the deadline" | tee -a "$LOG"; continue; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $step (limit ${limit}s) $(date -u +%FT%TZ)" | tee -a "$LOG"
  start=$SECONDS
  # A subshell under `timeout`, so one step's hang or crash cannot stop the others.
  export -f run_step edge_runtime held_out classifier_args
  export PYTHON CIFAR_CONFIG BUDGETS RESULTS
  timeout --kill-after=10 "$limit" bash -ec "run_step '$step'" 2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  echo "=== $step: exit $status after $((SECONDS - start))s" | tee -a "$LOG"
done
tar -czf "$OUT/results.tar.gz" -C "$RESULTS" --exclude='*.pt' --exclude='*.safetensors' . && echo "wrote $OUT/results.tar.gz" | tee -a "$LOG"
