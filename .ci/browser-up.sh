#!/usr/bin/env bash
# CI: a headless browser for the search page's test (tests/test_use_e2e.py): Debian's Chromium and its
# WebDriver, driven by Selenium (the `test` extra). Runs as root. The test fails, not skips, when CI=true
# and these are missing.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium chromium-driver >/dev/null
chromium --version
