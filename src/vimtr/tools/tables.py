"""The papers' tables as data: ``src/vimtr/assets/tables/*.toml``, read, expanded into rows and checked here.

A table file names the backbones (registered architecture, the official checkpoint file name, EMA or not,
where to download it), the rows (grids of backbone × method × FLOPs level or r, and explicit rows:
baselines, ablations, re-trained models) and the published numbers with their source and status
(``reported``, ``derived``, ``read from a figure``, ``qualitative``...). :func:`load_table` returns a
:class:`Table` whose :attr:`Table.rows` are the expanded :class:`Row` objects; :func:`validate` checks a
table without any data or weights: checkpoint names, methods, parameters, reachable FLOPs levels.

Schema (unknown keys are errors, so that a typo cannot silently drop a setting)::

    name, title, paper, data ("imagenet" | "digits" | "k400"), metric ("top1"), gflops_convention
    ("full" | "rmeeto"), notes = [...]
    [backbones.KEY]  label, model, checkpoint, ema, overrides = {...}, download, baseline_source
    [[grid]]         backbones = [...], methods = [...], levels = [...] | r = [...], params = {...}
    [[rows]]         backbone, method ("none" for the unreduced model), params = {...}, id, label,
                     retrained = {folder, epochs, model_ema, recipe = {...}}
    [[published]]    row, top1 | drop, gflops, status, source, note
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from vimtr.errors import UsageError

TABLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "tables"
DATA_KINDS = ("imagenet", "digits", "k400")
VIDEO_KINDS = ("k400",)
STATUSES = ("reported", "derived", "read from a figure", "qualitative", "not recovered")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")

_TABLE_KEYS = {"name", "title", "paper", "data", "metric", "gflops_convention", "notes", "backbones", "grid",
               "rows", "published"}
_BACKBONE_KEYS = {"label", "model", "checkpoint", "ema", "overrides", "download", "baseline_source"}
_GRID_KEYS = {"backbones", "methods", "levels", "r", "params", "label"}
_ROW_KEYS = {"backbone", "method", "params", "id", "label", "retrained"}
_RETRAINED_KEYS = {"folder", "epochs", "model_ema", "recipe", "source"}
_PUBLISHED_KEYS = {"row", "top1", "drop", "gflops", "status", "source", "note"}


@dataclass(frozen=True)
class Backbone:
    key: str
    label: str
    model: str
    checkpoint: str
    ema: bool = False
    overrides: dict = field(default_factory=dict)
    download: str = ""


@dataclass
class Row:
    id: str
    backbone: Backbone
    method: str | None  # None: the unreduced model
    params: dict
    label: str = ""
    retrained: dict | None = None  # {folder, epochs, model_ema, recipe}
    published: dict = field(default_factory=dict)  # {top1, drop, gflops, status, source, note}

    @property
    def kind(self) -> str:
        return "baseline" if self.method is None else ("retrained" if self.retrained else "training-free")

    def spec(self) -> dict:
        """What the row computes (stored with its result: a changed definition is computed again)."""
        return {"id": self.id, "model": self.backbone.model, "checkpoint": self.checkpoint_name,
                "ema": self.backbone.ema, "overrides": self.backbone.overrides, "method": self.method,
                "params": self.params, "retrained": self.retrained}

    @property
    def checkpoint_name(self) -> str:
        return self.retrained["folder"] if self.retrained else self.backbone.checkpoint

    def setting(self) -> str:
        if self.method is None:
            return "unreduced"
        text = self.method + "".join(f" {k}={v}" for k, v in self.params.items())
        return text + (f", re-trained {self.retrained['epochs']} ep" if self.retrained else "")


@dataclass
class Table:
    name: str
    title: str
    paper: str
    data: str
    metric: str
    gflops_convention: str
    notes: list
    backbones: dict
    rows: list
    path: Path

    @property
    def video(self) -> bool:
        return self.data in VIDEO_KINDS

    def row(self, row_id: str) -> Row:
        for r in self.rows:
            if r.id == row_id:
                return r
        raise KeyError(row_id)


def available() -> dict[str, Path]:
    """Shipped tables: name -> file."""
    return {p.stem: p for p in sorted(TABLES_DIR.glob("*.toml"))}


def _unknown(where: str, given: dict, allowed: set):
    bad = sorted(set(given) - allowed)
    if bad:
        raise UsageError(f"{where}: unknown key(s) {bad}; allowed: {', '.join(sorted(allowed))}")


def _level_id(params: dict) -> str:
    if "flops_reduction" in params:
        return f"fr{params['flops_reduction']:g}"
    if "r" in params:
        return f"r{params['r']}"
    return ""


def load_table(name_or_path) -> Table:
    """A shipped table by name (``vimtr reproduce --list``) or a table file path, parsed and expanded."""
    path = Path(str(name_or_path)).expanduser()
    if not (path.suffix == ".toml" and path.is_file()):
        tables = available()
        if str(name_or_path) not in tables:
            raise UsageError(f"unknown table {str(name_or_path)!r}; shipped tables: {', '.join(tables)} "
                             "(or give the path of a .toml table file)")
        path = tables[str(name_or_path)]
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    return parse_table(raw, path)


def parse_table(raw: dict, path: Path) -> Table:
    where = str(path)
    _unknown(where, raw, _TABLE_KEYS)
    for key in ("name", "title", "data", "backbones"):
        if key not in raw:
            raise UsageError(f"{where}: missing required key {key!r}")
    if raw["data"] not in DATA_KINDS:
        raise UsageError(f"{where}: data must be one of {DATA_KINDS}, got {raw['data']!r}")
    convention = raw.get("gflops_convention", "full")
    if convention not in ("full", "rmeeto"):
        raise UsageError(f"{where}: gflops_convention must be 'full' or 'rmeeto', got {convention!r}")
    backbones = {}
    for key, b in raw["backbones"].items():
        _unknown(f"{where}: backbones.{key}", b, _BACKBONE_KEYS)
        for need in ("model", "checkpoint"):
            if need not in b:
                raise UsageError(f"{where}: backbones.{key} needs {need!r}")
        backbones[key] = Backbone(key, b.get("label", key), b["model"], b["checkpoint"], bool(b.get("ema", False)),
                                  dict(b.get("overrides", {})), b.get("download", ""))

    def backbone(key, ctx):
        if key not in backbones:
            raise UsageError(f"{where}: {ctx} names backbone {key!r}; defined: {', '.join(backbones)}")
        return backbones[key]

    rows: list[Row] = []
    for i, g in enumerate(raw.get("grid", [])):
        ctx = f"grid[{i}]"
        _unknown(f"{where}: {ctx}", g, _GRID_KEYS)
        if ("levels" in g) == ("r" in g):
            raise UsageError(f"{where}: {ctx} needs exactly one of 'levels' (flops_reduction) or 'r'")
        settings = [{"flops_reduction": v} for v in g.get("levels", [])] + [{"r": v} for v in g.get("r", [])]
        for bkey in g.get("backbones", []):
            for method in g.get("methods", []):
                for s in settings:
                    params = {**g.get("params", {}), **s}
                    rows.append(Row(f"{bkey}-{method}-{_level_id(params)}", backbone(bkey, ctx), method, params,
                                    g.get("label", "")))
    for i, r in enumerate(raw.get("rows", [])):
        ctx = f"rows[{i}]"
        _unknown(f"{where}: {ctx}", r, _ROW_KEYS)
        if "backbone" not in r or "method" not in r:
            raise UsageError(f"{where}: {ctx} needs 'backbone' and 'method' ('none' for the unreduced model)")
        method = None if r["method"] == "none" else r["method"]
        params = dict(r.get("params", {}))
        retrained = r.get("retrained")
        if retrained is not None:
            _unknown(f"{where}: {ctx}.retrained", retrained, _RETRAINED_KEYS)
            if "folder" not in retrained or "epochs" not in retrained:
                raise UsageError(f"{where}: {ctx}.retrained needs 'folder' (the released checkpoint's name) and "
                                 "'epochs'")
            if method is None:
                raise UsageError(f"{where}: {ctx} is re-trained but has no method")
        default_id = f"{r['backbone']}-{'baseline' if method is None else method}"
        default_id += f"-{_level_id(params)}" if method and _level_id(params) else ""
        default_id += "-retrained" if retrained else ""
        rows.append(Row(r.get("id", default_id), backbone(r["backbone"], ctx), method, params, r.get("label", ""),
                        dict(retrained) if retrained else None))
    # Presentation order: per backbone (as defined), the unreduced row, the training-free rows, the re-trained.
    rank = {"baseline": 0, "training-free": 1, "retrained": 2}
    keys = list(backbones)
    rows.sort(key=lambda r: (keys.index(r.backbone.key), rank[r.kind]))
    ids = [r.id for r in rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UsageError(f"{where}: duplicate row id(s) {dupes}; give explicit 'id's")
    by_id = {r.id: r for r in rows}
    for i, p in enumerate(raw.get("published", [])):
        ctx = f"published[{i}]"
        _unknown(f"{where}: {ctx}", p, _PUBLISHED_KEYS)
        if p.get("row") not in by_id:
            raise UsageError(f"{where}: {ctx} refers to row {p.get('row')!r}, which the table does not define; rows: "
                             f"{', '.join(ids)}")
        if p.get("status") not in STATUSES:
            raise UsageError(f"{where}: {ctx} status must be one of {STATUSES}, got {p.get('status')!r}")
        if not p.get("source"):
            raise UsageError(f"{where}: {ctx} needs a 'source' (where the number comes from)")
        if p["status"] not in ("qualitative", "not recovered") and not ({"top1", "drop", "gflops"} & set(p)):
            raise UsageError(f"{where}: {ctx} has status {p['status']!r} but no number (top1, drop or gflops)")
        by_id[p["row"]].published = {k: v for k, v in p.items() if k != "row"}
    return Table(raw["name"], raw["title"], raw.get("paper", ""), raw["data"], raw.get("metric", "top1"),
                 convention, list(raw.get("notes", [])), backbones, rows, path)


def validate(table: Table, models: dict | None = None) -> list[str]:
    """Check every row without data or weights; returns the problems found (empty: the table is sound).

    Checkpoint names must be file names with a checkpoint suffix; each backbone's architecture must be
    registered (built once per architecture, randomly initialised); each row's method and parameters
    must be accepted by :func:`vimtr.reduce` on it, which also proves its FLOPs level reachable.
    ``models``: a cache {(model, overrides): model} shared across tables."""
    import vimtr

    problems = []
    for b in table.backbones.values():
        if "/" in b.checkpoint or not b.checkpoint.endswith(CHECKPOINT_SUFFIXES):
            problems.append(f"backbone {b.key}: checkpoint {b.checkpoint!r} is not a file name ending in one of "
                            f"{CHECKPOINT_SUFFIXES}")
    models = {} if models is None else models
    for b in table.backbones.values():
        key = (b.model, tuple(sorted(b.overrides.items())))
        if key in models:
            continue
        try:
            models[key] = vimtr.create_model(b.model, **b.overrides)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"backbone {b.key}: cannot build {b.model!r} with {b.overrides}: {e}")
    for row in table.rows:
        b = row.backbone
        model = models.get((b.model, tuple(sorted(b.overrides.items()))))
        if model is None:
            continue
        if row.retrained:
            if "/" in row.retrained["folder"]:
                problems.append(f"row {row.id}: retrained folder {row.retrained['folder']!r} must be a plain name")
            problem = _check_recipe(row)
            if problem:
                problems.append(problem)
        if row.method is None:
            if row.params:
                problems.append(f"row {row.id}: the unreduced model takes no params, got {row.params}")
            continue
        try:
            vimtr.reduce(model, row.method, **row.params)
        except (TypeError, ValueError) as e:
            problems.append(f"row {row.id}: {row.method} with {row.params} is refused: {e}")
        finally:
            vimtr.restore(model)
    return problems


def recipe_argv(recipe: dict) -> list[str]:
    """A re-trained row's extra ``vimtr retrain`` options ({"model_ema": true, "base_lr": 2e-5}) as arguments."""
    out = []
    for key, value in recipe.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


def _check_recipe(row: Row) -> str | None:
    """The row's recipe must be options ``vimtr retrain`` accepts (parsed, nothing run)."""
    import argparse

    from vimtr.engine import train

    if not isinstance(row.retrained.get("epochs"), int) or row.retrained["epochs"] < 1:
        return f"row {row.id}: retrained.epochs must be a positive integer, got {row.retrained.get('epochs')!r}"
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # report, do not print usage and exit
            raise ValueError(message)

    parser = Parser(prog="vimtr")
    train.add_cli(parser.add_subparsers(dest="command", required=True))
    argv = ["retrain", "--data", "x", "--output", "x", *recipe_argv(row.retrained.get("recipe", {}))]
    try:
        parser.parse_args(argv)
    except ValueError as e:
        return f"row {row.id}: retrained.recipe {row.retrained.get('recipe')} is not valid vimtr retrain options: {e}"
    return None
