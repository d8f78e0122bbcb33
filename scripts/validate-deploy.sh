#!/usr/bin/env bash
# Machine checks of what cannot run on this machine: the API spec, the container image
# definition, the Kubernetes manifests, the alerting rules (checked and unit-tested) and the
# Grafana dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m openapi_spec_validator openapi.yaml
hadolint Dockerfile
# The build stage sees only what the Dockerfile copies: that much must load as a workspace.
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
grep '^COPY ' Dockerfile | grep -v -- '--from' | while read -r _ args; do
    read -ra parts <<<"$args"
    dest=${parts[-1]}
    for src in "${parts[@]:0:${#parts[@]}-1}"; do
        if [[ $dest == */ ]]; then
            mkdir -p "$context/$dest"
            cp -r "$src" "$context/$dest"
        else
            mkdir -p "$context/$(dirname "$dest")"
            cp -r "$src" "$context/$dest"
        fi
    done
done
(cd "$context" && cargo metadata --no-deps --format-version 1 >/dev/null)
yamllint -d '{extends: default, rules: {line-length: {max: 240, allow-non-breakable-inline-mappings: true}, document-start: disable, truthy: {check-keys: false}}}' k8s deploy/prometheus openapi.yaml
# Every core resource, strictly, against a current Kubernetes; the ServiceMonitor is a CRD
# (Prometheus Operator) and kustomization files are not resources.
mapfile -t manifests < <(find k8s -name '*.yaml' ! -name 'kustomization.yaml' ! -name 'servicemonitor.yaml' | sort)
kubernetes-validate --strict --quiet "${manifests[@]}"
# The overlays (example: base + the Kafka consumer component; cluster: a sharded, replicated
# ClickHouse) render, where kubectl is there.
if command -v kubectl >/dev/null; then
    for overlay in k8s/overlays/*/; do
        kubectl kustomize "$overlay" >/dev/null
    done
fi
promtool check rules deploy/prometheus/alerts.yaml
(cd deploy/prometheus && promtool test rules alerts_test.yaml)
python3 -m json.tool deploy/grafana/buffergate.json >/dev/null
echo "deploy artefacts: ok"
