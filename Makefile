# The two front-door commands: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-image lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/safeguard dev

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not image"

# The OCI image built from Debian's packages and run (minutes; skipped without buildah).
test-image: $(STAMP)
	$(BIN)/python -m pytest -q -m image tests/integration/test_image.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/referral.py
	$(BIN)/python bench/checkin.py
	$(BIN)/python bench/doctor.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
