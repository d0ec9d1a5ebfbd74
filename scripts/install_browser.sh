#!/usr/bin/env bash
# Install Debian's chromium for the browser check, when it is missing and we can.
# Never fails the build: without chromium the browser check is skipped with a reason.
set -u
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's chromium for the browser check (apt-get)..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "Could not install chromium; the browser check will be skipped."
else
  echo "chromium not found and cannot apt-get it here; the browser check will be skipped."
fi
exit 0
