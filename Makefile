# Two commands for a newcomer: `make demo` (the main job on the embedded default) and
# `make test` (the test suite). Both create or reuse .venv and install the pinned dependencies.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out/demo

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# MTCNN's real ONet weights ship in this wheel; its own pins (torch<2.3, numpy<2) are not
	# needed to read them, so it is installed without dependencies.
	$(BIN)/python -m pip install --quiet --no-deps facenet-pytorch==2.6.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zmagic demo --out $(OUT) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

bench: $(STAMP)
	$(BIN)/python experiments/bench_schemes.py --out experiments/results/bench_schemes.json

clean:
	rm -rf $(VENV) out
