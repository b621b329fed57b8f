#!/usr/bin/env bash
# Makes a Debian bookworm base image with python3 from Debian's own packages (debootstrap),
# for machines that reach Debian's mirror but no image registry. The image stands in for
# python:3.11-slim-bookworm: pass it to build.sh as `--base-image localhost/modelgw-base:bookworm`.
#
#   deploy/images/debian-base.sh [TAG]      (as root; needs debootstrap and buildah)
#
# The root filesystem is cached as a tarball (MODELGW_IMAGE_CACHE, default
# ~/.cache/modelgw-images), so a second run only imports it, and does nothing at all when
# the image is already in buildah's store.
set -euo pipefail

TAG=${1:-localhost/modelgw-base:bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${MODELGW_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelgw-images}
# python3-venv brings ensurepip, which the build stage needs to make the virtualenv; the
# final stage copies the virtualenv only, and Debian's python3 is the interpreter it runs.
PACKAGES=python3,python3-venv,ca-certificates
TARBALL=$CACHE/debian-$SUITE-minbase-python3.tar

if buildah inspect --type image "$TAG" >/dev/null 2>&1; then
  echo "debian-base: $TAG is already in buildah's store"
  exit 0
fi
mkdir -p "$CACHE"
if [ ! -s "$TARBALL" ]; then
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  echo "debian-base: debootstrap $SUITE from $MIRROR into $root"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR"
  # what an image needs no copy of: apt's package lists and downloaded .debs, docs
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/log/*.log
  tar -C "$root" --numeric-owner -cf "$TARBALL.part" .
  mv "$TARBALL.part" "$TARBALL"
fi
echo "debian-base: importing $TARBALL as $TAG"
ctr=$(buildah from scratch)
buildah add --quiet "$ctr" "$TARBALL" /
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
buildah commit --quiet --rm "$ctr" "$TAG" >/dev/null
echo "debian-base: $TAG ready"
