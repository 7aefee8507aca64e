"""Reading ``.pth`` pickles without running them: ``torch.load(weights_only=True)`` with one allow-listed
global, and, when a file is refused, a static scan that names the globals it wanted (nothing is executed)."""
from __future__ import annotations

import argparse
import pickle
import pickletools
import re
import warnings
from pathlib import Path

import torch

# The only global outside torch's weights_only defaults that official Vim/VideoMamba files contain
# (HF's pickle scan of vim_t_midclstok_76p1acc.pth: OrderedDict, argparse.Namespace, FloatStorage).
SAFE_GLOBALS = (argparse.Namespace,)


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (torch's messages run to paragraphs)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def torch_load_weights(path: Path, label: str, error: type[Exception]):
    """torch.load with weights_only=True: nothing in the file is imported or called unless allow-listed.
    Failures raise ``error`` (the caller's CheckpointError) saying why, naming any global the file wanted."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # noise before our own error
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, e)
        if unsafe:
            raise error(
                f"{label}: refused to load: unpickling it would import/call {', '.join(unsafe)}, which a weights "
                f"checkpoint never needs (allowed: tensors, plain containers and "
                f"{', '.join(_qualname(g) for g in SAFE_GLOBALS)}). Nothing from the file was run. If you trust "
                f"the file, extract its state dict yourself and pass that to load_model") from None
        raise error(f"{label}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # EOFError (empty), RuntimeError (truncated zip), KeyError/ValueError (not a pickle)
        what = "an empty file" if isinstance(e, EOFError) else "truncated, corrupt or another kind of file"
        raise error(f"{label}: not a readable PyTorch checkpoint: {what} ({_first_line(e)})") from None


def _qualname(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """Name the globals a refused pickle wanted, without running it: a static scan, else torch's message."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # zip files only
    except Exception:
        names = [n for n in _scan_pickle_globals(path)
                 if not n.startswith(("torch.", "collections.OrderedDict"))]  # allowed by torch by default
    allowed = {_qualname(g) for g in SAFE_GLOBALS}
    names = [n for n in names if n not in allowed] or re.findall(r"GLOBAL ([\w.]+)", str(err))
    return list(dict.fromkeys(names))


def _scan_pickle_globals(path: Path, max_pickles: int = 4) -> list[str]:
    """Statically list GLOBAL/STACK_GLOBAL imports of a plain pickle (legacy format: several in a row).

    ``pickletools.genops`` only decodes opcodes; STACK_GLOBAL takes its module and name from the two
    strings pushed before it, possibly via the memo, which is tracked for strings only.
    """
    found = []
    with open(path, "rb") as f:
        for _ in range(max_pickles):
            strings, memo, top = [], {}, None  # top: the string on top of the stack, if it is one
            try:
                for op, arg, _ in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):
                        found.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    if op.name == "MEMOIZE" or op.name.endswith("PUT"):  # store the top, leave the stack
                        memo[len(memo) if op.name == "MEMOIZE" else arg] = top
                        continue
                    if isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                        top = arg
                    else:
                        top = memo.get(arg) if op.name.endswith("GET") else None
                    if isinstance(top, str):
                        strings.append(top)
            except Exception:  # end of the pickles (raw storage bytes follow in the legacy format)
                break
    return found
