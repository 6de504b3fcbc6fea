#!/usr/bin/env bash
# System packages the tests need beyond Python (root; Debian's packages). Idempotent.
# libjpeg-turbo headers: pretrain/data/jpeg.py compiles the ROI JPEG decoder against them.
set -euo pipefail
if [ ! -f /usr/include/jpeglib.h ] && [ ! -f /usr/local/include/jpeglib.h ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq libjpeg-dev >/dev/null
fi
