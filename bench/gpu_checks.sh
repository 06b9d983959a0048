#!/usr/bin/env bash
# The checks that need a GPU, as ONE call of the device tool. An H200 holds torch, triton and
# accelerate, but transformers 5.17 (we need >= 5.24) and neither pydantic nor liger-kernel:
# carry their wheels (about 17 MB). Prepare once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 liger-kernel==0.8.5 transformers==5.24.0
# then: run(command="bash bench/gpu_checks.sh", carry=[".whl"], timeout_s=590)
# and copy $OUT's JSON and logs to bench/results/. Wall time: the GPU tests about a minute and
# a half, the training-step benchmark 6 minutes at most, ours against Liger's loss 2 at most.
# A benchmark cut off by its timeout writes no JSON: then its log (one line per finished
# measurement) tells what it measured.
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
# packing, flex_attention's document mask (its backward runs on a GPU only), the chunked
# cross-entropy and Liger's against it
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_train_data.py \
  tests/test_train_loss.py 2>&1 | tee "$OUT/gpu-tests.txt"
# tokens/s, TFLOP/s and peak memory of our step vs plain Hugging Face, 135M and 1B shapes
timeout "${BENCH_SECONDS:-360}" python3 bench/train_step.py --steps 2 \
  --out "$OUT/train_step-h200.json" 2> "$OUT/train_step-h200.log"
echo "bench exit $?"
timeout 120 python3 bench/train_step.py --steps 2 --shapes smollm2-135m --lengths 65536 \
  --variants longctx longctx_liger --out "$OUT/train_step-liger-h200.json" \
  2> "$OUT/train_step-liger-h200.log"
echo "liger bench exit $?"
