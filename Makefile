# Two pinned, tested stacks, each in its own virtual environment (see README.md):
#   dgl    : torch 2.2.1 + DGL 2.1.0 (+ PyG), numpy 1.26  -- the default
#   modern : torch 2.14.1 + PyG, numpy 2, no DGL
# An environment is (re)built when it is missing or its constraints/setup.cfg changed. Each takes
# about 6 GB (torch's PyPI wheels bundle CUDA libraries); pip's cache is off so a fresh machine
# needs no room for a second copy of the wheels.

PYTHON ?= python3.11
HGC_DATA ?= $(abspath ../shared/data)
EXTRAS_dgl := dgl,pyg,faiss,wsi,test,lint
EXTRAS_modern := pyg,faiss,wsi,test
PYTEST_ARGS ?= -q

.PHONY: test lint test-dgl test-modern demo env-dgl env-modern clean-env

test: lint test-dgl test-modern

# ruff (lint and import order) over the code, mypy over the graph and model packages (pyproject.toml)
lint: .venv-dgl/.installed
	.venv-dgl/bin/ruff check hgc tests bench examples
	.venv-dgl/bin/mypy

# (phony targets never match pattern rules, so each stack's targets are spelled out; one torch
# thread per test process: small graphs run fastest that way and timings don't depend on the load)
test-dgl: .venv-dgl/.installed
	OMP_NUM_THREADS=1 HGC_STACK=dgl HGC_DATA=$(HGC_DATA) .venv-dgl/bin/python -m pytest $(PYTEST_ARGS)

test-modern: .venv-modern/.installed
	OMP_NUM_THREADS=1 HGC_STACK=modern HGC_DATA=$(HGC_DATA) .venv-modern/bin/python -m pytest $(PYTEST_ARGS)

env-dgl: .venv-dgl/.installed
env-modern: .venv-modern/.installed

.venv-%/.installed: constraints/%.txt setup.cfg pyproject.toml
	rm -rf .venv-$*
	$(PYTHON) -m venv .venv-$*
	.venv-$*/bin/pip install --quiet --disable-pip-version-check --no-cache-dir -c constraints/$*.txt -e ".[$(EXTRAS_$*)]"
	.venv-$*/bin/python -m hgc.cli --version >/dev/null
	touch $@

# The main job on the bundled default: the her2st example with the offline encoder, patient-level
# folds, the Hist2ST gene panel; every step is cached in runs/her2st, the table is printed at the end;
# then the biology checks (the authors' clusters and TLS signature) and the figures (runs/her2st/figures).
HER2ST_RES = $(HGC_DATA)/her2st/res
demo: .venv-dgl/.installed
	HGC_DATA=$(HGC_DATA) .venv-dgl/bin/hgc data inspect examples/her2st.tsv
	HGC_DATA=$(HGC_DATA) .venv-dgl/bin/hgc run examples/her2st.tsv --protocol patient-kfold \
		--genes hist2st-her2st --out runs/her2st
	HGC_DATA=$(HGC_DATA) .venv-dgl/bin/hgc evaluate runs/her2st/predictions --manifest examples/her2st.tsv \
		--annotations label --region-map $(HER2ST_RES)/ST-cluster/motivation.csv \
		--signatures $(HER2ST_RES)/TLS-pred/tls-signature.tsv.gz --signatures examples/her2st-markers.gmt
	HGC_DATA=$(HGC_DATA) .venv-dgl/bin/hgc plot runs/her2st --out runs/her2st/figures

clean-env:
	rm -rf .venv-dgl .venv-modern
