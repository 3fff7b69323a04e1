# Every target creates .venv itself on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-gpu venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (local wheel), pinned with torchvision so nothing pulls CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0 torchvision==0.28.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffkd demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# CPU benches, each printing one JSON line into bench/results/<bench>.json (sizes: see each --help);
# a subset: make bench BENCHES="ingest search"
BENCHES := data_feed train_overhead diffusion centers student search ablate ingest

# the student bench runs its footprint part: its distillation parts (kd, pairing_free, asha) are hour-long
# evidence runs on 2 cores (python bench/student.py --only kd,pairing_free,asha)
bench: $(STAMP)
	@for b in $(BENCHES); do echo "# bench/$$b.py"; start=$$(date +%s); \
		args=$$([ $$b = student ] && echo "--only footprint"); $(BIN)/python bench/$$b.py $$args || exit 1; \
		echo "# bench/$$b.py took $$(( $$(date +%s) - start )) s"; done

# on a GPU machine; needs only torch, timm, diffusers and deepspeed
bench-gpu:
	$(PY) bench/gpu.py

clean:
	rm -rf $(VENV) demo_out
