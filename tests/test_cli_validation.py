"""Every argument is checked before a model is loaded or any work starts, and bad input ends in one line.

One test per case of issue #20 (the front door), each giving the clear error or the right result.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vimtr
from vimtr.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def fails(argv, capsys) -> str:
    """Run ``vimtr ARGV``: it must exit with status 2 and one line on stderr (no traceback); returns it."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"vimtr {argv[0]}: error: "), err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Make loading a model and evaluating fail loudly: a check that passes them is too late."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")
    import vimtr.engine.common
    import vimtr.engine.evaluate
    import vimtr.tools.benchmark
    monkeypatch.setattr(vimtr.engine.common, "load_from_args", forbidden)
    monkeypatch.setattr(vimtr.tools.benchmark, "load_for_cli", forbidden)
    monkeypatch.setattr(vimtr.engine.evaluate, "evaluate", forbidden)


# ------------------------------------------------------------------------------------- before loading
@pytest.mark.parametrize("argv, says", [
    (["bench", "--model", "vim_digits", "--method", "nosuch"], "valid methods: evit, "),
    (["bench", "--model", "vim_digits", "--method", "tome:foo=1"], "unknown parameter(s) ['foo']"),
    (["bench", "--model", "vim_digits", "--method", "mtr:oops"], "expected key=value"),
    (["bench", "--model", "vim_digits", "--dtype", "fp16"], "fp16 needs a GPU"),
    (["bench", "--model", "vim_digits", "--device", "cuda:7"], "cuda"),
    (["bench", "--model", "vim_digits", "--device", "nonsense"], "is not a device"),
    (["bench", "--model", "vim_digits", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["sweep", "--model", "vim_digits", "--method", "mtr", "nosuch"], "unknown reduction method 'nosuch'"),
    (["sweep", "--model", "vim_digits", "--levels", "0.3", "1.5"], "--levels must be a fraction in (0, 1)"),
    (["sweep", "--model", "vim_digits", "--data", "/no/such/folder"], "/no/such/folder: does not exist"),
    (["sweep", "--model", "vim_tiny"], "registered architecture without weights"),
    (["sweep", "--model", "vim_digitz"], "Did you mean vim_digits, vim_digits_clutter?"),
    (["eval", "--model", "vim_digits", "--data", "digits", "--method", "mtr", "--param", "foo=1"],
     "--method mtr: unknown parameter(s) ['foo']"),
    (["eval", "--data", "digits"], "give --checkpoint PATH"),
    (["eval", "--checkpoint", "no_such_file.pth", "--data", "digits"], "no_such_file.pth: no such file"),
    (["eval", "--model", "vim_digits", "--data", "digits", "--flops-reduction", "1.2", "--method", "mtr"],
     "--flops-reduction must be a fraction in [0, 1)"),
    (["retrain", "--model", "vim_digits", "--method", "nosuch", "--data", "digits", "--output", "x"],
     "unknown reduction method 'nosuch'"),
    (["info", "--image", "nosuchsample"], "sample names: astronaut, cat, chelsea, coffee"),
    (["info", "--model", "vim_digits", "--param", "r=3"], "given without --method"),
    (["visualize", "digits:99999"], "digits:N takes a test image index N from 0 to 359"),
    (["visualize", "digits:x"], "digits:N takes a test image index"),
    (["visualize", "no_such_image.png", "--model", "vim_digits"], "no_such_image.png: no such file"),
    (["visualize", "digits:3", "--method", "nosuch"], "unknown reduction method"),
    (["warmup", "--model", "nosuch"], "not a bundled model"),
])
def test_refused_before_loading_a_model(argv, says, capsys, no_work):
    assert says in fails(argv, capsys)


def test_not_an_image_is_refused(tmp_path, capsys, no_work):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for argv in (["visualize", str(text), "--model", "vim_digits"], ["info", "--image", str(text)]):
        assert "not an image PIL can read" in fails(argv, capsys)
    assert "is a folder" in fails(["info", "--image", str(tmp_path)], capsys)


# ------------------------------------------------------------------------------------- reachability
def test_sweep_refuses_an_unreachable_level_before_any_evaluation(capsys, monkeypatch):
    import vimtr.tools.sweep as sweep_tool
    monkeypatch.setattr(sweep_tool, "measure", lambda *a, **k: pytest.fail("evaluated before refusing"))
    err = fails(["sweep", "--model", "vim_digits", "--data", "digits", "--method", "mtr", "tome",
                 "--levels", "0.3", "0.5"], capsys)
    assert "nothing was run" in err and "--interval 1" in err
    assert "mtr at 0.5" in err and "tome at 0.5" in err and "at 0.3" not in err  # 0.3 is fine for both
    model = vimtr.load_model("vim_digits")
    for method in ("mtr", "tome"):
        named = float(err.split(f"the largest level {method} reaches is ")[1][:5])
        vimtr.reduce(model, method, flops_reduction=round(named - 0.005, 2))  # the named level is reachable ...
        assert abs(vimtr.flops(model) / vimtr.flops(vimtr.restore(model)) - (1 - named)) < 0.02
        with pytest.raises(ValueError, match="unreachable"):
            vimtr.reduce(model, method, flops_reduction=round(named + 0.02, 2))  # ... and it is the largest
    # with --interval 1 every block reduces: mtr reaches 0.5 then, tome still does not (its cap is (L-1)//2)
    err = fails(["sweep", "--model", "vim_digits", "--data", "digits", "--method", "mtr", "tome", "--interval", "1",
                 "--levels", "0.5"], capsys)
    assert "tome at 0.5" in err and "mtr at" not in err and "interval=1" in err and "--interval 1" not in err


def test_sweep_default_levels_are_those_each_method_reaches():
    from vimtr.tools.sweep import DEFAULT_LEVELS, levels_for

    model = vimtr.load_model("vim_digits")
    notes = []
    levels = levels_for(model, ["mtr", "tome"], None, None, log=notes.append)
    for method, chosen in levels.items():
        assert chosen == sorted(chosen) and set(chosen) <= set(DEFAULT_LEVELS) and chosen
        for level in DEFAULT_LEVELS:  # chosen exactly when vimtr.reduce accepts the level
            try:
                vimtr.reduce(model, method, flops_reduction=level)
                ok = True
            except ValueError:
                ok = False
            assert ok == (level in chosen), (method, level)
    left_out = [m for m, chosen in levels.items() if len(chosen) < len(DEFAULT_LEVELS)]
    assert len(notes) == len(left_out) and all("left out" in n for n in notes)


def test_bench_refuses_an_unreachable_level_before_timing(capsys, monkeypatch):
    import vimtr.tools.benchmark as bench
    monkeypatch.setattr(bench, "time_forward", lambda *a, **k: pytest.fail("timed before refusing"))
    err = fails(["bench", "--model", "vim_digits", "--method", "mtr:flops_reduction=0.7", "rmeeto:r=40"], capsys)
    assert "mtr at 0.7" in err and "rmeeto: the schedule removes 40 tokens" in err and "mtr:interval=1" in err


def test_demo_refuses_an_unreachable_budget_up_front(capsys, monkeypatch):
    import vimtr.tools.demo as demo
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("the demo started"))
    err = fails(["demo", "--flops-reduction", "0.45"], capsys)
    assert "tome at 0.45" in err and "nothing was run" in err


# ------------------------------------------------------------------------------------- images
def _photo(seed=0, h=40, w=50):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_eval_transform_converts_every_mode_to_the_model_channels():
    from vimtr.data import eval_transform

    rgb = Image.fromarray(_photo())
    gray = rgb.convert("L")
    cases = {  # image -> the image it must be read as
        "L": (gray, gray.convert("RGB")),
        "LA": (gray.convert("LA"), gray.convert("RGB")),
        "RGBA": (rgb.convert("RGBA"), rgb),
        "P": (rgb.convert("P"), rgb.convert("P").convert("RGB")),
        "I;16": (Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), gray.convert("RGB")),
        "I": (Image.fromarray(np.asarray(gray).astype(np.int32) * 257), gray.convert("RGB")),
        "F": (Image.fromarray(np.asarray(gray).astype(np.float32) / 255), gray.convert("RGB")),
        "CMYK": (rgb.convert("CMYK"), rgb.convert("CMYK").convert("RGB")),
    }
    colour, grayscale = eval_transform("vim_tiny"), eval_transform(vimtr.load_model("vim_digits"))
    for mode, (image, expected) in cases.items():
        assert image.mode == mode
        out = colour(image)
        assert out.shape == (3, 224, 224)
        torch.testing.assert_close(out, colour(expected), atol=1e-6, rtol=0, msg=mode)
        small = grayscale(image)
        assert small.shape == (1, 32, 32), mode
        torch.testing.assert_close(small, grayscale(expected.convert("L")), atol=1e-6, rtol=0, msg=mode)
    # An RGB photo is untouched on its way into an RGB model: the official pipeline stays exact.
    assert colour.transforms[0](rgb) is rgb
    # The bundled model's own normalisation (its card: mean 0.1, std 0.3), not ImageNet's.
    black = grayscale(Image.new("L", (32, 32)))
    torch.testing.assert_close(black, torch.full((1, 32, 32), -0.1 / 0.3))


def test_eval_transform_refuses_channel_counts_it_cannot_make():
    from vimtr.data import eval_transform

    with pytest.raises(ValueError, match="4-channel input"):
        eval_transform(vimtr.create_model("vim_digits", in_chans=4))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_cli_takes_any_image_mode(tmp_path, capsys, mode):
    path = tmp_path / f"photo_{mode.replace(';', '')}.png"
    image = Image.fromarray(_photo(1))
    (Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257) if mode == "I;16"
     else image.convert(mode)).save(path)
    main(["info", "--model", "vim_digits", "--image", str(path)])  # the bundled grayscale model
    lines = capsys.readouterr().out.splitlines()
    assert sum(bool(re.match(r"\s+\d+\.\d+%\s+class \d$", line)) for line in lines) == 5  # the top-5
    out = tmp_path / "map.png"
    main(["visualize", str(path), "--model", "vim_digits", "--method", "mtr", "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------- the package
def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_documented_submodules_after_import_vimtr():
    code = ("import vimtr\n"
            "t = vimtr.data.eval_transform(vimtr.load_model('vim_digits'))\n"
            "assert vimtr.reduction.list_methods() and vimtr.models.registry.list_models()\n"
            "assert vimtr.engine.evaluate.evaluate and vimtr.ops.selective_scan_ref and vimtr.tools.sweep.sweep\n"
            "assert vimtr.models.checkpoint.bundled_models() and vimtr.io.write_json\n"
            "print(t.channels)")
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]


def test_vimtr_help_imports_no_torch():
    code = ("import sys\nfrom vimtr.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr
    assert "retrain" in done.stdout and done.stdout.split()[-1] == "NO-TORCH"


def test_create_model_is_in_train_mode_load_model_in_eval_mode():
    """As documented in the README: create_model as timm (train mode, drop-path active), load_model ready."""
    assert vimtr.create_model("vim_digits").training
    assert not vimtr.load_model("vim_digits").training


# ------------------------------------------------------------------------------------- progress
def test_progress_is_plain_lines_when_piped(capsys):
    import io

    from vimtr.progress import LineProgress, progress_bar

    stream = io.StringIO()  # not a terminal
    bar = progress_bar(range(50), desc="eval", stream=stream)
    assert isinstance(bar, LineProgress)
    assert list(bar) == list(range(50))
    lines = stream.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == [f"{p}%" for p in range(10, 100, 10)] + ["100%"]
    assert all(ln.startswith("eval: ") and "\r" not in ln and len(ln) < 80 for ln in lines)
    silent = io.StringIO()
    assert list(progress_bar(range(5), stream=silent, enabled=False)) == list(range(5))
    assert silent.getvalue() == ""


def test_a_piped_eval_logs_short_lines():
    done = subprocess.run([sys.executable, "-m", "vimtr", "eval", "--model", "vim_digits", "--data", "digits",
                           "--batch-size", "36", "--workers", "0"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert done.returncode == 0, done.stderr
    progress = [ln for ln in done.stderr.splitlines() if ln.startswith("eval: ")]
    assert "\r" not in done.stderr and max(map(len, done.stderr.splitlines())) < 300
    assert len(progress) == 10 and progress[-1].startswith("eval: 100% (10/10)")  # 360 images, batches of 36
    assert "top-1" in done.stdout
