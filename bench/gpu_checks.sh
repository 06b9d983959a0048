#!/usr/bin/env bash
# The checks that need a GPU, as ONE call of the device tool (an H200 holds torch,
# transformers and accelerate, not pydantic: carry its wheels). Prepare once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# then: run(command="bash bench/gpu_checks.sh", carry=[".whl"], timeout_s=590)
# and copy $OUT's JSON and logs to bench/results/. Wall time: the GPU tests about a minute,
# the training-step benchmark the rest; it is cut off at BENCH_SECONDS, and then only its log
# (one line per finished measurement) tells what it measured.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 - <<'EOF' | tee "$OUT/gpu-versions.txt"
import accelerate, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "accelerate", accelerate.__version__)
EOF
# packing, the flex_attention document mask (its backward runs on a GPU only), chunked CE
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_train_data.py \
  tests/test_train_loss.py 2>&1 | tee "$OUT/gpu-tests.txt"
# tokens/s, TFLOP/s and peak memory of our step vs plain Hugging Face, 135M and 1B shapes
timeout "${BENCH_SECONDS:-420}" python3 bench/train_step.py --steps 2 \
  --out "$OUT/train_step-h200.json" 2> "$OUT/train_step-h200.log"
echo "bench exit $?"
