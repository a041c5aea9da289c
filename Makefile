# make demo: set up .venv and train the embedded tiny FIBO base on the sample dataset (CPU is fine).
# make test: set up .venv and run the whole test suite (what CI runs through .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build is enough for the tiny models; GPU machines install their own torch first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench-tiny clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(PY) -m tailoredgen_train make-tiny-base --family fibo runs/tiny-fibo-base
	$(PY) -m tailoredgen_train train \
		--base runs/tiny-fibo-base \
		--dataset tailoredgen_train/data/sample_dataset \
		--output runs/demo \
		--training-version fibo --training-mode expert \
		--total-training-steps 200 --checkpoint-interval 100 \
		--config configs/fibo-tiny.yaml

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
