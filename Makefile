# One command each: `make lab` opens the chapters, `make test` runs every test
# and every chapter notebook. Both create .venv and install what is needed, at
# the exact versions in constraints.txt (the ones the notebooks were run with).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: lab test unit notebooks clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# LAB_ARGS: more options for JupyterLab, e.g. make lab LAB_ARGS="--no-browser --port=8899".
# As root (a container), JupyterLab refuses to start without --allow-root.
lab: $(STAMP)
	$(BIN)/jupyter lab chapters/ $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# TEST_JOBS test processes (pytest-xdist), a whole notebook or test file in one of them.
TEST_JOBS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile

unit: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile tests

notebooks: $(STAMP)
	$(BIN)/python -m pytest chapters

clean:
	rm -rf $(VENV) data/processed
