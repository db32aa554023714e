#!/bin/sh
# Make sure Fashion-MNIST is on this machine: Debian's package when we run as root on a Debian-like system,
# otherwise the verified download into ~/.cache/fmnist.
set -e
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's dataset-fashion-mnist"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "downloading Fashion-MNIST into the cache"
  .venv/bin/fmnist data fetch
fi
