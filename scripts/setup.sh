#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine: system packages (etcd), a virtualenv in
# .venv and modelgw with every extra and the test tools. Safe to run again.
#   --torch-plan   print which torch build this machine would get, and why; install nothing
set -euo pipefail
cd "$(dirname "$0")/.."

# torch first and pinned, so that the extras below find it installed. On PyPI a Linux
# torch is the CUDA build, which pulls several GB of NVIDIA libraries: without an NVIDIA
# GPU, take the CPU-only build from PyTorch's own index. Where that index is unreachable
# (a machine that reaches only PyPI), ask pip as configured: a local CPU wheel, where the
# machine carries one, wins over PyPI's build (its `+cpu` version sorts higher).
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
has_nvidia_gpu() {
  [ -e /proc/driver/nvidia/version ] || { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }
}
index_reachable() {  # 5 s, no retries: an unreachable index must cost little
  "${1}" -c "import urllib.request as u; u.urlopen('$2/torch/', timeout=5)" 2>/dev/null
}
torch_plan() {  # prints "cuda", "cpu-index" or "configured"
  if has_nvidia_gpu; then echo cuda
  elif index_reachable "$1" "$TORCH_CPU_INDEX"; then echo cpu-index
  else echo configured
  fi
}
if [ "${1:-}" = "--torch-plan" ]; then
  torch_plan "${PYTHON:-python3}"
  exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
need_apt=()
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
python3 -m venv --help >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip setuptools wheel

torch_installed() {
  .venv/bin/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null
}
if torch_installed; then
  how="already installed"
else
  case "$(torch_plan .venv/bin/python)" in
    cuda)
      .venv/bin/pip install -q "torch==$TORCH_VERSION"
      how="an NVIDIA GPU is present: the CUDA build from PyPI" ;;
    cpu-index)
      .venv/bin/pip install -q --timeout 15 --retries 1 --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"
      how="no NVIDIA GPU: the CPU-only build from $TORCH_CPU_INDEX" ;;
    *)
      .venv/bin/pip install -q "torch==$TORCH_VERSION"
      how="no NVIDIA GPU, $TORCH_CPU_INDEX unreachable: from pip's configured indexes" ;;
  esac
fi
build=$(.venv/bin/python -c "import torch; print(torch.__version__, '(CUDA ' + torch.version.cuda + ' build)' if torch.version.cuda else '(CPU build)')")
echo "torch: $build; $how"

.venv/bin/pip install -q -e ".[all]"
echo "modelgw is set up: run the tests with  .venv/bin/python -m pytest"
echo "and modelgw itself as  .venv/bin/modelgw  (or after  source .venv/bin/activate  as  modelgw)"
