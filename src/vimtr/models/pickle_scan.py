"""What a refused pickle wanted to import, found without running it (for :mod:`vimtr.models.checkpoint`'s
error message): torch's static scan of zip checkpoints, else a scan of the legacy pickle's opcodes."""
from __future__ import annotations

import pickletools
import re
from pathlib import Path

import torch


def qualname(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def unsafe_globals(path: Path, err: Exception, allowed_globals=()) -> list[str]:
    """Name the globals a refused pickle wanted, without running it: a static scan, else torch's message."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # zip files only
    except Exception:
        names = [n for n in scan_pickle_globals(path)
                 if not n.startswith(("torch.", "collections.OrderedDict"))]  # allowed by torch by default
    allowed = {qualname(g) for g in allowed_globals}
    names = [n for n in names if n not in allowed] or re.findall(r"GLOBAL ([\w.]+)", str(err))
    return list(dict.fromkeys(names))


def scan_pickle_globals(path: Path, max_pickles: int = 4) -> list[str]:
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
