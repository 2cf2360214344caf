# organixm developer entry points. Every target installs what it needs itself
# (Debian packages with apt-get, Python packages into .venv).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Debian packages the tests, the demo and the benchmarks use.
APT_PACKAGES := minisign nginx-light zstd curl e2fsprogs util-linux fdisk gdisk \
	grub-common grub-pc-bin grub-efi-amd64-bin grub-emu qemu-system-x86 ovmf \
	dosfstools mtools libsystemd-dev pkg-config gcc nix-bin zsh mmdebstrap strace

.PHONY: help deps venv lint typecheck nix-parse test faults e2e demo bench clean

help:
	@echo "make demo   publish a release to a local S3 server, let the daemon install and flip it"
	@echo "make test   install everything, then format check, lint, type check and the test suite"
	@echo "make faults the fault suite: the real daemon through network, device, crash and input faults"
	@echo "make e2e    a real Debian guest updates itself across reboots in QEMU (needs root)"
	@echo "make bench  run the benchmarks in bench/ (prints figures and reference ratios)"

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install: $$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: deps $(STAMP)

lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

typecheck: venv
	$(VENV)/bin/mypy organixmd organixctl
	$(VENV)/bin/mypy --config-file tests/mypy.ini tests bench

nix-parse: deps
	@set -e; files=$$(git ls-files --cached --others --exclude-standard '*.nix'); \
	for f in $$files; do nix-instantiate --parse "$$f" > /dev/null; done; \
	echo "nix-instantiate --parse: $$(echo $$files | wc -w) files ok"

test: venv lint typecheck nix-parse
	$(VENV)/bin/pytest -q --ignore=tests/faults --ignore=tests/e2e

faults: venv
	$(VENV)/bin/pytest -q tests/faults

# A real Debian guest in QEMU; the guest tree is cached in $$ORGANIXM_E2E_CACHE
# (default /var/cache/organixm-e2e).
e2e: venv
	$(VENV)/bin/pytest -q -s tests/e2e

demo: venv
	$(PY) -m tests.demo

bench: venv
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
