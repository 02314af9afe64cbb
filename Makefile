# Set-up, provisioning the virtual Pi, the local demo, tests and lint. Everything lives in .venv; pip's wheel cache keeps
# llama-cpp-python (an ~8 minute build) from being rebuilt once it has been built once.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup debian-packages run demo test lint clean virtual-pi virtual-pi-ssh virtual-pi-down

setup: debian-packages $(STAMP)

# Cheap when nothing is missing: a dpkg query per package.
debian-packages:
	scripts/install-debian-packages

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,control]'
	touch $@

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
