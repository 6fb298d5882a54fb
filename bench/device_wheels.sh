#!/usr/bin/env bash
# Downloads, on this machine, the wheels a GPU device machine lacks (it has torch/triton/transformers but no
# network, no pydantic, aiohttp or xgrammar) into .carry/wheels (git-ignored): name `.carry` in the device
# run's `carry`, then `source bench/device_setup.sh` first in the device command. Python 3.12, x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .carry/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  -d .carry/wheels \
  pydantic pydantic-core annotated-types typing-inspection "xgrammar>=0.2.9,<0.3" apache-tvm-ffi \
  partial-json-parser aiohttp aiosignal frozenlist multidict yarl propcache attrs aiohappyeyeballs \
  prometheus-client jsonschema jsonschema-specifications referencing rpds-py pytest pytest-asyncio pytest-timeout \
  iniconfig pluggy pyyaml gguf ninja pyzmq msgspec
# the OpenAI SDK (tests/unit's conftest imports it) with whatever its current release depends on (httpx2, ...)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  -d .carry/wheels openai
du -sh .carry/wheels
