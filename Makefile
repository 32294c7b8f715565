# Everything runs from a local virtual environment built from nothing by `make setup`.
# Pick another torch build with e.g. `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
UM         := $(VENV)/bin/ultramem
SWEEP      ?= sweeps/tiny_cpu.yaml
PYTEST_ARGS ?=

.PHONY: gpu-check setup test test-fast lint format demo plots bench study study-part study-v3-part study-v1 results clean

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
# It shows live progress (runs, FLOPs, ETA, the running runs): redrawn on a terminal, else a line every 30 s.
demo: setup
	$(UM) sweep run $(SWEEP)
	$(UM) plots $(SWEEP)

plots: setup
	$(UM) plots $(SWEEP)

# The headline study (docs/results/study_isoflop_v2/, issue 14): an IsoFLOP grid of dense / MoE / UltraMem on
# tinyshakespeare, 288 runs in three parts of one seed each (~28 min each on 2 cores through Ray; a re-run skips
# what is finished), then its report. `make study-part SEED=1` runs one part; STUDY_SWEEP=study_isoflop rebuilds
# the first design (batch by model size, docs/results/study_isoflop/).
STUDY_SWEEP ?= study_isoflop_v2
SEED ?= 0
study: setup
	for s in 0 1 2; do $(UM) sweep run sweeps/$(STUDY_SWEEP).yaml --seeds $$s || exit 1; done
	$(UM) plots sweeps/$(STUDY_SWEEP).yaml --out docs/results/$(STUDY_SWEEP)

study-part: setup
	$(UM) sweep run sweeps/$(STUDY_SWEEP).yaml --seeds $(SEED)

# Study v3 (issue 27, docs/results/study_v3/) is trained over several sessions: a part trains only the runs of its
# seed that the committed table lacks (`--done`), then the report is rebuilt from that table merged with the new
# run folders. `make study-v3-part SEED=1`, then commit docs/results/study_v3. (`make study STUDY_SWEEP=study_v3`
# trains all of it from nothing on one machine.)
V3 := docs/results/study_v3
study-v3-part: setup
	$(UM) sweep run sweeps/study_v3.yaml --seeds $(SEED) --done $(V3)/runs.csv
	$(UM) plots $(V3)/runs.csv sweeps/study_v3.yaml --out $(V3)

# The first studies (docs/results/study_{shakespeare,knowledge,memory}/; every run at one token budget, history):
# three sweeps, ~1.5 h on 2 cores. study_knowledge has one seed that trained late, so its laws are fitted robustly.
STUDY_V1 := study_shakespeare study_knowledge study_memory
PLOTS_study_knowledge := --solver huber
study-v1: setup
	for s in $(STUDY_V1); do $(UM) sweep run sweeps/$$s.yaml || exit 1; done
	$(foreach s,$(STUDY_V1),$(UM) plots sweeps/$(s).yaml --out docs/results/$(s) $(PLOTS_$(s)) &&) true

# Regenerate the committed figures and reports from the committed tables (byte-identical).
STUDY := study_v3 study_isoflop_v2 study_isoflop $(STUDY_V1)
results: setup
	$(foreach s,$(STUDY),$(UM) plots docs/results/$(s)/runs.csv $(PLOTS_$(s)) &&) true
	$(UM) hparams docs/results/hparams/runs.csv
	$(UM) hparams docs/results/hparams/footing/runs.csv

# One NVIDIA GPU, <= 8 min: pytest -m gpu, Triton vs torch (fp32/bf16), training tokens/s + MFU + peak memory of
# the 151M/227M presets, decode latency vs batch -> benchmarks/results/gpu_check.json (docs/performance.md).
# Without CUDA it prints what it skipped and exits 0.
gpu-check: setup
	$(PY) -m benchmarks.gpu_check

bench: setup
	$(UM) bench layers
	$(UM) bench inference
	$(UM) bench throughput

clean:
	rm -rf runs .pytest_cache .ruff_cache
