#!/usr/bin/env bash
# Test-only system dependencies: a headless browser for tests/test_web.py (Debian's chromium, CJK fonts so
# screenshots show Chinese) and the Python `playwright` driver (used with that chromium; never
# `playwright install`). Idempotent: installs only what is missing, so `make test` can call it every time.
set -euo pipefail
PYTHON=${PYTHON:-python3}

if [ ! -x /usr/bin/chromium ] || ! fc-list 2>/dev/null | grep -qi "noto.*cjk"; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-noto-cjk
    else
        echo "install-test-deps: no apt-get here; install chromium and a CJK font yourself (tests/test_web.py skips without them)" >&2
    fi
fi

if ! "$PYTHON" -c "import playwright" >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q "playwright>=1.40"
fi
