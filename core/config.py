"""The one typed config tree of SaEI-RL: loading, overrides and `--help-config` text.

The dataclasses of core/config_schema.py are the only defaults; each field's docstring (the string
literal under it) is its documentation, which `describe()` prints for `--help-config`. YAML files in
configs/ and `key=value` overrides (OmegaConf dotlist) are merged over them by `load_config`. An
unknown key, a wrong type or an impossible value (core/config_checks.py) is a `ConfigError` naming
the key (with the nearest valid key for a typo) before anything starts.

Import the tree, its errors and its loader from here: this module re-exports the section classes.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import textwrap
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from core.config_checks import CHOICES, ConfigError, validate
from core.config_schema import (
    AdversaryConfig,
    ClusterConfig,
    Config,
    DataConfig,
    LearnerConfig,
    LoggingConfig,
    ModelConfig,
    RolloutConfig,
    RunConfig,
    SamplingConfig,
    SyntheticConfig,
    TsecConfig,
)

__all__ = [
    "CHOICES", "AdversaryConfig", "ClusterConfig", "Config", "ConfigError", "DataConfig", "LearnerConfig",
    "LoggingConfig", "ModelConfig", "RolloutConfig", "RunConfig", "SamplingConfig", "SyntheticConfig",
    "TsecConfig", "all_keys", "describe", "field_docs", "load_config", "to_yaml", "validate",
]


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the tree, sections included (`run`, `run.name`, ...)."""
    keys = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        sub = _dataclass_type(cls, f.name)
        if sub is not None:
            keys += all_keys(sub, key + ".")
    return keys


def _dataclass_type(cls: type, name: str) -> type | None:
    default = next(f for f in fields(cls) if f.name == name).default_factory
    if callable(default):
        value = default()
        if is_dataclass(value):
            return type(value)
    return None


def _suggest(bad_key: str) -> str:
    keys = all_keys()
    leaves = [k for k in keys if "." in k and k.split(".")[0] in {f.name for f in fields(Config)}]
    leaf = bad_key.rsplit(".", 1)[-1]
    # A right name under the wrong section (`rollout.lr`) first, then a typo of the whole key.
    close = [k for k in leaves if k.rsplit(".", 1)[-1] == leaf][:1]
    close = close or difflib.get_close_matches(bad_key, keys, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _where(source: str | None) -> str:
    return f" (in {source})" if source else ""


def _merge(base, other, source: str | None):
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e)
        raise ConfigError(f"unknown config key '{key}'{_where(source)}{_suggest(key)}") from None
    except ValidationError as e:
        section = _scalar_on_section(base, other)
        if section:
            raise ConfigError(f"config key '{section}'{_where(source)} is a section: set its fields "
                              f"(e.g. {section}.<field>=...), not a value") from None
        expected = _expected_type(e.full_key)
        raise ConfigError(f"config key '{e.full_key}'{_where(source)}: {str(e.msg or e).splitlines()[0]}"
                          f"{f' (expected {expected})' if expected else ''}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"config{_where(source)}: {e}") from None


def _scalar_on_section(base, other, prefix: str = "") -> str | None:
    """The first dotted key where `other` puts a plain value over a section of `base`."""
    if not OmegaConf.is_dict(other):
        return None
    for key, value in other.items_ex(resolve=False) if hasattr(other, "items_ex") else other.items():
        sub = base.get(key) if OmegaConf.is_dict(base) else None
        if OmegaConf.is_dict(sub):
            if not OmegaConf.is_dict(value):
                return f"{prefix}{key}"
            found = _scalar_on_section(sub, value, f"{prefix}{key}.")
            if found:
                return found
    return None


def _expected_type(key: str | None) -> str | None:
    if not key:
        return None
    cls: Any = Config
    for part in key.split("[")[0].split("."):
        match = [f for f in fields(cls) if f.name == part] if is_dataclass(cls) else []
        if not match:
            return None
        sub = _dataclass_type(cls, part)
        if sub is None:
            t = match[0].type
            return t if isinstance(t, str) else getattr(t, "__name__", str(t))
        cls = sub
    return None


def load_config(yaml_path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Typed defaults, then the YAML file, then `key=value` overrides; validated.

    Raises ConfigError naming the key (and the nearest valid key for a typo) on an unknown key, a
    wrong type or an impossible value.
    """
    cfg = OmegaConf.structured(Config)
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry line numbers: keep them
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        cfg = _merge(cfg, loaded, str(path))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value")
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as e:
            raise ConfigError(f"bad override in {overrides}: {e}") from None
        cfg = _merge(cfg, dot, "command-line overrides")
    try:
        OmegaConf.resolve(cfg)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key '{getattr(e, 'full_key', '')}': {e}") from None
    validate(obj)
    return obj


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right under each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type = Config, prefix: str = "", obj: Any = None) -> str:
    """The config tree as text: `key: type = default  # doc`, one line per field (for --help)."""
    obj = obj if obj is not None else cls()
    docs = field_docs(cls)
    lines = []
    for f in fields(cls):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            lines.append(f"{key}:  # {docs.get(f.name, '')}")
            lines.append(describe(type(value), key + ".", value))
        else:
            t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            lines.append(f"  {key}: {t} = {value!r}  # {docs.get(f.name, '')}")
    return "\n".join(lines)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written into every run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
