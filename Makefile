# Set-up on a fresh machine is two commands: `make demo` and `make test` (see README.md).
VENV   ?= .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
DEMO   := runs/demo

.PHONY: install demo test lint clean-demo bench-bert bench-fmnist bench-recovery checkpoints

install: $(VENV)/.installed

# torch is installed first, pinned: the CPU wheel of 2.13.0 is on disk here, and an unpinned torch
# would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	@test -f $(FMNIST)/train-images-idx3-ubyte.gz || { \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || \
	  { echo "could not install dataset-fashion-mnist (needs root and Debian's registry)"; exit 1; }; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# Train LeNet-5 on Fashion-MNIST (3 epochs, ~15 s), prune it to half its channels with i-SpaSP and PFP (the
# default pipeline: selection, least-squares refit, BatchNorm recalibration), print dense vs pruned accuracy,
# params, MACs and latency, then the side-by-side table: Torch-Pruning's MagnitudePruner and structprune's
# magnitude, i-SpaSP and PFP, each without and with the default recovery (benchmarks/demo.py).
demo: install
	@mkdir -p $(DEMO)
	@test -f $(DEMO)/lenet5.pt || $(VENV)/bin/structprune train --model lenet5 --epochs 3 --out $(DEMO)/lenet5.pt
	@for m in ispasp pfp; do \
	  test -f $(DEMO)/lenet5-$$m.pt || $(VENV)/bin/structprune prune $(DEMO)/lenet5.pt --method $$m --ratio 0.5 \
	    --out $(DEMO)/lenet5-$$m.pt || exit 1; \
	done
	@echo; echo "LeNet-5 on Fashion-MNIST, every group pruned to 50% of its channels (no fine-tuning):"
	@$(VENV)/bin/structprune eval $(DEMO)/lenet5.pt $(DEMO)/lenet5-ispasp.pt $(DEMO)/lenet5-pfp.pt \
	  --json $(DEMO)/eval.json --force
	@echo; $(PY) benchmarks/demo.py $(DEMO)/lenet5.pt --out $(DEMO)/table
	@echo "reports: $(DEMO)/*.json (rerun from scratch: make clean-demo demo)"

# every test must run (none skipped), and the slowest 15 are listed
test: install
	STRUCTPRUNE_NO_SKIPS=1 $(PY) -m pytest -rs --durations=15

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

# The BERT benchmark (benchmarks/README.md): all-MiniLM-L6-v2 from PyPI, text from Debian's fortunes.
bench-bert: install
	@test -d /usr/share/games/fortunes || (apt-get update -qq && apt-get install -y -qq fortunes) >/dev/null
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) benchmarks/bert.py --out-dir benchmarks/results

# Fashion-MNIST (benchmarks/README.md): the 7 methods (+ i-SpaSP/PFP with refit) and Torch-Pruning's
# magnitude/Taylor/BN-scale/LAMP on the committed LeNet-300-100, LeNet-5 and ResNet-20 checkpoints (~40 min).
bench-fmnist: install
	$(PY) benchmarks/fmnist.py --out-dir benchmarks/results

# Post-training pruning with the default pipeline vs the bare step and Torch-Pruning (benchmarks/README.md; ~2 h).
bench-recovery: install
	cd benchmarks && ../$(PY) recovery.py --out-dir results --finetune
	cd benchmarks && ../$(PY) recovery.py --out-dir results --models "" --timing

# Retrain the checkpoints the Fashion-MNIST benchmarks use (~2 h on 2 cores; benchmarks/checkpoints/README.md).
checkpoints: install
	$(VENV)/bin/structprune train --model lenet300 --epochs 20 --seed 0 --out benchmarks/checkpoints/lenet300-fmnist.pt --force
	$(VENV)/bin/structprune train --model lenet5 --epochs 20 --seed 0 --out benchmarks/checkpoints/lenet5-fmnist.pt --force
	$(VENV)/bin/structprune train --model resnet20 --epochs 15 --seed 0 --out benchmarks/checkpoints/resnet20-fmnist.pt --force
	$(VENV)/bin/structprune train --model resnet56 --epochs 8 --seed 0 --out benchmarks/checkpoints/resnet56-fmnist.pt --force
	$(VENV)/bin/structprune train --model vgg16 --width-mult 0.5 --epochs 5 --seed 0 \
	  --out benchmarks/checkpoints/vgg16-fmnist.pt --force

clean-demo:
	rm -rf $(DEMO)
