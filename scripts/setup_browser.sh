#!/usr/bin/env bash
# Install headless Chromium and its WebDriver for the documentation site's browser check (tests/test_docs.py).
# Only where they are missing and this is Debian/Ubuntu run as root (as on CI); elsewhere it says what to install,
# and the browser check is skipped with that reason.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing chromium and chromium-driver (Debian packages) for the docs browser check"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "setup: could not install chromium: the docs browser check will be skipped"
else
  echo "note: chromium and chromedriver are not installed (as root on Debian: apt-get install chromium chromium-driver): the docs browser check will be skipped"
fi
exit 0
