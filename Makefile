# One command each: `make demo` installs moec and runs the quick-start; `make test` installs and runs the tests.
PYTHON ?= python3

.PHONY: install demo test test-large bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) examples/quickstart.py

test: install
	$(PYTHON) -m pytest -q

test-large: install
	HYPOTHESIS_PROFILE=large $(PYTHON) -m pytest -q
