"""experiments/README.md's results table is the single copy of the published numbers: every `paper:` block of
conf/experiment/*.yaml equals its row, every experiment file has a row and every row a file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from guidebench.config import CONF_DIR

README = Path(__file__).resolve().parents[1] / "experiments" / "README.md"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
NO_PAPER = {"demo"}  # the digits benchmark: no paper, no 50,000-sample protocol
HEADER = ["experiment", "paper, table", "FID", "sFID", "IS", "Prec", "Rec", "FD-DINOv2", "NFE", "evaluator",
          "checkpoints needed"]
COLUMNS = {"FID": "fid", "sFID": "sfid", "IS": "is", "Prec": "precision", "Rec": "recall", "FD-DINOv2": "fd_dinov2",
           "NFE": "nfe"}  # table column -> paper key
PAPER_KEYS = {"source", "evaluator", "reference", *COLUMNS.values()}
OPTIONAL_KEYS = {"released_checkpoint", "runnable", "runnable_reason"}
NULL = "—"


def split_row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parse_table(text: str) -> dict[str, dict[str, str]]:
    """The one results table: {experiment: {column: cell}}, experiment names without their backticks."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("|") and split_row(line) == HEADER]
    assert len(starts) == 1, f"experiments/README.md must hold exactly one results table with header {HEADER}"
    rows: dict[str, dict[str, str]] = {}
    for line in lines[starts[0] + 2:]:
        if not line.startswith("|"):
            break
        cells = split_row(line)
        assert len(cells) == len(HEADER), f"row has {len(cells)} cells, not {len(HEADER)}: {line}"
        name = cells[0].strip("`")
        assert name not in rows, f"{name} has two rows"
        rows[name] = dict(zip(HEADER, cells))
    return rows


def cell_value(cell: str) -> float | None:
    return None if cell == NULL else float(cell)


def mismatches(paper: dict, row: dict[str, str]) -> list[str]:
    """Where a paper block and its table row disagree (an empty list: they agree)."""
    out = []
    for column, key in COLUMNS.items():
        value, cell = paper.get(key), cell_value(row[column])
        if (value is None) != (cell is None) or (value is not None and not math.isclose(value, cell, rel_tol=0,
                                                                                            abs_tol=1e-12)):
            out.append(f"{key}: paper block {value}, table {row[column]}")
    return out


@pytest.fixture(scope="module")
def table() -> dict[str, dict[str, str]]:
    return parse_table(README.read_text())


def test_every_experiment_has_a_row_and_every_row_a_file(table):
    assert sorted(table) == EXPERIMENTS, (
        f"rows without a file: {sorted(set(table) - set(EXPERIMENTS))}; "
        f"files without a row: {sorted(set(EXPERIMENTS) - set(table))}")


def test_rows_without_a_paper_are_empty(table):
    for name in NO_PAPER:
        assert all(table[name][column] == NULL for column in COLUMNS), name


@pytest.mark.parametrize("experiment", sorted(set(EXPERIMENTS) - NO_PAPER))
def test_paper_block_equals_the_table(compose_cfg, table, experiment):
    cfg = compose_cfg("run", [f"experiment={experiment}"])
    assert cfg.sampling.num_samples == 50000 and isinstance(cfg.sampling.seed, int)
    assert "paper" in cfg, f"{experiment} has no paper: block"
    paper = OmegaConf.to_container(cfg.paper, resolve=True)
    assert PAPER_KEYS <= set(paper) <= PAPER_KEYS | OPTIONAL_KEYS, sorted(set(paper) ^ PAPER_KEYS)
    assert paper["source"], "the source (or why there is none) is always given"
    assert isinstance(paper["nfe"], int) and paper["nfe"] > 0
    assert not mismatches(paper, table[experiment]), mismatches(paper, table[experiment])
    if paper.get("released_checkpoint", True) is False:
        assert paper.get("runnable") is False, "a setting without released checkpoints cannot be runnable"
    if paper.get("runnable", True) is False:
        assert paper.get("runnable_reason"), "runnable: false needs a runnable_reason"


def test_a_changed_number_is_caught(table):
    row = dict(table["adm_g_256"])
    paper = {"fid": 4.59, "sfid": 5.25, "is": 186.70, "precision": 0.82, "recall": 0.52, "fd_dinov2": None,
             "nfe": 250}
    assert not mismatches(paper, row)
    assert mismatches({**paper, "fid": 4.60}, row) == ["fid: paper block 4.6, table 4.59"]
    assert mismatches({**paper, "fd_dinov2": 1.0}, row) and mismatches({**paper, "is": None}, row)
    assert mismatches(paper, {**row, "Rec": "0.53"}) and mismatches(paper, {**row, "NFE": "25"})


def test_parse_table_refuses_a_second_table_and_short_rows():
    header = "| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER) + "\n"
    row = "| `x` | p | 1 | — | — | — | — | — | 25 | e | c |\n"
    assert parse_table(header + row)["x"]["FID"] == "1"
    with pytest.raises(AssertionError, match="exactly one"):
        parse_table(header + row + "\n" + header + row)
    with pytest.raises(AssertionError, match="cells"):
        parse_table(header + "| `x` | p | 1 |\n")


def test_digits_miniatures_section_is_rendered_from_the_committed_results():
    """The miniatures' numbers in experiments/README.md are experiments/digits/miniatures.py's rendering of
    experiments/results/*.csv, so a re-run table cannot leave stale numbers behind."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("miniatures", README.parent / "digits" / "miniatures.py")
    miniatures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(miniatures)
    text = README.read_text()
    section = text[text.index(miniatures.BEGIN):text.index(miniatures.END) + len(miniatures.END)]
    assert section == miniatures.render(), "run: python experiments/digits/miniatures.py --write"
    real = next(iter(miniatures.read("digits_real").values()))
    assert int(real["num_samples"]) == 1000 and f"| {float(real['fid']):.1f} |" in section
