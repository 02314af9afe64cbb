# Set-up, provisioning the virtual Pi, the local demo, tests and lint. Everything lives in .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# llama-cpp-python compiles llama.cpp (~10 minutes), so its wheel is kept between checkouts, in a
# directory named by its version and build flags. Not pip's wheel cache: that keys on the version
# alone and hands back a build made with -march=native on whatever CPU built it first. Such a
# build crashed here when the machine came back with AMX (SIGSEGV in ggml_backend_amx_mul_mat on
# the first prompt) and would stop with SIGILL on a CPU without the builder's AVX-512. On x86-64
# the build is portable (AVX2, FMA, F16C); elsewhere llama.cpp's defaults.
LLAMA_CPP_PYTHON := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
WHEEL_CACHE      := $(or $(VIRTUAL_PI_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/pi-llm-appliance)
LLAMA_WHEELS     := $(WHEEL_CACHE)/llama-cpp-python-$(LLAMA_CPP_PYTHON)-$(shell echo '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

.PHONY: setup debian-packages run demo test lint clean virtual-pi virtual-pi-ssh virtual-pi-down

setup: debian-packages $(STAMP)

# Cheap when nothing is missing: a dpkg query per package.
debian-packages:
	scripts/install-debian-packages

$(STAMP): pyproject.toml constraints.txt $(LLAMA_WHEELS)/.built
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps --force-reinstall --no-index --find-links $(LLAMA_WHEELS) \
		llama-cpp-python==$(LLAMA_CPP_PYTHON)  # replaces a build an older venv got from pip's cache
	$(PY) -m pip install --quiet -c constraints.txt --find-links $(LLAMA_WHEELS) -e '.[test,control]'
	touch $@

# Built beside its final name and renamed, so that an interrupted build is never taken for one.
$(LLAMA_WHEELS)/.built:
	rm -rf $(LLAMA_WHEELS).partial
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PYTHON) -m pip wheel --quiet --no-deps --no-cache-dir \
		--wheel-dir $(LLAMA_WHEELS).partial llama-cpp-python==$(LLAMA_CPP_PYTHON)
	touch $(LLAMA_WHEELS).partial/.built
	rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).partial $(LLAMA_WHEELS)

## run: boot the virtual Pi 5, provision it with `ansible-playbook site.yml`, show its health
run: setup
	$(PY) testbed/virtual-pi up
	$(PY) testbed/virtual-pi inventory 0 > inventory/virtual-pi.yml
	$(VENV)/bin/ansible-playbook site.yml -i inventory/virtual-pi.yml
	$(PY) testbed/virtual-pi ssh --root -- /opt/pi-llm-appliance/venv/bin/pi-appliance health

## demo: serve the bundled small model on this machine (no Pi) and show a completion
demo: setup
	$(VENV)/bin/python scripts/demo.py

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check appliance tests scripts benchmarks testbed

## virtual-pi: boot a virtual Raspberry Pi 5 on this machine (as root; see testbed/README.md)
virtual-pi:
	testbed/virtual-pi up

virtual-pi-ssh:
	testbed/virtual-pi ssh

virtual-pi-down:
	testbed/virtual-pi down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
