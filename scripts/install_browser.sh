#!/usr/bin/env bash
# Install Debian's Chromium for the browser test (tests/test_web.py, marked `browser`), plus a CJK font so the
# Chinese in GLM answers renders in screenshots. Playwright drives this system binary
# (executable_path=/usr/bin/chromium) instead of downloading a browser of its own.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive

packages=()
if [ ! -x /usr/bin/chromium ]; then
    packages+=(chromium)
fi
if ! fc-list :lang=zh 2>/dev/null | grep -q .; then
    packages+=(fonts-wqy-zenhei)
fi

if [ ${#packages[@]} -eq 0 ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi
$SUDO apt-get update
$SUDO apt-get install -y "${packages[@]}"
/usr/bin/chromium --version || true
