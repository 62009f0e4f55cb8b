#!/usr/bin/env bash
# One prepared GPU benchmark, run from the repository root:  bash scripts/bench_gpu.sh [OUT_DIR]
#
# resnet56 -> resnet20 on CIFAR-100-shaped random tensors (scripts/bench.py --case cifar): the plain
# PyTorch loop, kdtrain's engine, kdtrain with the teacher cache and the student alone, for
# amp bf16/off x channels_last on/off. About 2-3 minutes on one H100 (each setting is cut at 70 s, so the whole stays within 5).
#
# For a GPU machine whose python3 has torch (and torchvision) but not hydra-core/omegaconf: the other
# pure-Python dependencies are installed from wheels in the git-ignored folder .whl/, filled beforehand
# on a machine with network access (match --python-version to the GPU machine's python3):
#
#   mkdir -p .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       hydra-core==1.3.8 omegaconf==2.3.1 PyYAML tqdm safetensors
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI: build its wheel
#
# (PyYAML and safetensors have compiled wheels: when the two machines differ in platform, add e.g.
# --platform manylinux_2_17_x86_64 to the download. A wheel whose package is already installed on the
# GPU machine is harmless: /tmp/site comes first on PYTHONPATH.)
set -euo pipefail
OUT="${1:-${OUT:-bench_out}}"
mkdir -p "$OUT"

if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "bench_gpu.sh: hydra-core is missing and .whl/ holds no wheels; see the comment at the top" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
# kdtrain from this checkout without installing it: its configs live in conf/ and are the package
# kdtrain.conf (pyproject's package-dir), so lay the package out as an install would.
rm -rf /tmp/kdsrc && mkdir -p /tmp/kdsrc && cp -r kdtrain /tmp/kdsrc/ && cp -r conf /tmp/kdsrc/kdtrain/conf
export PYTHONPATH="/tmp/site:/tmp/kdsrc:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"

for amp in bf16 off; do
  for cl in on off; do
    flag=""; [ "$cl" = on ] && flag="--channels-last"
    echo "=== amp=$amp channels_last=$cl"
    timeout 70 python3 scripts/bench.py --case cifar --device cuda --samples 4096 --epochs 3 --amp "$amp" $flag \
      --json "$OUT/bench_cifar_cuda_${amp}_cl-${cl}.json" || echo "(amp=$amp channels_last=$cl failed or timed out)"
  done
done
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
print(f"\n{'amp':<6}{'cl':<5}" + "".join(f"{n:>15}" for n in ("plain", "engine", "cached", "student_alone")) + "  engine/plain  cached/alone")
for f in sorted(pathlib.Path(sys.argv[1]).glob("bench_cifar_cuda_*.json")):
    d = json.loads(f.read_text()); r = d["results"]; q = d["ratios"]
    print(f"{d['amp']:<6}{'on' if d['channels_last'] else 'off':<5}" + "".join(f"{r[n]['samples_per_sec']:>15,.0f}" if n in r else f"{'-':>15}" for n in ("plain", "engine", "cached", "student_alone"))
          + f"  {q['engine_vs_plain']:>12.2f}  {q.get('cached_vs_student_alone', float('nan')):>12.2f}")
EOF
