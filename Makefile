# The two commands the README names:
#   make start   set everything up, build what is missing, serve vmcell on the default template
#   make test    set everything up, build what is missing, run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VMCELL := $(VENV)/bin/vmcell
# One source of truth for the host's Debian packages: interpreter/config.py.
DEBIAN_PACKAGES := $(shell $(PYTHON) -c 'from interpreter.config import DEBIAN_HOST_PACKAGES as p; print(*p)')
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system venv template start test bench doctor clean-run

setup: system venv

system:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

template: setup
	$(VMCELL) template build

start: template
	$(VMCELL) serve

test: template
	$(PY) -m pytest -q

bench: template
	$(VMCELL) bench create --runs 20

doctor: venv
	$(VMCELL) doctor
