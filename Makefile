# The README's two commands: `make demo` (the main job, end to end, offline) and `make test`.
# Both create .venv in the repo on first use; every pip call carries constraints.txt so that
# torch stays at the CPU wheel on the machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install -c constraints.txt
STAMP   := $(VENV)/.installed

.PHONY: demo test lint bench clean-venv
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[train,dev]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pertvl demo

test: $(STAMP)
	$(BIN)/ruff check pertvl tests bench examples
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Every benchmark in turn (each prints both sides of its comparison and exits non-zero when its
# target is missed); BENCH_FLAGS=--quick for a short run. Run on an otherwise idle machine.
# Exit code 77 is a skip (bench_gpu.py without CUDA), not a failure.
BENCHES := phantom perturb loader local_loss step train onnx mimic gpu
bench: $(STAMP)
	@status=0; for b in $(BENCHES); do echo "== bench/bench_$$b.py $(BENCH_FLAGS)"; \
	  HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_$$b.py $(BENCH_FLAGS); rc=$$?; \
	  if [ $$rc -ne 0 ] && [ $$rc -ne 77 ]; then status=1; fi; done; exit $$status

clean-venv:
	rm -rf $(VENV)
