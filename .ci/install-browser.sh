#!/usr/bin/env bash
# Debian Chromium for the Space's browser test (Playwright's own browser download cannot work offline).
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
