# Sourced first in a GPU device command: the wheels bench/device_wheels.sh carried, unpacked onto PYTHONPATH
# (nothing is installed there). The repo root must NOT go on PYTHONPATH: its operator/ would shadow the
# standard library's `operator` at interpreter start; pytest and the bench scripts add the root themselves.
mkdir -p /tmp/pylib
python3 -c 'import glob, zipfile; [zipfile.ZipFile(w).extractall("/tmp/pylib") for w in glob.glob(".carry/wheels/*.whl")]'
export PYTHONPATH=/tmp/pylib PYTHONUNBUFFERED=1 PATH=/tmp/pylib/bin:$PATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers, xgrammar, pydantic, aiohttp; print(torch.__version__, triton.__version__, transformers.__version__)"
