# Two commands: `make demo` and `make test`. Both create .venv and install edgec with its
# toolchain on first use; a stamp file keeps later runs fast.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
EXAMPLE := examples/shapes-clip
PYTEST_ARGS ?=

.PHONY: install demo test teacher clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[compile,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python $(EXAMPLE)/make_data.py --splits eval calibration
	$(BIN)/edgec inspect $(EXAMPLE)/teacher
	$(BIN)/python $(EXAMPLE)/evaluate.py

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Rebuild the example teacher from scratch (data + training); see examples/shapes-clip/README.md.
teacher: $(STAMP)
	$(BIN)/python $(EXAMPLE)/make_data.py
	$(BIN)/python $(EXAMPLE)/train_teacher.py

clean:
	rm -rf $(VENV) build $(EXAMPLE)/data
