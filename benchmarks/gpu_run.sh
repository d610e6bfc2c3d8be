#!/bin/bash
# The whole GPU benchmark in one command, for a lent GPU machine that has no network (see README.md):
#   .whl/ carries nibabel, connected-components-3d and pydicom wheels, sitk.tar.xz (SimpleITK), and ref.tar.xz
#   (refsite/: MONAI 0.9.0, PyTorch Lightning 1.6.5, torchmetrics 0.9.3, batchgenerators 0.24, medpy,
#   performer-pytorch ... copied from the reference environments and patched by
#   reference/numpy2_compat.py; src/: DeepISLES' src/{SEALS,NVAUTO,FACTORIZER}; fconfigs/: factorizer-isles22's
#   registry.py + the two training YAMLs; case/: the ISLES'22 case).
# usage: DEEPISLES_COMMIT=<commit> TOTAL=560 bash benchmarks/gpu_run.sh [extra bench_gpu_targets.py arguments]
#   1. setup (wheels into /tmp/site, the reference files into /tmp/ref);
#   2. bench_gpu_targets.py: builds the official-format random weights with the reference code (--replicate), imports
#      them, then the GPU targets (ensemble warm time and peak memory, NVAUTO TFLOP/s, agreement with the fp32 CPU
#      path, pipelined cohort throughput) -> $OUT/$TJSON (default gpu_targets.json) and its .log;
#   3. only with COMPARE=1, in the time left: bench_ensemble.py, ours against DeepISLES' reference chains -> $OUT/$JSON.
# DEEPISLES_COMMIT (the commit of the copied tree, which has no .git) goes into the result files. TOTAL (seconds,
# default 560) bounds the whole call, setup included; the device tool stops a command after 600 s.
set -u
T0=$SECONDS
OUTD=${OUT:-/tmp/bench_out}; mkdir -p "$OUTD"
TOTAL=${TOTAL:-560}; JSON=${JSON:-gpu_full.json}; TJSON=${TJSON:-gpu_targets.json}
if [ ! -d /tmp/site/SimpleITK ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  tar -xJf .whl/sitk.tar.xz -C /tmp/site || exit 1
  mkdir -p /tmp/ref && tar -xJf .whl/ref.tar.xz -C /tmp/ref || exit 1
fi
echo "setup $((SECONDS - T0)) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PYTHONPATH=/tmp/site python3 -c "import torch, numpy, SimpleITK; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name(0))"
REF=(--workdir /tmp/wd --case /tmp/ref/case --deepisles-src /tmp/ref/src --factorizer-configs /tmp/ref/fconfigs
     --ref-stubs "" --ref-pythonpath /tmp/ref/refsite:/tmp/site --ours-pythonpath /tmp/site)
BUDGET=$((TOTAL - (SECONDS - T0) - 15))
PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu_targets.py --device cuda "${REF[@]}" \
  --budget $BUDGET --out "$OUTD/$TJSON" "$@" 2>&1 | tee "$OUTD/${TJSON%.json}.log"
LEFT=$((TOTAL - (SECONDS - T0) - 15))
if [ "${COMPARE:-0}" = 1 ] && [ $LEFT -gt 90 ]; then
  PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/bench_ensemble.py --device cuda "${REF[@]}" --replicate \
    --ref-order nvauto,factorizer,seals --budget $LEFT --json "$OUTD/$JSON" 2>&1 | tee "$OUTD/${JSON%.json}.log"
fi
cd /tmp/wd && tar -czf "$OUTD/${TJSON%.json}_logs.tgz" logs runs/*/ours/log.txt runs/*/ours/case*/report.json \
  runs/cohort_*/cohort.tsv runs/cohort_*/failures.jsonl runs/*/ref_*/log.txt runs/*/ref_*/gpu_mem.txt 2>/dev/null
echo "total $((SECONDS - T0)) s"
