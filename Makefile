# The two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv on first use from the pinned requirements (requirements.txt: what runs; requirements-dev.txt:
# that plus the test and lint tools, for `make test`) and reuse it afterwards.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint format install clean-venv worker web system-packages gpu-wheels gpu-check

# make demo SIMULATE=40 also sends 40 simulated raters and writes the report; FOIL_DEMO_BUDGET=tiny for a quick look.
SIMULATE ?= 0
demo: $(STAMP) system-packages
	$(PY) manage.py demo --simulate $(SIMULATE)

test: $(DEV_STAMP) system-packages
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

install: $(STAMP)

# Reinstalled only when requirements.txt changes; a second run takes seconds.
$(STAMP): requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "Foil needs Python 3.11 ($(PYTHON) not found). Install it, or run: make PYTHON=/path/to/python3.11"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "$(PYTHON) is not Python 3.11; run: make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(DEV_STAMP)

# Debian packages: the embedded default data set, docker-compose (checks docker-compose.yml), and Chromium with
# its driver for the browser tests (Playwright drives /usr/bin/chromium; `playwright install` cannot download here).
DEBIAN_PACKAGES := dataset-fashion-mnist docker-compose chromium chromium-driver
system-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian packages: $$missing"; \
	    apt-get install -y -q $$missing >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null; } \
	      || { echo "apt-get could not install: $$missing"; exit 1; }; \
	  else \
	    echo "Missing Debian packages: $$missing. Run: sudo apt-get install -y $$missing"; exit 1; \
	  fi; \
	fi

lint: $(DEV_STAMP)
	$(PY) -m ruff check .

format: $(DEV_STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The development server with DEBUG on (auto-reload, debug pages); `make demo` serves like a server instead.
web: $(STAMP)
	DJANGO_DEBUG=1 $(PY) manage.py runserver 127.0.0.1:8000

worker: $(STAMP)
	$(VENV)/bin/celery -A config.celery_app worker -Q explain,default --pool=solo --loglevel=info

clean-venv:
	rm -rf $(VENV)

# The GPU check (bench/gpu/run.py): `make gpu-wheels` here once (it needs the network), then carry var/gpu-wheels
# with the tree to a bare GPU machine and run `make gpu-check` there (its tables land in $(GPU_OUT)).
GPU_WHEELS := var/gpu-wheels
GPU_PYTHON ?= python3
GPU_OUT ?= $(if $(OUT),$(OUT),var/gpu-check)
gpu-wheels: $(STAMP) system-packages
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d $(GPU_WHEELS) -r bench/gpu/requirements.txt
	mkdir -p $(GPU_WHEELS)/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz $(GPU_WHEELS)/fashion-mnist/
	du -sh $(GPU_WHEELS)

gpu-check:
	$(GPU_PYTHON) bench/gpu/run.py --out $(GPU_OUT)
