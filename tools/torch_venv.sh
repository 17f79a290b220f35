# Sourced by the tools/*_env.sh scripts: the first steps every venv of this project takes.
#
#   torch_venv DIR    create DIR (a venv) if missing, upgrade pip, install torch alone (TORCH_SPEC, default
#                     the 2.13.0 CPU build, found through PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL), and set
#                       py           DIR/bin/python
#                       constraints  a temporary pip constraints file pinning that torch (removed on exit)
#
# Why torch first and pinned: the packages installed next ask for "torch" (or a newer one); with no
# torch present, or without the pin, pip resolves a CUDA build plus ~20 nvidia wheels (several GB).
torch_venv() {
    local dir=$1
    [ -x "$dir/bin/python" ] || "${PYTHON:-python3}" -m venv "$dir"
    py=$dir/bin/python
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    "$py" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
}
