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

.PHONY: help setup demo table doodl-table cfg-table seed-spread real-data test test-full lint clean
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(STAMP)  ## create .venv and install guidebench (editable) with its dependencies

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip install -q --native-tls --python $(BIN)/python -c constraints.txt -e '.[dev,slurm,fid,sweep]'
	touch $@

demo: setup  ## the main job: the guidance families on digits and digits_uncond, evaluated and reported (~15 min)
	$(RUN) backbone=digits guidance=none
	$(RUN) backbone=digits guidance=cfg guidance.scale=1.5,2,3
	$(RUN) backbone=digits guidance=apg guidance.scale=2
	$(RUN) backbone=digits guidance=autoguidance guidance.scale=1.5
	$(RUN) backbone=digits_uncond guidance=none
	$(RUN) backbone=digits_uncond guidance=classifier guidance.scale=3,10
	$(RUN) backbone=digits_uncond guidance=eds guidance.scale=3
	$(RUN) backbone=digits_uncond guidance=ppap classifier=digits_ppap guidance.scale=3 $(NAMED)
	$(RUN) backbone=digits_uncond guidance=freedom classifier=digits_clean guidance.scale=0.3 $(NAMED)
	$(RUN) backbone=digits_uncond guidance=pag guidance.scale=1
	$(BIN)/guidebench-report report.root=$(DEMO) report.out_dir=$(DEMO)

TABLE := outputs/digits_table
TAB   := $(BIN)/guidebench-run -m experiment=demo hydra.sweep.dir=$(TABLE)
table: setup  ## every method of the README's digits table (~35 min on 2 cores): $(TABLE)/summary.csv
	$(TAB) backbone=digits guidance=none
	$(TAB) backbone=digits guidance=cfg guidance.scale=1.5,2,3,5
	$(TAB) backbone=digits guidance=classifier guidance.scale=1,3,10
	$(TAB) backbone=digits guidance=cfg_interval guidance.scale=2,3
	$(TAB) backbone=digits guidance=apg guidance.scale=2
	$(TAB) backbone=digits guidance=cfg_zero_star guidance.scale=1.5
	$(TAB) backbone=digits guidance=tcfg guidance.scale=1.5
	$(TAB) backbone=digits guidance=cfgpp guidance.scale=0.3
	$(TAB) backbone=digits guidance=cads guidance.scale=3
	$(TAB) backbone=digits guidance=cads guidance.scale=3 guidance.psi=0 guidance.noise_scale=1 hydra.sweep.subdir=digits-cads-psi0-s1
	$(TAB) backbone=digits guidance=autoguidance guidance.scale=1.5,3
	$(TAB) backbone=digits guidance=pag guidance.scale=1
	$(TAB) backbone=digits guidance=pag guidance.cfg_scale=2 guidance.scale=1 hydra.sweep.subdir=digits-pag-cfg2-s1
	$(TAB) backbone=digits guidance=seg guidance.scale=3
	$(TAB) backbone=digits guidance=eds guidance.scale=1
	$(TAB) backbone=digits guidance=elucd classifier=digits_clean $(DDPM25) guidance.scale=0.3
	$(TAB) backbone=digits_uncond guidance=none
	$(TAB) backbone=digits_uncond guidance=pag guidance.scale=1
	$(TAB) backbone=digits_uncond guidance=classifier guidance.scale=3,10,30
	$(TAB) backbone=digits_uncond guidance=classifier classifier=digits_clean guidance.scale=3 $(NAMED)
	$(TAB) backbone=digits_uncond guidance=eds guidance.scale=3,10
	$(TAB) backbone=digits_uncond guidance=eds classifier=digits_noisy_ect guidance.scale=3,10 $(NAMED)
	$(TAB) backbone=digits_uncond guidance=classifier $(DDPM25) guidance.scale=10 $(NAMED)
	$(TAB) backbone=digits_uncond guidance=ppap classifier=digits_ppap guidance.scale=3,7.5 $(NAMED)
	$(TAB) backbone=digits_uncond guidance=elucd classifier=digits_clean $(DDPM25) guidance.scale=0.3,1
	$(TAB) backbone=digits_uncond guidance=elucd_edm classifier=digits_clean guidance.scale=0.1
	$(TAB) backbone=digits_uncond classifier=digits_clean guidance=dps guidance.scale=0.3
	$(TAB) backbone=digits_uncond classifier=digits_clean guidance=freedom guidance.scale=0.3
	$(TAB) backbone=digits_uncond classifier=digits_clean guidance=mpgd guidance.scale=1
	$(TAB) backbone=digits_uncond classifier=digits_clean guidance=tfg guidance.scale=0.3
	$(TAB) backbone=digits_uncond classifier=digits_clean guidance=lgd guidance.scale=1
	$(TAB) backbone=digits_uncond classifier=digits_clean guidance=ugd guidance.scale=0.3
	$(BIN)/guidebench-report report.root=$(TABLE) report.out_dir=$(TABLE)
	cp $(TABLE)/summary.csv experiments/results/digits_table.csv
	$(BIN)/python experiments/digits/miniatures.py --write

DOODL := $(BIN)/guidebench-run -m experiment=demo hydra.sweep.dir=outputs/doodl_table sampling.num_samples=200 \
	classifier=digits_clean hydra.sweep.subdir='$${tags.backbone}-$${tags.guidance}-$${tags.sampler}'
doodl-table: setup  ## DOODL against plain DDIM-25 / EDICT-25 sampling, 200 samples each (~30 min): outputs/doodl_table
	$(DOODL) backbone=digits,digits_uncond guidance=none
	$(DOODL) backbone=digits,digits_uncond guidance=none sampler=edict
	$(DOODL) backbone=digits,digits_uncond guidance=doodl sampler=edict guidance.num_iterations=5 guidance.clip_grad=0.01
	$(BIN)/guidebench-report report.root=outputs/doodl_table report.out_dir=outputs/doodl_table
	cp outputs/doodl_table/summary.csv experiments/results/doodl_table.csv
	$(BIN)/python experiments/digits/miniatures.py --write

CFGTAB := $(BIN)/guidebench-run -m experiment=demo hydra.sweep.dir=outputs/cfg_table
cfg-table: setup  ## Ho & Salimans' Table 1 on digits: CFG w = 0..4 x p_uncond 0.1/0.2/0.5 (~15 min): outputs/cfg_table
	$(CFGTAB) backbone=digits,digits_puncond02,digits_puncond05 guidance=cfg guidance.scale=1,1.3,2,3,5
	$(BIN)/guidebench-report report.root=outputs/cfg_table report.out_dir=outputs/cfg_table report.grid=false
	cp outputs/cfg_table/summary.csv experiments/results/digits_cfg_puncond.csv
	$(BIN)/python experiments/digits/miniatures.py --write

SEEDS := $(BIN)/guidebench-run -m experiment=demo hydra.sweep.dir=outputs/seed_spread hydra.sweep.subdir='$${tags.backbone}-seed$${sampling.seed}'
seed-spread: setup  ## the same setting from three seed ranges, to read FID differences against (~8 min): outputs/seed_spread
	$(SEEDS) backbone=digits,digits_uncond guidance=none sampling.seed=0,100000,200000
	$(BIN)/guidebench-report report.root=outputs/seed_spread report.out_dir=outputs/seed_spread report.grid=false
	cp outputs/seed_spread/summary.csv experiments/results/digits_seed_spread.csv
	$(BIN)/python experiments/digits/miniatures.py --write

real-data: setup  ## the floor of every digits table: 1,000 training digits scored as samples (~1 min): outputs/real_data
	$(BIN)/python -c "from guidebench.data.digits import save_split_npz; save_split_npz('train', 'outputs/real_data/train1000.npz', 1000)"
	$(BIN)/guidebench-evaluate evaluation.samples=outputs/real_data/train1000.npz evaluation.out_dir=outputs/real_data
	$(BIN)/guidebench-report 'report.runs=[outputs/real_data]' report.out_dir=outputs/real_data report.grid=false
	cp outputs/real_data/summary.csv experiments/results/digits_real.csv
	$(BIN)/python experiments/digits/miniatures.py --write

test: setup  ## the fast suite (everything not marked slow)
	$(BIN)/pytest -m "not slow"

test-full: setup  ## every test, full-size architectures included
	$(BIN)/pytest

clean:  ## remove outputs (not the environment)
	rm -rf outputs multirun
