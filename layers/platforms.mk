# Shared by the layer Makefiles: wheels for Lambda arm64 (Amazon Linux 2023, glibc 2.34), no Docker.
# The x86_64 twin (infra/artifacts.py) and the science smoke test set PLATFORMS for this machine.
PYTHON ?= python3.12
PLATFORMS ?= --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64
# Every version pinned by constraints.txt (`make lock-layers`): what CI built and ran is what `sam build` installs.
CONSTRAINTS := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))/constraints.txt
PIP_TARGET = $(PYTHON) -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-compile \
	$(PLATFORMS) --implementation cp --python-version 3.12 --only-binary=:all: -c $(CONSTRAINTS) --target
# /opt is read-only in Lambda: ship bytecode, valid whatever mtimes the zip round trip leaves.
# Paths in the bytecode are where Lambda mounts the layer, not the build folder: the same files from any checkout.
COMPILE = $(PYTHON) -m compileall -q -j 0 --invalidation-mode unchecked-hash -s "$(SITE)" -p /opt/python
