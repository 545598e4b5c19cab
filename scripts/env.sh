# Sourced by every script of the project: the Python and CUDA toolkit it builds and runs with.
#   Python: $EXPERTWIRE_PYTHON if set; else the active virtual environment (VIRTUAL_ENV, CONDA_PREFIX, or a
#   python3 on PATH that runs inside one); else the project's own .venv (scripts/install_deps.sh creates it).
#   Its folder goes first on PATH, so `python3` and CMake's Python search find that interpreter.
#   CUDA: nvcc from PATH, else from $CUDA_HOME/bin (default /usr/local/cuda/bin), which is then added to PATH.
EW_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

ew_pick_python() {
  if [ -n "${EXPERTWIRE_PYTHON:-}" ]; then
    EW_PYTHON=$EXPERTWIRE_PYTHON
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python3" ]; then
    EW_PYTHON=$VIRTUAL_ENV/bin/python3
  elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python3" ]; then
    EW_PYTHON=$CONDA_PREFIX/bin/python3
  elif command -v python3 >/dev/null && python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then
    EW_PYTHON=$(python3 -c 'import sys; print(sys.executable)')
  else
    EW_PYTHON=$EW_ROOT/.venv/bin/python3
  fi
  export EW_PYTHON
  local bin
  bin=$(dirname "$EW_PYTHON")
  case ":$PATH:" in *":$bin:"*) ;; *) export PATH="$bin:$PATH" ;; esac
  # CMake's FindPython prefers the environment VIRTUAL_ENV names.
  if [ -f "$bin/../pyvenv.cfg" ]; then export VIRTUAL_ENV=$(cd "$bin/.." && pwd); fi
}

ew_find_cuda() {
  local home=${CUDA_HOME:-/usr/local/cuda}
  if ! command -v nvcc >/dev/null && [ -x "$home/bin/nvcc" ]; then export PATH="$home/bin:$PATH"; fi
}

ew_pick_python
ew_find_cuda
