#!/usr/bin/env bash
# Build the wheels that `import fairseq` and fairseq-train need on a machine that has PyTorch but
# no fairseq and no internet (e.g. the project's GPU image: CPython 3.12, torch, numpy, pyyaml,
# regex, sacrebleu, sentencepiece, torchaudio, scikit-learn installed).
#
#   bash recipes/transformer/build_wheels.sh [DEST=.whl]      (env: PY=python3.12, SDIST_PIP=.venv/bin/pip)
#
# What it builds into DEST (about 10 MB):
#   fairseq_fixed-0.12.3.1-cp3XX-...whl   from the sdist, WITHOUT fairseq's torch C++ extensions
#       (libbase: BASE layers, libnat: non-autoregressive models, alignment_train_cpu_binding:
#       an example). fairseq imports those lazily inside the functions that use them, so the
#       Transformer, fairseq-preprocess/-train/-generate do not need them; skipping them removes
#       the build's dependency on torch (and on the exact torch ABI of the target machine). The
#       Cython modules training needs (data_utils_fast, token_block_utils_fast) and libbleu are built.
#   antlr4_python3_runtime-4.9.3 (built from its sdist: PyPI has no wheel), hydra_core-1.3.2,
#   omegaconf-2.3.0, bitarray (manylinux wheel for the target Python).
#
# The install on the target: pip install --no-index --no-deps --target /tmp/site DEST/*.whl
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=$(mkdir -p "${1:-.whl}" && cd "${1:-.whl}" && pwd)
PY=${PY:-python3.12}
SDIST_PIP=${SDIST_PIP:-.venv/bin/pip}   # any pip whose Python has torch: fairseq's setup.py imports torch to read its metadata
FAIRSEQ=fairseq-fixed==0.12.3.1
BITARRAY=${BITARRAY:-bitarray==3.8.0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
echo "building for CPython $pyver into $DEST"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "cython>=3" "numpy>=2" setuptools wheel

# 1. the sdist
"$SDIST_PIP" download -q --no-deps --no-binary fairseq-fixed --no-build-isolation -d "$WORK" "$FAIRSEQ"
tar -xzf "$WORK"/fairseq_fixed-0.12.3.1.tar.gz -C "$WORK"
SRC="$WORK/fairseq_fixed-0.12.3.1"

# 2. drop the torch C++ extensions (see above); fail loudly if the setup.py differs from the one checked
"$WORK/venv/bin/python" - "$SRC/setup.py" <<'EOF'
import re, sys
path = sys.argv[1]
text = open(path).read()
start = text.index("extensions.extend(\n    [\n        cpp_extension.CppExtension(")
end = text.index('cmdclass = {"build_ext": cpp_extension.BuildExtension}')
text = text[:start] + "cmdclass = {}\n" + text[end + len('cmdclass = {"build_ext": cpp_extension.BuildExtension}'):]
text = text.replace("from torch.utils import cpp_extension\n", "", 1)
assert "cpp_extension" not in text and not re.search(r"^\s*(import|from) torch", text, re.M), "unexpected setup.py"
open(path, "w").write(text)
EOF

# 3. the wheels
"$WORK/venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$DEST" "$SRC"
"$WORK/venv/bin/pip" wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
"$WORK/venv/bin/pip" download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" hydra-core==1.3.2 omegaconf==2.3.0 "$BITARRAY"
ls -la "$DEST"
du -sh "$DEST"
