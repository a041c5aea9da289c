# make demo: set up .venv and train the embedded tiny FIBO base on the sample dataset (CPU is fine);
#            make demo VERSION=3.2 / VERSION=2.3 does the same for a legacy family.
# make serve: the HTTP service on the tiny FIBO base at http://127.0.0.1:8000 (docs at /docs, the web
#             console at /console).
# make test: set up .venv and run the whole test suite (what CI runs through .ci/run), the service tests on
#            SQLite and again on a throwaway PostgreSQL (skipped where its binaries are missing); it installs
#            Debian's chromium with apt-get when missing, for the web console's browser tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build is enough for the tiny models; GPU machines install their own torch first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

VERSION ?= fibo
ifeq ($(filter fibo 3.2 2.3,$(VERSION)),)
$(error VERSION must be fibo, 3.2 or 2.3, not $(VERSION))
endif
ifeq ($(VERSION),fibo)
FAMILY := fibo
DEMO_OUT := runs/demo
DEMO_DATA := --dataset tailoredgen_train/data/sample_dataset
else
FAMILY := bria-$(VERSION)
DEMO_OUT := runs/demo-$(VERSION)
# legacy captions are plain text that continues the dataset's caption prefix
DEMO_DATA := --dataset tailoredgen_train/data/sample_dataset_text --caption-prefix "A minimalist flat illustration of"
endif

.PHONY: setup browser demo serve test bench-tiny clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[service,test]"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	$(PY) -m tailoredgen_train make-tiny-base --family $(FAMILY) runs/tiny-$(FAMILY)-base
	$(PY) -m tailoredgen_train train \
		--base runs/tiny-$(FAMILY)-base \
		$(DEMO_DATA) \
		--output $(DEMO_OUT) \
		--training-version $(VERSION) --training-mode expert \
		--total-training-steps 200 --checkpoint-interval 100 \
		--config configs/$(FAMILY)-tiny.yaml

# the HTTP service on the tiny FIBO base, with the tiny captioning VLM (see README, "The HTTP service");
# set TAILOREDGEN_API_TOKENS
serve: $(STAMP)
	$(PY) -m tailoredgen_train make-tiny-base --family fibo runs/tiny-fibo-base
	$(PY) -m tailoredgen_train make-tiny-base --family fibo-vlm runs/tiny-fibo-vlm
	TAILOREDGEN_API_TOKENS=$${TAILOREDGEN_API_TOKENS:-dev-token-change-me} $(PY) -m tailoredgen_train serve \
		--data-dir runs/service --base fibo=runs/tiny-fibo-base --engine-config fibo=configs/fibo-tiny.yaml \
		--generation-resolution fibo=128 --vlm runs/tiny-fibo-vlm --vlm-string-tokens 8 --vlm-max-pixels 16384

# the console's browser tests drive Debian's chromium through Playwright (whose own browser download
# does not work on these machines); without it they are skipped and say why
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; } \
		|| echo "warning: chromium could not be installed (apt-get install -y chromium); the browser tests will be skipped"

# two workers, one per core, each file on one worker (its module fixtures are built once); one
# intra-op thread each, so the workers' tiny models do not fight over the cores
test: $(STAMP) browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=25

# the engine's step against Bria's recipe on the tiny base (CPU); --size full on a GPU (docs/PERFORMANCE.md)
bench-tiny: $(STAMP)
	$(PY) scripts/bench.py --size tiny --recipe both

clean:
	rm -rf runs .pytest_cache
