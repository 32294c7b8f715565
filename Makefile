# Everything runs from a local virtual environment built from nothing by `make setup`.
# Pick another torch build with e.g. `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
UM         := $(VENV)/bin/ultramem
SWEEP      ?= sweeps/tiny_cpu.yaml
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint format demo plots bench study results clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,peers]"
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# The main job: a small real sweep of dense / MoE / UltraMem on the embedded corpus, through Ray, ending in plots.
demo: setup
	$(UM) sweep run $(SWEEP)
	$(UM) plots $(SWEEP)

plots: setup
	$(UM) plots $(SWEEP)

# The committed study (docs/results/): three sweeps, ~3 h on 2 cores, then each report into docs/results/<sweep>/.
# study_knowledge has one seed that trained late (docs/results/README.md), so its laws are fitted robustly.
STUDY := study_shakespeare study_knowledge study_memory
PLOTS_study_knowledge := --solver huber
study: setup
	for s in $(STUDY); do $(UM) sweep run sweeps/$$s.yaml || exit 1; done
	$(foreach s,$(STUDY),$(UM) plots sweeps/$(s).yaml --out docs/results/$(s) $(PLOTS_$(s)) &&) true

# Regenerate the committed figures and reports from the committed tables (byte-identical).
results: setup
	$(foreach s,$(STUDY),$(UM) plots docs/results/$(s)/runs.csv $(PLOTS_$(s)) &&) true

bench: setup
	$(UM) bench layers
	$(UM) bench inference
	$(UM) bench throughput

clean:
	rm -rf runs .pytest_cache .ruff_cache
