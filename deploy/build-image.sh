#!/usr/bin/env bash
# Build the matrix-safeguard image with buildah: localhost/matrix-safeguard:latest.
#
#   deploy/build-image.sh                     # on debian:bookworm-slim from a registry
#   deploy/build-image.sh --base IMAGE        # on another Debian bookworm image
#   deploy/build-image.sh --debootstrap       # no registry: a bookworm base made here
#                                             # from Debian's packages (cached in .cache/)
# Run it with podman/docker, or where neither runs (buildah alone):
#   buildah from --name safeguard localhost/matrix-safeguard:latest
#   buildah run --isolation chroot -v /srv/safeguard:/data safeguard -- safeguard start -c /data/config.yaml
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=localhost/matrix-safeguard:latest
BASE=docker.io/library/debian:bookworm-slim
DEBOOTSTRAP=0
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${SAFEGUARD_IMAGE_CACHE:-.cache/image}
while [ $# -gt 0 ]; do
  case "$1" in
    --debootstrap) DEBOOTSTRAP=1 ;;
    --base) BASE=$2; shift ;;
    --tag) TAG=$2; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$DEBOOTSTRAP" = 1 ]; then
  BASE=localhost/safeguard-base:bookworm
  if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    mkdir -p "$CACHE"
    tarball="$CACHE/bookworm-minbase.tar"
    if [ ! -s "$tarball" ]; then
      rootfs=$(mktemp -d)
      echo "making a Debian bookworm base with debootstrap ($MIRROR)"
      debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log"
      rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
      tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
      rm -rf "$rootfs"
    fi
    container=$(buildah from scratch)
    buildah add "$container" "$tarball" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$container"
    buildah commit --quiet "$container" "$BASE" >/dev/null
    buildah rm "$container" >/dev/null
  fi
fi

# Behind a TLS-inspecting proxy pip needs its CA: given to the build as a secret only.
secret=()
CA=${CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-}}}
if [ -n "$CA" ] && [ -s "$CA" ]; then
  secret=(--secret "id=ca-bundle,src=$CA")
fi

buildah bud --isolation chroot --format docker --layers "${secret[@]}" \
  --build-arg "BASE=$BASE" -f deploy/Containerfile -t "$TAG" .
echo "built $TAG (base $BASE)"
