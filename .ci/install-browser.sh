#!/usr/bin/env bash
# Installs headless Chromium for the browser tests in tests/test_space.py (Debian package; Playwright's own
# browser download is not used). Needs root. Idempotent: a present /usr/bin/chromium is kept.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || true)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version
