#!/usr/bin/env bash
# Builds modelgw's container images with docker, buildah or podman, whichever is there
# (docker only when its daemon answers). Each image installs from a wheelhouse made on
# this machine, so the build itself needs no package index:
#
#   deploy/images/build.sh                               # every image, tagged NAME:VERSION
#                          (VERSION: this tree's modelgw/__init__.py, checked inside the image)
#   deploy/images/build.sh --images modelgw --base-image localhost/modelgw-base:bookworm
#   deploy/images/build.sh --registry registry.example.com/ml   # tag REGISTRY/NAME:VERSION
#
# Options:
#   --images A,B        which images (default: all of IMAGES below)
#   --base-image IMG    BASE_IMAGE for every image built (default: each Dockerfile's own)
#   --registry R        tag R/NAME:VERSION instead of NAME:VERSION
#   --tool T            docker, buildah or podman (default: the first that works)
#   --wheelhouse DIR    where the wheelhouses go, one folder per image (default: the cache below)
#   --find-links DIR    also take wheels from DIR (repeatable): wheels downloaded beforehand
#   --extra-index URL   the index besides pip's own for these images ("" for none; default:
#                       EXTRA_INDEX_OF below)
#   --no-index          make the wheelhouses from --find-links only (offline)
#
# A wheelhouse holds modelgw's wheel (built from this tree), every dependency's wheel for
# the image's Python and platform (`pip download --only-binary`, under constraints.txt),
# requirements.txt and constraints.txt. modelgw's wheel is rebuilt on every run; wheels
# already in the wheelhouse are kept (pip downloads only what is missing).
# Environment: PYTHON (the pip to use; default .venv/bin/python), MODELGW_IMAGE_CACHE
# (default ~/.cache/modelgw-images), BUILD_ISOLATION (buildah/podman; default chroot, which
# works inside an unprivileged container).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

# The images, in build order, and each one's Python (its base's python3: bookworm's 3.11,
# Ubuntu 24.04's 3.12 under the CUDA base). tests/test_deploy_images.py checks this list
# against the Dockerfiles beside this script.
IMAGES=(modelgw modelgw-runtime modelgw-runtime-llm)
declare -A PYTHON_OF=([modelgw]=3.11 [modelgw-runtime]=3.11 [modelgw-runtime-llm]=3.12)
# Indexes a wheelhouse needs besides pip's own: torch's CPU build (PyPI's Linux torch is the
# CUDA build, GBs of NVIDIA libraries) and TensorRT's wheels (PyPI has only a stub sdist).
declare -A EXTRA_INDEX_OF=([modelgw]="" [modelgw-runtime]="https://download.pytorch.org/whl/cpu"
  [modelgw-runtime-llm]="https://pypi.nvidia.com")

images_csv=$(IFS=,; echo "${IMAGES[*]}")
base_image=""
registry=""
tool=""
cache=${MODELGW_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelgw-images}
wheelhouse_root=""
no_index=0
find_links=()
extra_index=unset
while [ $# -gt 0 ]; do
  case "$1" in
    --images) images_csv=$2; shift 2 ;;
    --base-image) base_image=$2; shift 2 ;;
    --registry) registry=${2%/}/; shift 2 ;;
    --tool) tool=$2; shift 2 ;;
    --wheelhouse) wheelhouse_root=$2; shift 2 ;;
    --find-links) find_links+=(--find-links "$2"); shift 2 ;;
    --extra-index) extra_index=$2; shift 2 ;;
    --no-index) no_index=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
wheelhouse_root=${wheelhouse_root:-$cache/wheelhouse}
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$REPO/modelgw/__init__.py")
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

IFS=, read -r -a wanted <<<"$images_csv"
for image in "${wanted[@]}"; do
  [ -f "$HERE/$image.Dockerfile" ] && [ -n "${PYTHON_OF[$image]:-}" ] || {
    echo "build.sh: no image named $image (images: ${IMAGES[*]})" >&2; exit 2; }
done

if [ -z "$tool" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then tool=docker
  elif command -v buildah >/dev/null; then tool=buildah
  elif command -v podman >/dev/null; then tool=podman
  else echo "build.sh: no docker (with a running daemon), buildah or podman here" >&2; exit 1
  fi
fi

# make_wheelhouse IMAGE DIR: modelgw's wheel and its dependencies' for IMAGE's Python.
make_wheelhouse() {
  local image=$1 dir=$2 py=${PYTHON_OF[$1]} arch
  arch=$(uname -m)
  mkdir -p "$dir"
  rm -f "$dir"/modelgw-*.whl
  # From a copy of the files git would commit: setuptools' build/ folder in the tree may
  # hold modules deleted since, which would end up in the wheel.
  local src
  src=$(mktemp -d)
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$src" 2>/dev/null || true)
  "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$dir" "$src"
  rm -rf "$src"
  local wheel
  wheel=$(ls "$dir"/modelgw-"$version"-*.whl)
  # The requirements name modelgw; pip takes it from the wheel just built, never an index.
  sed "s#^modelgw\[#$wheel[#" "$HERE/$image.requirements.txt" >"$dir/download.txt"
  { cat "$HERE/constraints.txt"; echo "modelgw==$version"; } >"$dir/constraints.txt"
  local index_args=() index=${EXTRA_INDEX_OF[$image]}
  [ "$extra_index" = unset ] || index=$extra_index
  if [ "$no_index" = 1 ]; then index_args=(--no-index)
  elif [ -n "$index" ]; then index_args=(--extra-index-url "$index")
  fi
  "$PYTHON" -m pip download --quiet --dest "$dir" --find-links "$dir" ${find_links[@]+"${find_links[@]}"} \
    ${index_args[@]+"${index_args[@]}"} \
    --only-binary=:all: --python-version "$py" \
    --platform "manylinux_2_34_$arch" --platform "manylinux_2_28_$arch" \
    --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" \
    --requirement "$dir/download.txt" --constraint "$dir/constraints.txt"
  cp "$HERE/$image.requirements.txt" "$dir/requirements.txt"
  rm "$dir/download.txt"
}

for image in "${wanted[@]}"; do
  tag="${registry}$image:$version"
  wheelhouse="$wheelhouse_root/$image-$version"
  start=$SECONDS
  echo "build.sh: making the wheelhouse $wheelhouse (Python ${PYTHON_OF[$image]})"
  make_wheelhouse "$image" "$wheelhouse"
  build_args=(--build-arg "MODELGW_VERSION=$version")
  [ -n "$base_image" ] && build_args+=(--build-arg "BASE_IMAGE=$base_image")
  echo "build.sh: building $tag with $tool${base_image:+ from $base_image}"
  case "$tool" in
    docker) docker build "${build_args[@]}" -f "$HERE/$image.Dockerfile" -t "$tag" "$wheelhouse" ;;
    buildah) buildah bud --isolation "${BUILD_ISOLATION:-chroot}" --layers "${build_args[@]}" \
               -f "$HERE/$image.Dockerfile" -t "$tag" "$wheelhouse" ;;
    podman) podman build --isolation "${BUILD_ISOLATION:-chroot}" "${build_args[@]}" \
              -f "$HERE/$image.Dockerfile" -t "$tag" "$wheelhouse" ;;
    *) echo "build.sh: --tool must be docker, buildah or podman, not $tool" >&2; exit 2 ;;
  esac
  echo "build.sh: $tag built in $((SECONDS - start)) s"
done
