"""vimtr reproduce: table definitions (validated without data), bad input before any row runs, an end-to-end
table on the bundled model, resuming after a failure and after a kill, torchrun."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

import vimtr
from vimtr.cli import main as cli_main
from vimtr.data import folders as data
from vimtr.engine.evaluate import evaluate
from vimtr.models.checkpoint import assets_dir
from vimtr.tools import reproduce, tables

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

LIMIT = 24  # images per row: the mechanics, not the accuracy, are under test

DIGITS_TABLE = """
name = "digits-test"
title = "digits table for the tests"
data = "digits"
notes = ["made up for the tests: the published numbers below are test inputs"]

[backbones.digits]
label = "Vim-digits"
model = "vim_digits"
checkpoint = "vim_digits.safetensors"

[[rows]]
backbone = "digits"
method = "none"

[[grid]]
backbones = ["digits"]
methods = [{methods}]
levels = [0.3]

[[rows]]
backbone = "digits"
method = "rmeeto"
params = {{ r = 4 }}
retrained = {{ folder = "digits_retrained", epochs = 1 }}

[[published]]
row = "digits-baseline"
top1 = 98.0
status = "reported"
source = "test input"

[[published]]
row = "digits-mtr-fr0.3"
drop = -10.0
status = "reported"
source = "test input"

[[published]]
row = "digits-rmeeto-r4-retrained"
top1 = 90.0
gflops = 0.02
status = "derived"
source = "test input"
"""


def digits_table(tmp_path, methods=("mtr", "hsa")):
    path = tmp_path / "digits.toml"
    path.write_text(DIGITS_TABLE.format(methods=", ".join(f'"{m}"' for m in methods)))
    return path


def checkpoints(tmp_path, retrained=True):
    ck = tmp_path / "ckpt"
    ck.mkdir(exist_ok=True)
    shutil.copy(assets_dir() / "vim_digits.safetensors", ck / "vim_digits.safetensors")
    if retrained:  # a released-style folder holding one checkpoint file (here: the bundled weights again)
        (ck / "digits_retrained").mkdir(exist_ok=True)
        shutil.copy(assets_dir() / "vim_digits.safetensors", ck / "digits_retrained" / "weights.safetensors")
    return ck


def argv(table, ck, out, *extra):
    return ["reproduce", str(table), "--checkpoints", str(ck), "--out", str(out), "--limit", str(LIMIT),
            "--workers", "0", "--no-progress", "--device", "cpu", *extra]


def row_files(out):
    return sorted((out / "digits-test" / "rows").glob("*.json"))


class Counter:
    """Wraps reproduce.evaluate_row: counts the rows evaluated, optionally fails at the n-th."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at, self.real = [], fail_at, reproduce.evaluate_row

    def __call__(self, row, *a, **kw):
        self.calls.append(row.id)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("injected failure")
        return self.real(row, *a, **kw)


# --------------------------------------------------------------------------------------------- definitions
def test_every_shipped_table_is_valid_without_data():
    """Every row of every shipped table: architecture, checkpoint name, method, parameters and FLOPs level
    accepted; re-trained rows name their release folder and carry a published number with its source."""
    shipped = tables.available()
    assert {"mtr-main", "mtr-ablations", "rmeeto-main", "rmeeto-k400"} <= set(shipped)
    cache = {}
    for name, path in shipped.items():
        table = tables.load_table(path)
        assert tables.validate(table, cache) == [], name
        assert table.rows and all(r.backbone.key in table.backbones for r in table.rows)
        for row in table.rows:
            if row.retrained:
                assert row.retrained["folder"] and row.published.get("top1") and row.published["source"], row.id
    main = tables.load_table("mtr-main")
    assert {r.method for r in main.rows} == {None, "mtr", "evit", "pumer", "utr", "hsa"}
    assert {r.params.get("flops_reduction") for r in main.rows if r.method} == {0.2, 0.3, 0.4}
    assert tables.load_table("rmeeto-k400").video


def test_list_names_every_table(capsys):
    assert cli_main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name in tables.available():
        assert name in out


EXTRA_ROW = '\n[[rows]]\nid = "extra"\nbackbone = "digits"\nmethod = "{method}"\nparams = {{ {params} }}\n'
BAD_TABLES = {  # (text replaced, replacement, what the report must name)
    "unknown method": ("", EXTRA_ROW.format(method="mtr2", params="r = 2"), "mtr2"),
    "unknown parameter": ("", EXTRA_ROW.format(method="mtr", params="r = 2, bogus = 1"), "bogus"),
    "unreachable level": ("", EXTRA_ROW.format(method="hsa", params="flops_reduction = 0.97"), "unreachable"),
    "bad value": ("", EXTRA_ROW.format(method="mtr", params='r = 2, score = "attention"'), "score must be"),
    "bad checkpoint name": ('checkpoint = "vim_digits.safetensors"', 'checkpoint = "weights/vim.txt"', "vim.txt"),
    "bad recipe": ("epochs = 1 }", "epochs = 1, recipe = { bogus_opt = 3 } }", "bogus-opt"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_validation_reports_bad_rows(tmp_path, case, capsys):
    old, new, needle = BAD_TABLES[case]
    text = digits_table(tmp_path, methods=("mtr",)).read_text()
    text = text.replace(old, new, 1) if old else text + new
    path = tmp_path / "bad.toml"
    path.write_text(text)
    problems = tables.validate(tables.load_table(path))
    assert any(needle in p for p in problems), problems
    with pytest.raises(SystemExit, match=needle):
        cli_main(["reproduce", str(path), "--check"])


@pytest.mark.parametrize("old,new,needle", [
    ('status = "derived"', 'status = "guessed"', "status must be one of"),
    ('row = "digits-baseline"', 'row = "digits-nothing"', "digits-nothing"),
    ('method = "none"', 'method = "none"\nrepeat = 2', "unknown key"),
    ('backbone = "digits"\nmethod = "none"', 'backbone = "digitz"\nmethod = "none"', "digitz"),
])
def test_malformed_definitions_are_refused_with_the_key(tmp_path, old, new, needle):
    text = digits_table(tmp_path).read_text()
    assert old in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(vimtr.errors.UsageError, match=needle):
        tables.load_table(path)


# --------------------------------------------------------------------------------------------- bad input
def test_missing_checkpoints_are_named_before_any_row_runs(tmp_path, monkeypatch):
    table, out = digits_table(tmp_path), tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    counter = Counter()
    monkeypatch.setattr(reproduce, "evaluate_row", counter)
    with pytest.raises(SystemExit) as err:
        cli_main(argv(table, empty, out))
    msg = str(err.value)
    assert "vim_digits.safetensors" in msg and str(empty) in msg  # the expected file, where it was looked for
    assert "digits_retrained" in msg and "--run-recipe" in msg
    assert "no row was run" in msg and counter.calls == [] and not out.exists()


def test_video_table_runs_on_clips_with_the_published_views(tmp_path, video_set, capsys):
    """The K400 table's Ti rows on real clips: a small VideoMamba saved under the official file name, the
    generated Kinetics-layout folder; the baseline and R-MeeTo rows run (4x3 views), the others are not
    asked for; a video table without --data is refused before any row runs."""
    import vimtr
    from vimtr.tools.reproduce import VIDEO_TEST_VIEWS

    ck = tmp_path / "ckpt"
    ck.mkdir()
    torch.manual_seed(0)
    model = vimtr.create_model("videomamba_video_tiny", depth=4, img_size=64, num_frames=8)  # Ti width, small
    torch.save(model.state_dict(), ck / "videomamba_t16_k400_f8_res224.pth")  # the official flat layout
    with pytest.raises(SystemExit, match="give --data"):
        cli_main(["reproduce", "rmeeto-k400", "--checkpoints", str(ck), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert cli_main(["reproduce", "rmeeto-k400", "--checkpoints", str(ck), "--data", str(video_set["val"]),
                     "--out", str(out), "--rows", "videomamba_t-baseline", "videomamba_t-rmeeto-r88",
                     "--batch-size", "2"]) == 0
    rows = {p.stem: json.loads(p.read_text()) for p in (out / "rmeeto-k400" / "rows").glob("*.json")}
    assert set(rows) == {"videomamba_t-baseline", "videomamba_t-rmeeto-r88"}
    assert VIDEO_TEST_VIEWS == "4x3"
    base, merged = rows["videomamba_t-baseline"]["result"], rows["videomamba_t-rmeeto-r88"]["result"]
    assert base["images"] == merged["images"] == 6 and base["protocol"]["test_views"] == "4x3"
    assert base["gflops"] > merged["gflops"] > 0 and merged["tokens_per_block"][-1] < base["tokens_per_block"][-1]
    assert "76.9" in capsys.readouterr().out  # the published baseline beside the measured one


# --------------------------------------------------------------------------------------------- end to end
def test_end_to_end_on_the_bundled_model(tmp_path, capsys):
    table, ck, out = digits_table(tmp_path), checkpoints(tmp_path), tmp_path / "out"
    assert cli_main(argv(table, ck, out)) == 0
    printed = capsys.readouterr().out
    root = out / "digits-test"
    rows = {p.stem: json.loads(p.read_text()) for p in row_files(out)}
    assert set(rows) == {"digits-baseline", "digits-mtr-fr0.3", "digits-hsa-fr0.3", "digits-rmeeto-r4-retrained"}
    assert rows["digits-rmeeto-r4-retrained"]["checkpoint_path"].endswith("digits_retrained/weights.safetensors")

    # Each row is the evaluation of its model on the first LIMIT digits, as computed here directly.
    subset = Subset(data.load_dataset(data.DIGITS, "val"), range(LIMIT))
    model = vimtr.load_model(ck / "vim_digits.safetensors", name="vim_digits")
    for row_id, method, params in (("digits-baseline", None, {}), ("digits-mtr-fr0.3", "mtr", {"flops_reduction": 0.3})):
        vimtr.restore(model)
        if method:
            vimtr.reduce(model, method, **params)
        direct = evaluate(model, subset, batch_size=128, progress=False)
        assert rows[row_id]["result"]["top1"] == direct["top1"] and rows[row_id]["result"]["images"] == LIMIT

    result = json.loads((root / "table.json").read_text())
    by_row = {r["row"]: r for r in result["rows"]}
    base, mtr, re = (by_row[k] for k in ("digits-baseline", "digits-mtr-fr0.3", "digits-rmeeto-r4-retrained"))
    base_top1 = 100 * rows["digits-baseline"]["result"]["top1"]
    assert base["measured_top1"] == pytest.approx(base_top1)
    assert base["diff_top1"] == pytest.approx(base_top1 - 98.0)
    mtr_drop = 100 * rows["digits-mtr-fr0.3"]["result"]["top1"] - base_top1
    assert mtr["measured_drop"] == pytest.approx(mtr_drop) and mtr["diff_drop"] == pytest.approx(mtr_drop + 10.0)
    assert re["published_drop"] == pytest.approx(90.0 - 98.0)  # from the published top-1 and baseline
    assert re["published_gflops"] == 0.02 and re["measured_gflops"] == rows["digits-rmeeto-r4-retrained"]["result"]["gflops"]
    assert mtr["flops_saved"] == pytest.approx(0.3, abs=0.01)
    csv_lines = (root / "table.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(reproduce.COLUMNS) and len(csv_lines) == 5
    md = (root / "table.md").read_text()
    assert md.strip() in printed and "| digits-mtr-fr0.3 |" in md and f"first {LIMIT} images" in md


def test_failed_run_resumes_without_redoing_finished_rows(tmp_path, monkeypatch):
    table, ck, out = digits_table(tmp_path), checkpoints(tmp_path), tmp_path / "out"
    failing = Counter(fail_at=3)
    monkeypatch.setattr(reproduce, "evaluate_row", failing)
    with pytest.raises(RuntimeError, match="injected"):
        cli_main(argv(table, ck, out))
    done = {p.stem: p.stat().st_mtime_ns for p in row_files(out)}
    assert len(done) == 2 and set(done) == set(failing.calls[:2])
    assert not (out / "digits-test" / "table.json").exists()

    again = Counter()
    monkeypatch.setattr(reproduce, "evaluate_row", again)
    assert cli_main(argv(table, ck, out)) == 0
    assert len(again.calls) == 2 and not set(again.calls) & set(done)  # only the unfinished rows ran
    assert {p.stem: p.stat().st_mtime_ns for p in row_files(out) if p.stem in done} == done
    assert len(row_files(out)) == 4 and (out / "digits-test" / "table.json").exists()

    # A row whose definition changed is computed again; the others are kept.
    third = Counter()
    monkeypatch.setattr(reproduce, "evaluate_row", third)
    table.write_text(table.read_text().replace("epochs = 1", "epochs = 2"))
    assert cli_main(argv(table, ck, out)) == 0
    assert third.calls == ["digits-rmeeto-r4-retrained"]


def test_killed_run_resumes_without_redoing_finished_rows(tmp_path, monkeypatch):
    """SIGKILL a running ``vimtr reproduce`` as soon as a row is written; the re-run computes only the rest."""
    table = digits_table(tmp_path, methods=("mtr", "hsa", "tome", "pumer", "utr", "evit"))
    ck, out = checkpoints(tmp_path), tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(vimtr.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "vimtr", *argv(table, ck, out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not row_files(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {p.stem: p.stat().st_mtime_ns for p in row_files(out)}
    assert 1 <= len(done) < 8, done  # killed mid-table
    for p in row_files(out):
        json.loads(p.read_text())  # every row file is complete (atomic writes)

    again = Counter()
    monkeypatch.setattr(reproduce, "evaluate_row", again)
    assert cli_main(argv(table, ck, out)) == 0
    assert sorted(again.calls) == sorted(set(p.stem for p in row_files(out)) - set(done))
    assert {p.stem: p.stat().st_mtime_ns for p in row_files(out) if p.stem in done} == done
    assert len(row_files(out)) == 8


def test_torchrun_two_processes_give_the_single_process_rows(tmp_path):
    table, ck = digits_table(tmp_path, methods=("mtr",)), checkpoints(tmp_path)
    assert cli_main(argv(table, ck, tmp_path / "one")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(vimtr.__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vimtr",
           *argv(table, ck, tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for one in row_files(tmp_path / "one"):
        a = json.loads(one.read_text())["result"]
        b = json.loads((tmp_path / "two" / "digits-test" / "rows" / one.name).read_text())["result"]
        assert b["world_size"] == 2 and a["world_size"] == 1
        assert (a["images"], a["top1"], a["top5"]) == (b["images"], b["top1"], b["top5"]), one.stem
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
