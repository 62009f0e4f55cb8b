#!/usr/bin/env bash
# The prepared GPU benchmark, in one run of at most 8 minutes, from the repository root:
#
#   bash scripts/fetch_wheels.sh          # once, where pip reaches PyPI: fills the git-ignored .whl/
#   bash scripts/bench_gpu.sh --dry-run   # here, on the CPU: offline install in a fresh venv + a tiny run
#   bash scripts/bench_gpu.sh [OUT_DIR]   # on the GPU machine; OUT_DIR defaults to $OUT, else outputs/bench_gpu
#
# With this workplace's device tool: run(command="bash scripts/bench_gpu.sh", carry=[".whl"], timeout_s=560);
# the table ends the output, and bench_gpu.json + bench_gpu.log come back from $OUT.
#
# The CIFAR-100 KD recipe's pair (resnet32x4 -> resnet8x4, batch 64, SGD, crop + flip on the device) on
# 50,000 random 3x32x32 samples with 100 classes (scripts/bench.py --case cifar100_kd), one process per
# setting: bf16 + channels_last (kdtrain's CUDA default; with host syncs per step and a torch.profiler summary
# of the top kernels), bf16, fp32, and bf16 + channels_last + torch.compile. Each compares the plain loops
# (device index batching; a DataLoader), kdtrain with the teacher live, with the cache of 4 views, and the
# student alone, and projects the 240-epoch recipe's wall time. Each setting has a soft budget (no round
# starts that would end past it) and a hard time cap; with the stream case's the caps add up to under 8 minutes.
#
# Then the stream case (scripts/bench_data.py --skip-memory): kdtrain's stream path (dataset=imagefolder
# dataset.loader=stream, RandomResizedCrop 128 + flip decoded by DataLoader workers, one per core) against a
# plain torchvision ImageFolder + DataLoader loop, on 4,000 generated 256 px JPEGs, torchvision resnet18 ->
# resnet18 at bf16; it writes OUT_DIR/bench_data.json.
#
# Writes OUT_DIR/bench_gpu.json (every setting's results, combined) and OUT_DIR/bench_gpu.log (this output),
# prints the table of what worked, and exits 1 if any setting failed (its status, time cap or a way in it).
#
# --dry-run does the same on the CPU with 16 samples in batches of 8 (2 steps an epoch), in a fresh venv that
# sees this interpreter's packages (torch & co.) minus hydra-core, omegaconf, antlr4, PyYAML, packaging and
# safetensors, and installs those from .whl/ with no index: it proves the wheels install offline and every
# setting's command runs. It does not exercise torch.compile (minutes on a CPU): the compile setting runs on
# the GPU only.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-outputs/bench_gpu}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/bench_gpu.log"

# name | soft budget s | hard cap s | flags (on top of the common ones)
if [ "$DRY" = 1 ]; then
  TOTAL=2400  # generous: a CPU shared with other jobs ran bf16 resnet32x4 steps at seconds each
  COMMON=(--case cifar100_kd --device cpu --batch-size 8 --samples 16 --val-samples 16 --epochs 1 --views 2)
  SETTINGS=(
    "bf16_cl|60|900|--amp bf16 --channels-last --syncs --profile"
    "bf16|60|600|--amp bf16"
    "fp32|60|600|--amp off"
  )
  STREAM_CAP=600
  STREAM=(--device cpu --images 40 --classes 2 --size 48 --image-size 16 --epochs 2 --batch-size 8 --workers 1)
else
  TOTAL=470  # seconds from the start, setup included (later caps shrink to fit): the run stays under 8 minutes
  COMMON=(--case cifar100_kd --device cuda --epochs 3 --views 4)
  SETTINGS=(
    "bf16_cl|70|100|--amp bf16 --channels-last --syncs --profile"
    "bf16|55|80|--amp bf16"
    "fp32|55|80|--amp off"
    "bf16_cl_compile|95|130|--amp bf16 --channels-last --compile --ways engine,cached,student_alone"
  )
  STREAM_CAP=80
  STREAM=(--device cuda --amp bf16 --epochs 4 --batch-size 256 --model teacher=torchvision --model student=torchvision)
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# A fresh venv (no --system-site-packages) that reaches this interpreter's packages through a .pth naming a
# folder of links to them, leaving out what .whl/ must provide.
make_dry_venv() {
  python3 -m venv "$WORK/venv" || return 1
  local shadow="$WORK/host-packages" dir entry base
  mkdir -p "$shadow"
  for dir in $(python3 -c 'import sys; print(" ".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))'); do
    for entry in "$dir"/*; do
      base="$(basename "$entry")"
      case "${base,,}" in
        hydra* | omegaconf* | antlr4* | yaml | _yaml | pyyaml* | packaging* | safetensors* | kdtrain* | *.pth | __editable__*) ;;
        *) [ -e "$shadow/$base" ] || ln -s "$entry" "$shadow/$base" ;;
      esac
    done
  done
  "$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' >"$WORK/purelib" || return 1
  echo "$shadow" >"$(cat "$WORK/purelib")/_host_packages.pth"
}

# hydra-core, omegaconf and antlr4 4.9.3 always (the tested trio); PyYAML, packaging, safetensors where missing.
install_deps() {
  local py="$1" site="$2" need=(hydra-core omegaconf antlr4-python3-runtime)
  "$py" -c 'import yaml' 2>/dev/null || need+=(PyYAML)
  "$py" -c 'import packaging.version' 2>/dev/null || need+=(packaging)
  "$py" -c 'import safetensors' 2>/dev/null || need+=(safetensors)
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "bench_gpu.sh: .whl/ holds no wheels; run 'bash scripts/fetch_wheels.sh' where pip reaches PyPI, and carry .whl" >&2
    return 2
  fi
  echo "installing from .whl/ (no index): ${need[*]}"
  PIP_CONFIG_FILE=/dev/null "$py" -m pip install -q --disable-pip-version-check --no-index --find-links .whl --no-deps --no-compile \
    --no-cache-dir --target "$site" "${need[@]}"
}

run() {
  local start=$SECONDS py=python3 site="$WORK/site" src="$WORK/src"
  if [ "$DRY" = 1 ]; then
    echo "=== dry run: a fresh venv without hydra-core/omegaconf, wheels from .whl/ only, a tiny CPU run"
    make_dry_venv || { echo "bench_gpu.sh: could not create the venv" >&2; return 1; }
    py="$WORK/venv/bin/python"
    if "$py" -c 'import hydra' 2>/dev/null || "$py" -c 'import omegaconf' 2>/dev/null; then
      echo "bench_gpu.sh: the dry-run venv already sees hydra/omegaconf: it would prove nothing" >&2
      return 1
    fi
  fi
  install_deps "$py" "$site" || return $?
  # kdtrain from this checkout without installing it: its configs (conf/) are the package kdtrain.conf.
  mkdir -p "$src" && cp -r kdtrain "$src/" && rm -rf "$src/kdtrain/conf" && cp -r conf "$src/kdtrain/conf"
  find "$src" -name __pycache__ -prune -exec rm -rf {} +
  if [ "$DRY" = 1 ]; then
    export PYTHONPATH="$site:$src"
  else
    export PYTHONPATH="$site:$src${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONUNBUFFERED=1
  # (from another folder: the checkout's own kdtrain/, first on sys.path from here, has no kdtrain/conf)
  (cd "$WORK" && "$py" - "$src" "$DRY") <<'EOF' || { echo "bench_gpu.sh: the imports failed (see above)" >&2; return 1; }
import sys
import antlr4, hydra, omegaconf, packaging, safetensors, torch, yaml
import kdtrain, kdtrain.cli
assert kdtrain.__file__.startswith(sys.argv[1]), f"kdtrain imported from {kdtrain.__file__}"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, hydra-core {hydra.__version__}, "
      f"omegaconf {omegaconf.__version__}, antlr4 from {antlr4.__file__.rsplit('/', 2)[0]}, PyYAML {yaml.__version__}, "
      f"safetensors {safetensors.__version__}; kdtrain from {kdtrain.__file__}")
print("cuda:", torch.cuda.is_available() and torch.cuda.get_device_name())
assert sys.argv[2] == "1" or torch.cuda.is_available(), "no CUDA device"
EOF
  (cd "$WORK" && "$py" -m kdtrain --help >/dev/null) || { echo "bench_gpu.sh: 'python -m kdtrain --help' failed" >&2; return 1; }
  if [ "$DRY" = 0 ]; then
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv 2>/dev/null || true
  fi
  echo "=== setup took $((SECONDS - start)) s"

  local parts="$WORK/parts" names=() entry name budget cap flags left rc
  mkdir -p "$parts"
  for entry in "${SETTINGS[@]}"; do
    IFS='|' read -r name budget cap flags <<<"$entry"
    names+=("$name")
    left=$((TOTAL - (SECONDS - start)))
    if [ "$left" -lt 30 ]; then
      echo "=== $name: skipped, $left s left of $TOTAL"
      echo 125 >"$parts/$name.rc"
      continue
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    [ "$budget" -gt "$cap" ] && budget=$((cap * 2 / 3))
    echo "=== $name: ${flags} (budget $budget s, cap $cap s)"
    # shellcheck disable=SC2086  # flags are words
    timeout --kill-after=10 "$cap" "$py" scripts/bench.py "${COMMON[@]}" $flags --name "$name" \
      --budget "$budget" --json "$parts/$name.json"
    rc=$?
    echo "$rc" >"$parts/$name.rc"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
  done
  left=$((TOTAL - (SECONDS - start)))
  [ "$STREAM_CAP" -gt "$left" ] && STREAM_CAP=$left
  local stream_rc=125
  if [ "$STREAM_CAP" -ge 30 ]; then
    echo "=== stream: scripts/bench_data.py ${STREAM[*]} --skip-memory (cap $STREAM_CAP s)"
    timeout --kill-after=10 "$STREAM_CAP" "$py" scripts/bench_data.py "${STREAM[@]}" --skip-memory \
      --json "$OUT_DIR/bench_data.json"
    stream_rc=$?
    echo "=== stream: exit $stream_rc after $((SECONDS - start)) s"
  else
    echo "=== stream: skipped, $left s left of $TOTAL"
  fi
  echo
  "$py" scripts/bench_summary.py "$parts" --expect "${names[@]}" --json "$OUT_DIR/bench_gpu.json"
  rc=$?
  if [ "$stream_rc" != 0 ]; then
    echo "FAILED stream: scripts/bench_data.py exit $stream_rc (see $OUT_DIR/bench_data.json)"
    rc=1
  fi
  echo "=== total $((SECONDS - start)) s"
  if [ "$DRY" = 1 ] && [ "$rc" = 0 ]; then
    echo "dry run passed: the wheels install offline, the imports work, every setting ran on the CPU"
  fi
  return $rc
}

run 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
