# The two front-door commands: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The message catalogues, compiled from their .po files (bot/texts/catalogues.py).
CATALOGUES := $(patsubst %.po,%.mo,$(wildcard bot/texts/locale/*/LC_MESSAGES/*.po))

.PHONY: all run test test-image lint bench clean messages

# `make` alone: the virtualenv and the compiled catalogues.
all: $(STAMP) $(CATALOGUES)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

%.mo: %.po $(STAMP)
	$(BIN)/python -m bot.texts.catalogue_tool compile $< $@

# After changing a text in the code: the .pot and every .po brought in step (then translate).
messages: $(STAMP)
	$(BIN)/python -m bot.texts.catalogue_tool update

run: $(STAMP) $(CATALOGUES)
	$(BIN)/safeguard dev

# Three workers on two cores: the integration tests mostly wait on Synapse (about 1.2
# cores busy with two workers), so a third brings the suite from ~15 to ~10 minutes.
test: $(STAMP) $(CATALOGUES)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 3 --dist loadfile -m "not image"

# The OCI image built from Debian's packages and run (minutes; skipped without buildah).
test-image: $(STAMP) $(CATALOGUES)
	$(BIN)/python -m pytest -q -m image tests/integration/test_image.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP) $(CATALOGUES)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/referral.py
	$(BIN)/python bench/checkin.py
	$(BIN)/python bench/doctor.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
