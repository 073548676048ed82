#!/usr/bin/env bash
# The GPU checks in one short run (about 8 minutes on one GPU): the gpu-marked tests, then the scale benchmark's
# frame-weighting cases on cuda at sizes that fit the time. Writes everything under ${OUT:-gpu-check}/.
#   bash experiments/benchmarks/gpu_check.sh
set -u
out="${OUT:-gpu-check}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))" \
  > "$out/torch.txt" 2>&1
timeout 240 python -m pytest -m gpu -q -p no:cacheprovider tests/test_device.py tests/test_md_streaming.py \
  tests/test_vae_model.py > "$out/gpu-tests.txt" 2>&1
echo "gpu tests rc=$?" >> "$out/gpu-tests.txt"
timeout 240 python experiments/benchmarks/scale.py --md --device cuda --threads 8 --sizes 1000x100000 5000x100000 \
  --workdir "$out/scale" --json "$out/scale_md_cuda.json" > "$out/scale_md_cuda.md" 2> "$out/scale_md_cuda.log"
echo "scale rc=$?" >> "$out/scale_md_cuda.md"
rm -f "$out"/scale/*/frames.h5
tail -n 20 "$out"/*.txt "$out"/*.md
