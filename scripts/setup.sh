#!/usr/bin/env bash
# Idempotent set-up: system data/services via apt (when root), a virtual environment in .venv with the CPU
# build of torch (pip's local wheel here; PyPI's CPU index elsewhere) and bilevel with its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."

# Data: Fashion-MNIST and the spam data frame of R's kernlab (read without R; --no-install-recommends keeps R to
# r-base-core). The tests that read them FAIL when run as root without them (they skip only for users who are not
# root). Service: PostgreSQL (its tests skip without it).
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  data=()
  [ -d /usr/share/datasets/fashion-mnist ] || data+=(dataset-fashion-mnist)
  [ -f /usr/lib/R/site-library/kernlab/data/spam.rda ] || data+=(r-cran-kernlab)
  need=()
  command -v pg_ctlcluster >/dev/null || [ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql)
  if [ ${#data[@]} -gt 0 ] || [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq >/dev/null 2>&1 || true
  fi
  if [ ${#data[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${data[@]}" >/dev/null 2>&1 \
      || echo "setup: could not apt-get install ${data[*]}; the tests that read them will fail (run as root)" >&2
  fi
  if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 \
      || echo "setup: could not apt-get install ${need[*]}; tests that need them will be skipped" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # torch 2.13.0 (CPU) is on this machine's disk and installs in seconds; elsewhere any torch>=2.3 works.
  .venv/bin/pip install -q torch==2.13.0 2>/dev/null \
    || .venv/bin/pip install -q "torch>=2.3"
fi
if ! .venv/bin/python -c "import bilevel, higher, sklearn, mlxtend, pytest, psycopg2, hypothesis" >/dev/null 2>&1; then
  .venv/bin/pip install -q -e ".[dev]"
fi
# Peers compared in tests/test_peers.py and benchmarks/ (optional: those tests skip without them). Betty's metadata
# has non-standard version specifiers, hence --no-deps (its needs, torch and numpy, are already here).
if ! .venv/bin/python -c "import torchopt, betty" >/dev/null 2>&1; then
  .venv/bin/pip install -q torchopt==0.7.3 >/dev/null 2>&1 || echo "setup: torchopt not installed; its comparison tests will skip" >&2
  .venv/bin/pip install -q --no-deps betty-ml==0.1.1 >/dev/null 2>&1 || echo "setup: betty-ml not installed; its comparison tests will skip" >&2
fi
