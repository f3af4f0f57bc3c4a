# guidebench: `make demo` (set up + the main job on the embedded digits default), `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := outputs/demo
RUN    := $(BIN)/guidebench-run -m experiment=demo hydra.sweep.dir=$(DEMO)
# run folders for settings that differ only in classifier or sampler
NAMED  := hydra.sweep.subdir='$${tags.backbone}-$${tags.guidance}-$${tags.classifier}-$${tags.sampler}-s$${guidance.scale}'
DDPM25 := sampler=ddpm sampler.schedule.respacing=25

.PHONY: help setup demo test test-full lint clean
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(STAMP)  ## create .venv and install guidebench (editable) with its dependencies

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip install -q --native-tls --python $(BIN)/python -c constraints.txt -e '.[dev,slurm,fid,sweep]'
	touch $@

demo: setup  ## every guidance method on digits and digits_uncond at a few scales, evaluate, report
	$(RUN) backbone=digits guidance=none
	$(RUN) backbone=digits guidance=cfg guidance.scale=1.5,2,3,5
	$(RUN) backbone=digits guidance=classifier guidance.scale=1,3,10
	$(RUN) backbone=digits guidance=cfg_interval guidance.scale=2,3
	$(RUN) backbone=digits guidance=apg guidance.scale=2,3
	$(RUN) backbone=digits guidance=cfg_zero_star guidance.scale=1.5
	$(RUN) backbone=digits guidance=tcfg guidance.scale=1.5,2
	$(RUN) backbone=digits guidance=cfgpp guidance.scale=0.3,0.6
	$(RUN) backbone=digits guidance=autoguidance guidance.scale=1.5,2,3
	$(RUN) backbone=digits guidance=eds guidance.scale=1
	$(RUN) backbone=digits guidance=elucd classifier=digits_clean $(DDPM25) guidance.scale=0.3
	$(RUN) backbone=digits_uncond guidance=none
	$(RUN) backbone=digits_uncond guidance=classifier guidance.scale=1,3,10,30
	$(RUN) backbone=digits_uncond guidance=eds guidance.scale=1,3,10
	$(RUN) backbone=digits_uncond guidance=eds classifier=digits_noisy_ect guidance.scale=3,10 $(NAMED)
	$(RUN) backbone=digits_uncond guidance=classifier $(DDPM25) guidance.scale=3,10 $(NAMED)
	$(RUN) backbone=digits_uncond guidance=elucd classifier=digits_clean $(DDPM25) guidance.scale=0.3,1
	$(RUN) backbone=digits_uncond guidance=elucd_edm classifier=digits_clean guidance.scale=0.03,0.1
	$(BIN)/guidebench-report report.root=$(DEMO) report.out_dir=$(DEMO)

test: setup  ## the fast suite (everything not marked slow)
	$(BIN)/pytest -m "not slow"

test-full: setup  ## every test, full-size architectures included
	$(BIN)/pytest

clean:  ## remove outputs (not the environment)
	rm -rf outputs multirun
