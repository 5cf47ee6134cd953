# optlab: two commands on a fresh machine.
#   make repro   create .venv from requirements.lock, then `dvc repro` (scale: quick, offline, CPU), with the
#                training stages run side by side (python -m optlab.repro; plain `dvc repro` gives the same result)
#   make repro-cpu  the cpu profile (profiles/cpu/dvc.yaml: MNIST and FashionMNIST MLPs to depth 300, about an hour
#                on 2 cores; its results go to reports/cpu/ and README's cpu section). make repro never runs it
#   make test    create .venv, then run the tests
#   make bench   performance comparisons in benchmarks/ (ratios against a peer measured in the same run), then
#                reports/benchmarks.md and .csv: the machine and every goal of issue #14 (python -m benchmarks.report)
#   make gpu-check  on a machine with one CUDA GPU: GPU benchmarks, the 10,000 x 256 MLP and a short full-size run of
#                every study within 10 minutes -> reports/gpu/<gpu-name>.md (needs only python3 with torch)
#   make exps    the experiments table: headline params and metrics (dvc exp show without dependency hashes)
#   make screenshots  dvc plots show and the MLflow UI in headless Chromium -> reports/ui/*.png

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.optlab-installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv repro repro-cpu test test-fast bench gpu-check exps screenshots lock mlflow-ui clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

repro: venv
	$(BIN)/python -m optlab.repro $(REPRO_ARGS)

repro-cpu: venv
	$(BIN)/dvc repro profiles/cpu/dvc.yaml

test: venv
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

bench: venv
	$(BIN)/python -m benchmarks
	$(BIN)/python -m benchmarks.memory --depth 1000 --peer
	$(BIN)/python -m benchmarks.rho
	$(BIN)/python -m benchmarks.muon --threads 1
	$(BIN)/python -m benchmarks.sgd_sn --threads 1 --repeats 9 --repeats-deep 5
	$(BIN)/python -m benchmarks.storage --threads 1
	$(BIN)/python -m benchmarks.repro_time
	$(BIN)/python -m benchmarks.report

# The prepared GPU check, for a lent machine with one CUDA GPU (it needs no .venv: that machine's own
# python3 with torch; the study runs also need pydantic and PyYAML). Runs the GPU benchmarks, the
# 10,000 x 256 MLP steps and a short full-scale run of every study within a 540 s budget (the whole
# command ends within 10 minutes), and writes reports/gpu/<gpu-name>.md and .json for committing.
# The CPU smoke run of the same code: python -m benchmarks.gpu_check --tiny (tests/test_gpu_check.py).
gpu-check:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m benchmarks.gpu_check --device cuda $(GPU_CHECK_ARGS)

# `dvc exp show` lists a column per dependency hash (about 165); this keeps what tells experiments apart.
EXP_COLUMNS := ^(Experiment|Created|diverged|test_acc|test_loss|val_acc|train_loss|steps|wall_time_s|scale|phase|optimizer|lr|arch|dataset|depth|width|activation|init|epochs|batch_size|seed)$$
exps: venv
	$(BIN)/dvc exp show --drop '.*' --keep '$(EXP_COLUMNS)' $(EXPS_ARGS)

# The MLflow UI on loopback only (first uploading any runs still waiting in the tracking spool).
mlflow-ui: venv
	-$(BIN)/python -m optlab.tracking sync
	@echo "optlab: open $$($(BIN)/python -m optlab.tracking url) (the runs table; the UI's own start page opens experiments on GenAI)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000

screenshots: venv
	-$(BIN)/python -m optlab.tracking sync
	$(BIN)/python -m optlab.screenshots

lock: venv
	(echo "# Exact pins for optlab's environment (Python 3.11, x86_64). Regenerate: make lock"; \
	 $(BIN)/pip freeze --exclude-editable | grep -vi '^optlab') > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
