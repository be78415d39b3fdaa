"""Folders that runs share (the synthetic data, the tiny policy and its bootstrap), each recording what built it.

A cache folder holds `built_with.json`: the settings that made it (the synthetic task's seed, size and
difficulty; the policy's architecture, data and warm-up settings). A run reuses a folder only when
those settings agree with its own. When they differ, the run neither takes the folder nor rebuilds
into it (that would destroy another run's cache: a user sweeping seeds or difficulties runs them side
by side): it uses a finished sibling `<folder>-*` that records its settings, else builds one keyed by
them, `<folder>-<key>`, and the log says so, naming each setting that differs with both values. A
caller names only the settings it cares about (the job asks for a bootstrapped policy of its data and
architecture, whatever the warm-up's step count). A folder built before settings were recorded is
reused with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.node_cache import default_cache_root

log = logging.getLogger("saei.caches")

STAMP = "built_with.json"


def settings_key(settings: dict) -> str:
    """A short, stable name for `settings` (the suffix of a keyed folder)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def read_stamp(folder: Path) -> dict | None:
    """The settings `folder` was built with; None when it records none."""
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


def write_stamp(folder: Path, settings: dict) -> None:
    """Record what built `folder` (written into the temporary folder before it is renamed into place)."""
    (folder / STAMP).write_text(json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as `{dotted.key: leaf}` (list items by index: `train_data.0.synthetic.seed`)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None:
        return {prefix.rstrip("."): value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}{key}."))
    return out


def differences(built: dict, wanted: dict) -> dict[str, tuple[Any, Any]]:
    """`dotted key -> (built value, wanted value)` for every setting of `wanted` that `built` does not
    share; what `wanted` leaves out is not compared (the caller accepts any value there)."""
    have = flatten(built)
    return {k: (have.get(k), v) for k, v in flatten(wanted).items()
            if json.dumps(have.get(k), default=str) != json.dumps(v, default=str)}


def resolve(path: Path, wanted: dict, what: str, done: Callable[[Path], bool]) -> Path:
    """Where the cache of `what` built with `wanted` lives: `path` when nothing finished is there or what
    is there was built with `wanted`; else a finished sibling `<path>-<key>` built with `wanted` (keys
    that `wanted` leaves out may hold anything), else `<path>-<key of wanted>`, to build (see the module
    docstring). `done(folder)` says whether a folder holds a finished cache."""
    if not done(path):
        return path
    built = read_stamp(path)
    if built is None:
        log.warning("%s at %s does not record the settings it was built with (built before they were "
                    "recorded): reusing it; delete it to rebuild with this run's settings", what, path)
        return path
    diff = differences(built, wanted)
    if not diff:
        return path
    siblings = sorted(p for p in path.parent.glob(f"{path.name}-*") if not p.name.endswith(".tmp") and done(p))
    found = next((p for p in siblings if not differences(read_stamp(p) or {}, wanted)), None)
    keyed = found or path.with_name(f"{path.name}-{settings_key(wanted)}")
    said = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in diff.items())
    log.warning("%s at %s was built with other settings (%s): this run uses %s (%s); %s stays as it is",
                what, path, said, keyed, "reusing it" if found else "building it", path)
    if not found and done(keyed):
        wrong = differences(read_stamp(keyed) or {}, wanted)
        raise ValueError(f"{what} at {keyed} does not match the settings its name stands for ({', '.join(wrong)} "
                         "differ): delete that folder to rebuild it")
    return keyed


def build_root(cfg) -> Path:
    """Where the driver keeps what it builds (synthetic data, the tiny policy): `run.output_dir`, or,
    when that is a storage URI, this node's cache (`$SAEI_CACHE_DIR/build`): only the driver reads these
    (the prompts travel through Ray, the policy through the object store), and a bootstrap is minutes
    of local compute, not something to stream to a bucket."""
    out = cfg.run.output_dir
    return default_cache_root() / "build" if "://" in out and not out.startswith("file://") else Path(out)


def localize_build_paths(cfg) -> None:
    """Point the defaults that name the driver's builds under a storage URI (`<output_dir>/data/synthetic/...`,
    `<output_dir>/tiny_policy/...`, as the config's interpolation makes them) at `build_root`."""
    out = cfg.run.output_dir.rstrip("/")
    root = build_root(cfg)
    if root == Path(out):
        return

    def local(p: str) -> str:
        for sub in ("/data/synthetic/", "/tiny_policy/"):
            if p.startswith(out + sub):
                return str(root / p[len(out) + 1:])
        return p

    cfg.data.train_files = [local(f) for f in cfg.data.train_files]
    cfg.data.test_files = [local(f) for f in cfg.data.test_files]
    if local(cfg.model.path) != cfg.model.path:
        cfg.model.path = local(cfg.model.path)
        log.info("run.output_dir is a storage URI: the tiny policy and the synthetic data are built in %s", root)
