"""A new user's path: build the wheel, install it into a fresh environment that already holds a compatible
torch, check that torch was not replaced, run the quickstart there.

The fresh environment is a new venv that sees this interpreter's installed packages (torch included, vimtr
itself left out) through a ``.pth`` file, as a user's environment holds its torch; pip runs with no
configuration and no index, with only the new wheel to find. So pip has to accept the torch that is there:
a pin it does not satisfy (``torch==``another version) fails the install instead of silently downloading
another torch.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]


def run(argv, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **kw.pop("env", {}))
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, env=env, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, argv))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this working tree (a copy of it: building leaves build/ and *.egg-info behind)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src])
    (built,) = (tmp / "dist").glob("vimtr-*.whl")
    return built


def test_wheel_metadata_has_ranges_not_pins(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = z.namelist()
    requires = {ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")}
    torch_req = [r for r in requires if r.split(">")[0].split("=")[0].split("<")[0].strip() in ("torch", "torchvision")]
    assert len(torch_req) == 2 and not any("==" in r for r in torch_req), torch_req
    assert "Requires-Python: >=3.11" in meta
    assert "vimtr/assets/vim_digits.safetensors" in names and "vimtr/assets/vim_digits.json" in names


def test_install_keeps_the_users_torch_and_the_quickstart_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # The user's environment already has torch (and the rest): this interpreter's site-packages, seen by the
    # new venv after its own, minus any vimtr installed there (the development install).
    users = tmp_path / "users_packages"
    users.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if "vimtr" not in entry.name.lower() and entry.suffix != ".pth":
            (users / entry.name).symlink_to(entry)
    (site / "users_environment.pth").write_text(f"{users}\n")
    before = run([py, "-c", "import torch, torchvision; print(torch.__file__, torch.__version__, "
                            "torchvision.__version__)"]).stdout.split()
    assert before[1:] == [torch.__version__, torchvision.__version__]
    assert Path(before[0]).resolve() == Path(torch.__file__).resolve()

    done = run([sys.executable, "-m", "pip", "--python", py, "install", "--no-index", "--find-links", wheel.parent,
                "vimtr"])
    assert "Successfully installed vimtr-" in done.stdout
    assert "torch" not in done.stdout.split("Successfully installed", 1)[1]  # nothing but vimtr installed

    after = run([py, "-c", "import torch, torchvision, vimtr; print(torch.__file__, torch.__version__, "
                           "torchvision.__version__, vimtr.__file__)"], cwd=tmp_path).stdout.split()
    assert after[:3] == before  # the same torch, from the same place
    assert Path(after[3]).is_relative_to(site), after[3]  # vimtr from the installed wheel, not the source tree
    assert not (site / "torch").exists() and not (site / "torchvision").exists()

    # The quickstart's no-download variant (README), with the installed `vimtr` script.
    vimtr_script = venv / "bin" / "vimtr"
    assert "retrain" in run([vimtr_script, "--help"], cwd=tmp_path).stdout
    done = run([vimtr_script, "eval", "--model", "vim_digits", "--data", "digits", "--method", "mtr",
                "--flops-reduction", "0.3", "--workers", "0"], cwd=tmp_path)
    assert "top-1" in done.stdout and "mtr" in done.stdout
    code = ("import vimtr\n"
            "from vimtr.data.digits import digits_tensors\n"
            "model = vimtr.load_model('vim_digits')\n"
            "x, y = digits_tensors('test')\n"
            "vimtr.reduce(model, 'mtr', flops_reduction=0.3)\n"
            "print((model(x[:64]).argmax(-1) == y[:64]).float().mean().item(), vimtr.flops(model))")
    accuracy, flops = map(float, run([py, "-c", code], cwd=tmp_path).stdout.split())
    assert accuracy > 0.3 and flops > 0
