# Two commands: `make demo` and `make test`. Both create .venv and install edgec with its
# toolchain on first use; a stamp file keeps later runs fast.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
EXAMPLE := examples/shapes-clip
PYTEST_ARGS ?=

.PHONY: install demo test bench bench-quantize bench-distill bench-breadth bench-real teacher clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[compile,dev]'
	touch $(STAMP)

install: $(STAMP)

# The example end to end: data, teacher check, golden outputs, distil + compile for the CPU,
# verify against the golden set, HTML report. The first run distils the student (about 10 min
# on 2 cores); later runs reuse it.
demo: $(STAMP)
	$(BIN)/python $(EXAMPLE)/make_data.py
	$(BIN)/python $(EXAMPLE)/evaluate.py
	cd $(EXAMPLE) && ../../$(BIN)/edgec inspect
	cd $(EXAMPLE) && ../../$(BIN)/edgec golden
	cd $(EXAMPLE) && ../../$(BIN)/edgec compile --target cpu
	cd $(EXAMPLE) && ../../$(BIN)/edgec verify build/cpu
	cd $(EXAMPLE) && ../../$(BIN)/edgec bench build/cpu --runs 30 --teacher edgec.toml
	cd $(EXAMPLE) && ../../$(BIN)/edgec report build/cpu --html build/report.html

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Speed and size live here, not in timed tests: rebuild the example's cpu target, time it and the
# teacher, and rewrite BENCHMARKS.md.
BENCH_TARGETS := cpu jetson edgetpu android-tflite android ios
bench: $(STAMP)
	$(BIN)/python $(EXAMPLE)/make_data.py
	cd $(EXAMPLE) && ../../$(BIN)/edgec golden
	cd $(EXAMPLE) && ../../$(BIN)/edgec compile --target all
	cd $(EXAMPLE) && for t in $(BENCH_TARGETS); do ../../$(BIN)/edgec verify build/$$t || exit 1; done
	cd $(EXAMPLE) && for t in $(BENCH_TARGETS); do ../../$(BIN)/edgec bench build/$$t --runs 100 --warmup 20 --teacher edgec.toml || exit 1; done
	cd $(EXAMPLE) && ../../$(BIN)/edgec report $(addprefix build/,$(BENCH_TARGETS)) --html build/report.html --benchmarks ../../BENCHMARKS.md

# Each backend's default int8 flow vs edgec's (every calibration method), same student and calibration
# images, each artifact run in its runtime; replaces the quantization section of BENCHMARKS.md (make bench keeps it).
# Real-size random-init teachers (open_clip ViT-B-16/B-32, CLIPConfig(), SiglipConfig(), open_clip RN50 and
# convnext_tiny), built locally, through inspect, golden, compile --no-distill and verify for every target;
# rewrites the breadth section of BENCHMARKS.md from the rows of this and earlier runs in its work folder (a run of
# some models/targets replaces only their cells; hours on 2 cores; BREADTH_ARGS='--models ... --targets ... --force').
BREADTH_ARGS ?=
bench-breadth: $(STAMP)
	$(BIN)/python -m edgec.benchmarks.breadth --benchmarks BENCHMARKS.md $(BREADTH_ARGS)

# Students at real resolution (224/256 px) against an open_clip ViT-B/16 tower, every target's fp32 and int8 in
# its runtime, 1 and 2 threads, alternated; workload in edgec/benchmarks/real.toml; writes the bench-real section
# (hours for the whole workload on 2 cores; REAL_ARGS='--students mobilevit_xxs --sizes 256 --targets cpu').
REAL_ARGS ?=
bench-real: $(STAMP)
	$(BIN)/python -m edgec.benchmarks.real --benchmarks BENCHMARKS.md $(REAL_ARGS)

bench-quantize: $(STAMP)
	$(BIN)/python $(EXAMPLE)/make_data.py
	cd $(EXAMPLE) && ../../$(BIN)/edgec quantize --compare --no-progress --benchmarks ../../BENCHMARKS.md

# Distillation's data path at dataset scale: synthetic 224-px JPEG sets of 2k and 20k images (generated
# under /tmp, as a folder and as WebDataset shards) through the teacher cache and training steps: peak RSS,
# images/s, the loader's share; replaces the distill-scale section of BENCHMARKS.md (~40 min on 2 busy cores).
# BENCH_DISTILL_ARGS="--sizes 200 --max-steps 3" for a smoke run.
BENCH_DISTILL_ARGS ?=
bench-distill: $(STAMP)
	$(BIN)/python -m edgec.benchmarks.distill --out BENCHMARKS.md $(BENCH_DISTILL_ARGS)

# Rebuild the example teacher from scratch (data + training); see examples/shapes-clip/README.md.
teacher: $(STAMP)
	$(BIN)/python $(EXAMPLE)/make_data.py
	$(BIN)/python $(EXAMPLE)/train_teacher.py

clean:
	rm -rf $(VENV) build $(EXAMPLE)/data
