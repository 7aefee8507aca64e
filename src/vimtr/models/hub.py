"""Checkpoints by Hugging Face repo id (``hustvl/Vim-tiny-midclstok``, ``repo:file``), through ``huggingface_hub``.

A file already in the local Hugging Face cache is used without the network. Otherwise the Hub's host is
probed first, with a short timeout: offline, ``hf_hub_download`` retries with back-off for ~25 s before it
gives up, and the user waited for an error that was certain after the first failed look-up. Every failure
ends in a :class:`~vimtr.models.checkpoint.CheckpointError` that says which URL to fetch and what to do
with the file.
"""
from __future__ import annotations

import os
import re
import socket
import threading
from urllib.parse import urlparse

# Default file per known repo (vim.md §3c).
HF_DEFAULT_FILES = {
    "hustvl/Vim-tiny-midclstok": "vim_t_midclstok_76p1acc.pth",
    "hustvl/Vim-small-midclstok": "vim_s_midclstok_80p5acc.pth",
    "hustvl/Vim-base-midclstok": "vim_b_midclstok_81p9acc.pth",
    "OpenGVLab/VideoMamba": "videomamba_t16_in1k_res224.pth",
}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[^:]+)?$")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".safetensors")
PROBE_TIMEOUT_S = 3.0  # name look-up + TCP connect to the Hub; a reachable Hub answers in well under a second
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def is_hub_id(text: str) -> bool:
    """``owner/repo`` or ``owner/repo:file`` that is not itself a checkpoint path (``runs/x/best.pt`` is not)."""
    return bool(_HF_ID.match(text)) and not text.split(":")[0].lower().endswith(CHECKPOINT_SUFFIXES)


def _endpoint() -> str:
    try:
        from huggingface_hub import constants
        return constants.ENDPOINT
    except (ImportError, AttributeError):
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def unreachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be reached (``None`` if it can, or if only a proxy could tell): ``HF_HUB_OFFLINE``,
    or a name look-up / TCP connection that fails or takes longer than ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None  # requests go through the proxy: a direct probe would say nothing
    url = urlparse(endpoint or _endpoint())
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    outcome: list = []

    def probe():  # in a thread: the name look-up has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{host}:{port}: {type(e).__name__}: {e}")

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {timeout:g} s"


def hub_download(repo: str, filename: str | None, text: str, error: type[Exception]) -> tuple[str, str]:
    """(local path, file name) of ``filename`` (default: the repo's known checkpoint) in ``repo``; failures
    raise ``error`` saying exactly what to fetch."""
    if filename is None:
        if repo not in HF_DEFAULT_FILES:
            raise error(f"{text}: no such local file; as a Hugging Face repo id it needs a file name: "
                        f"'{repo}:<file>.pth' (known repos: {', '.join(HF_DEFAULT_FILES)})")
        filename = HF_DEFAULT_FILES[repo]
    url = f"https://huggingface.co/{repo}/resolve/main/{filename}"
    how = (f"Download {url} (browser, wget, or `huggingface-cli download {repo} {filename}`), save it anywhere "
           f"and pass its path: vimtr.load_model('/path/to/{filename}') or --checkpoint /path/to/{filename}")
    try:
        import huggingface_hub
    except ImportError:
        raise error(f"{repo}:{filename}: cannot download, huggingface_hub is not installed "
                    f"(pip install 'vimtr[hub]'). {how}") from None
    cached = huggingface_hub.try_to_load_from_cache(repo_id=repo, filename=filename)
    if isinstance(cached, str):
        return cached, filename
    why = unreachable()
    if why:
        raise error(f"{repo}:{filename}: not in the local Hugging Face cache and the Hub cannot be reached "
                    f"({why}); offline? {how}")
    try:
        return huggingface_hub.hf_hub_download(repo_id=repo, filename=filename), filename
    except Exception as e:  # no such repo/file, HTTP errors, a dropped connection: all end the same way
        text = str(e).strip()
        first = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
        raise error(f"{repo}:{filename}: download failed ({first}); offline? {how}") from None
