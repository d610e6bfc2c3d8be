#!/bin/bash
# The whole GPU benchmark in one command, for a lent GPU machine that has no network (see README.md):
#   .whl/ carries nibabel, connected-components-3d and pydicom wheels, sitk.tar.xz (SimpleITK), and ref.tar.xz
#   (refsite/: MONAI 0.9.0, PyTorch Lightning 1.6.5, torchmetrics 0.9.3, batchgenerators 0.24, medpy,
#   performer-pytorch ... copied from the reference environments and patched by
#   reference/numpy2_compat.py; src/: DeepISLES' src/{SEALS,NVAUTO,FACTORIZER}; fconfigs/: factorizer-isles22's
#   registry.py + the two training YAMLs; case/: the ISLES'22 case).
# usage: DEEPISLES_COMMIT=<commit> TOTAL=320 JSON=gpu_full.json bash benchmarks/gpu_run.sh [extra bench_ensemble.py
#        arguments]; DEEPISLES_COMMIT (the commit of the copied tree, which has no .git) goes into the result file
set -u
T0=$SECONDS
OUTD=${OUT:-/tmp/bench_out}; mkdir -p "$OUTD"
TOTAL=${TOTAL:-320}; JSON=${JSON:-gpu_full.json}
if [ ! -d /tmp/site/SimpleITK ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  tar -xJf .whl/sitk.tar.xz -C /tmp/site || exit 1
  mkdir -p /tmp/ref && tar -xJf .whl/ref.tar.xz -C /tmp/ref || exit 1
fi
echo "setup $((SECONDS - T0)) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PYTHONPATH=/tmp/site python3 -c "import torch, numpy, SimpleITK; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name(0))"
BUDGET=$((TOTAL - (SECONDS - T0) - 10))
PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/bench_ensemble.py --device cuda --workdir /tmp/wd \
  --case /tmp/ref/case --deepisles-src /tmp/ref/src --factorizer-configs /tmp/ref/fconfigs --ref-stubs "" \
  --ref-pythonpath /tmp/ref/refsite:/tmp/site --ours-pythonpath /tmp/site --replicate \
  --ref-order nvauto,factorizer,seals --budget $BUDGET --json "$OUTD/$JSON" "$@" 2>&1 | tee "$OUTD/${JSON%.json}.log"
cd /tmp/wd && tar -czf "$OUTD/${JSON%.json}_logs.tgz" logs runs/*/ours/log.txt runs/*/ours/case1/report.json \
  runs/*/ref_*/log.txt runs/*/ref_*/gpu_mem.txt 2>/dev/null
echo "total $((SECONDS - T0)) s"
