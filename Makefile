# make test | make train | make train-all | make tracr | make bench | make clean
# Every target creates .venv and installs requirements.txt first when they are missing.

PY := .venv/bin/python
VENV := .venv/.installed
PROGRAMS ?= reverse sort hist sort_unique frac_prevs count pair_balance

.PHONY: venv test tracr train train-all bench clean

venv: $(VENV)

$(VENV): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(VENV)

test: $(VENV)
	$(PY) -m pytest -q test_all.py

# Compiled models of the default program set, as run files.
tracr: $(VENV)
	@for p in $(PROGRAMS); do \
		test -f runs/$${p}_tracr.pt || $(PY) tracr_load.py $$p --out runs/$${p}_tracr.pt || exit 1; \
	done

bench: $(VENV)
	$(PY) bench.py

clean:
	rm -rf runs figures .pytest_cache __pycache__

# train.py: models of the compiled shape trained from scratch, next to the compiled ones.
train: $(VENV)
	@mkdir -p runs
	@test -f runs/reverse_tracr.pt || $(PY) tracr_load.py reverse --out runs/reverse_tracr.pt
	@test -f runs/reverse_trained.pt || $(PY) train.py reverse --quiet
	@$(PY) train.py reverse --compare

train-all: $(VENV)
	@mkdir -p runs
	@for p in $(PROGRAMS); do \
		test -f runs/$${p}_tracr.pt || $(PY) tracr_load.py $$p --out runs/$${p}_tracr.pt || exit 1; \
		test -f runs/$${p}_trained.pt || $(PY) train.py $$p --quiet || exit 1; \
	done
	@for p in $(PROGRAMS); do $(PY) train.py $$p --compare || exit 1; done

.PHONY: train train-all

# compress.py: the smallest residual width at which each default program's compiled model still
# gets every input right, searched up to D/2 (projection: compiled weights frozen, W [d, D]
# learned); prints the table.
# It rewrites only its own outputs (runs/*_compressed_d*.pt, figures/*_compress_projection.png).
COMPRESS_PROGRAMS ?= reverse sort sort_unique hist count pair_balance frac_prevs
compress: $(VENV)
	$(PY) compress.py $(COMPRESS_PROGRAMS) --method projection --table --max-ratio 0.5 \
		--jobs 2 --force --no-progress

.PHONY: compress
