# Two commands for a newcomer: `make demo` (the main job on the embedded default) and
# `make test` (the test suite). Both create or reuse .venv (Python >= 3.12, the newest jax of the supported range).
# Python >= 3.12 for the newest jax (0.11 and later need it); python3 may be 3.11. The first
# that runs of: python3.12, python3.13, pyenv's builds. Override with `make PYTHON=/path/to/python`.
PYTHON ?= $(shell for p in python3.12 python3.13 $$HOME/.pyenv/versions/3.12*/bin/python3.12 \
	$$HOME/.pyenv/versions/3.13*/bin/python3.13; do if $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' \
	>/dev/null 2>&1; then echo $$p; break; fi; done)
# The other end of the supported range: Python 3.11, jax 0.10.2, live PyTorch parity.
PYTHON_OLDEST ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OLDEST := .venv-oldest
OUT    ?= out/demo
# What `make test-oldest` runs: every test file but the three task end-to-end files, whose code
# paths (the SD / CLIP / face / digits networks, sampling, schemes) the others cover on this end
# and `make test` covers whole on the newest one.
OLDEST_TESTS ?= tests --ignore=tests/tasks/test_digits.py --ignore=tests/tasks/test_text_style.py \
	--ignore=tests/tasks/test_face.py
# MTCNN's real ONet weights ship in the facenet-pytorch wheel; its own pins (torch<2.3, numpy<2)
# are not needed to read them (the library reads the file without torch), so no dependencies.
FACENET := facenet-pytorch==2.6.0

.PHONY: demo test test-oldest bench clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: needs Python >= 3.12 (python3.12 or python3.13 not found); install one or run make PYTHON=/path/to/python3.12" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' || { echo "make: $(VENV) was made with a Python older than 3.12; remove it (rm -rf $(VENV)) and run make again" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps $(FACENET)
	$(BIN)/python -m pip install --quiet pydensecrf2==1.1 || echo "make: pydensecrf2 did not build (it needs a C++ compiler); tests/test_crf.py will skip its dense-CRF reference comparison"
	touch $(STAMP)

$(OLDEST)/.installed: pyproject.toml constraints/oldest.txt
	test -x $(OLDEST)/bin/python || $(PYTHON_OLDEST) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST)/bin/python -m pip install --quiet -c constraints/oldest.txt -e ".[test,parity]"
	$(OLDEST)/bin/python -m pip install --quiet --no-deps $(FACENET)
	$(OLDEST)/bin/python -m pip install --quiet pydensecrf2==1.1 || echo "make: pydensecrf2 did not build (it needs a C++ compiler); tests/test_crf.py will skip its dense-CRF reference comparison"
	touch $(OLDEST)/.installed

demo: $(STAMP)
	$(BIN)/zmagic demo --out $(OUT) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

# The oldest supported stack with the PyTorch references installed: every live parity test runs.
test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -q -n 2 --dist loadgroup $(OLDEST_TESTS)

bench: $(STAMP)
	$(BIN)/python experiments/bench_schemes.py --out experiments/results/bench_schemes.json

clean:
	rm -rf $(VENV) $(OLDEST) out
