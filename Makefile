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
	$(PY) -m pytest -q -n 2 test_all.py

# Compiled models of the default program set, as run files.
tracr: $(VENV)
	@for p in $(PROGRAMS); do \
		test -f runs/$${p}_tracr.pt || $(PY) tracr_load.py $$p --out runs/$${p}_tracr.pt || exit 1; \
	done

bench: $(VENV) bench-deps
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

# plot.py and explain.py: figures of every run file (regenerated: --force), and the walk-through
# of one compiled program (make explain PROGRAM=sort).
PROGRAM ?= reverse
plot: $(VENV)
	$(PY) plot.py runs/*.pt --force

explain: $(VENV)
	$(PY) tracr_load.py $(PROGRAM) --explain

.PHONY: plot explain

# llc.py: SGLD estimates of the local learning coefficient of every saved run (recomputed: --force
# replaces meta['llc'] and figures/llc_traces.png). bench-deps: devinterp, for llc.bench() only.
llc: $(VENV)
	@mkdir -p runs
	@test -f runs/reverse_tracr.pt || $(PY) tracr_load.py reverse --out runs/reverse_tracr.pt
	$(PY) llc.py runs/*.pt --force

bench-deps: $(VENV)
	$(PY) -m pip install --quiet "devinterp==1.3.2" "torch==2.13.0"

.PHONY: llc bench-deps

# regularize.py: L1 sweeps from scratch and the compiled model trained under dropout.
REG_PROGRAMS ?= reverse sort
REG_L1 ?= 0 3e-5 1e-4 1e-3

regularize: $(VENV)
	@for p in $(REG_PROGRAMS); do \
		$(PY) regularize.py $$p --sweep l1-weights --strengths "$(REG_L1)" --quiet || exit 1; \
		$(PY) regularize.py $$p --sweep dropout --from-tracr --strengths 0.05 \
			--dropout-samples 8 --steps 2000 --quiet || exit 1; \
	done

.PHONY: regularize

# report.py: compile, train, compress, regularize and estimate the LLC of every default program,
# then write figures/report.md. Each step is its own process writing its own file: `make -j2
# report` runs two at a time, a cluster job array can run the same commands one per node, and a
# second `make report` reuses every file that exists. `make report FORCE=1` redoes them all.
REPORT_PROGRAMS ?= reverse sort hist sort_unique frac_prevs count pair_balance
REPORT_L1 ?= 1e-4
REPORT_STEPS ?= 2000
LLC_FLAGS ?= --chains 2 --draws 300 --burnin 100 --record-diverged
ifeq ($(FORCE),1)
REDO := redo-always
endif

redo-always: ;

runs/%_tracr.pt: $(REDO) | $(VENV)
	$(PY) tracr_load.py $* --out $@ --force

runs/%_trained.pt: $(REDO) | runs/%_tracr.pt
	$(PY) train.py $* --quiet --force

runs/%_regularized_report.pt: $(REDO) | runs/%_tracr.pt
	$(PY) regularize.py $* --l1-weights $(REPORT_L1) --steps $(REPORT_STEPS) --out $@ --force \
		--quiet

runs/%_compress.done: $(REDO) | runs/%_tracr.pt
	$(PY) compress.py $* --method projection --find-min --max-ratio 0.5 --force --no-progress
	touch $@

runs/%_llc.done: $(REDO) | runs/%_trained.pt runs/%_regularized_report.pt runs/%_compress.done
	$(PY) llc.py runs/$*_tracr.pt runs/$*_trained.pt runs/$*_regularized_report.pt \
		$$($(PY) report.py --smallest-compressed $*) $(LLC_FLAGS) --force \
		--figure figures/$*_llc_traces.png
	touch $@

figures/report.md: $(foreach p,$(REPORT_PROGRAMS),runs/$(p)_llc.done) | $(VENV)
	$(PY) report.py $(REPORT_PROGRAMS) --out $@

report: figures/report.md

.PHONY: report redo-always
.PRECIOUS: runs/%_tracr.pt runs/%_trained.pt runs/%_regularized_report.pt runs/%_compress.done \
	runs/%_llc.done

# compress.py: the smallest residual width at which each default program's compiled model still
# gets every input right (projection: compiled weights frozen, W [d, D] learned): first D/2, then
# bisection below it, or above it when D/2 fails (how far compression gets); prints the table.
# It rewrites only its own outputs (runs/*_compressed_d*.pt, figures/*_compress_projection.png).
COMPRESS_PROGRAMS ?= reverse sort sort_unique hist count pair_balance frac_prevs
compress: $(VENV)
	$(PY) compress.py $(COMPRESS_PROGRAMS) --method projection --table --max-ratio 0.5 --search-up \
		--jobs 2 --force --no-progress

.PHONY: compress
