#!/bin/sh
# Headless Chromium for the browser test of the web page: Debian's package when we run as root with apt-get.
# Elsewhere install it yourself (any Chromium or Chrome; set FMNIST_CHROMIUM to its path); the test skips without one.
set -e
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser test"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "chromium not found and not root: the browser test will be skipped (install chromium to run it)"
fi
