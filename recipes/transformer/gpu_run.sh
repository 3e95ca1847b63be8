#!/usr/bin/env bash
# AdaHessian vs Adam on Multi30k de-en in one command: fairseq from carried wheels, training with a
# time budget (same number of updates for both), BLEU on test_2016_flickr, JSON + markdown summary.
#
# On the GPU machine, in the repository root, with `.whl/fairseq` and `.gpu/multi30k` carried:
#     bash recipes/transformer/gpu_run.sh            # writes summary.json/.md and logs to $OUT
# Prepare the carried folders here first (see recipes/transformer/README.md):
#     bash recipes/transformer/build_wheels.sh .whl/fairseq
#     .venv/bin/python recipes/transformer/prepare_data.py --out .gpu/multi30k
#
# Environment knobs:
#   BUDGET      seconds for the whole script, install included (default 420)
#   MAX_UPDATE  train exactly this many updates per optimizer instead of fitting a budget
#   DATA        prepared corpus (default .gpu/multi30k: bin/ and ref/test.en)
#   OUTDIR      where the summary goes (default $OUT, else runs/transformer)
#   DEVICE      cuda (default) or cpu;  PYTHON  interpreter (default python3)
#   WHEELS      wheel folder to install into /tmp/site (default .whl/fairseq; empty: no install)
#   EXTRA       more compare.py arguments, e.g. "--train-args '--max-tokens 1024' --max-len-b 5"
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-.whl/fairseq}
DATA=${DATA:-.gpu/multi30k}
OUTDIR=${OUTDIR:-${OUT:-runs/transformer}}
DEVICE=${DEVICE:-cuda}
if [ -n "$WHEELS" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
"$PYTHON" -c "import fairseq, hessopt, sacrebleu, sentencepiece, torch; print('fairseq', fairseq.__version__, fairseq.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
if [ -n "${MAX_UPDATE:-}" ]; then
  MODE=(--max-update "$MAX_UPDATE")
else
  MODE=(--budget-seconds $(( ${BUDGET:-420} - ($(date +%s) - start) )))
fi
eval "EXTRA_ARGS=(${EXTRA:-})"
"$PYTHON" recipes/transformer/compare.py --data "$DATA/bin" --ref "$DATA/ref/test.en" --out "$OUTDIR" \
  --work-dir /tmp/hessopt-transformer --device "$DEVICE" "${MODE[@]}" "${EXTRA_ARGS[@]}"
echo "gpu_run.sh: total $(( $(date +%s) - start )) s"
