"""The one registry of methods (peft's `register_peft_method` shape).

    register_method(name="var", config=VAR, runtime=VARRuntime, summary="visual attention redistribution")

once, where the method is defined, makes it known everywhere: `vlmfix.VAR`, attach (the config's
`bind`), the CLI's `--methods var[:PRESET]` and its `--help`, the presets in configs/methods/var.yaml,
and lmms-eval's `methods=var`. A package outside vlmfix registers its methods through an entry
point of group `vlmfix.methods` naming a module (or a callable) that calls `register_method`:

    [project.entry-points."vlmfix.methods"]
    mymethod = "mypackage.mymethod"

vlmfix's own methods are the modules of `vlmfix.methods` (each registers itself when imported);
they and the entry points are loaded on the first look-up of the registry (`methods()`); an entry
point that fails to load is an error that names it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from vlmfix.core.protocol import MethodConfig, Runtime

#: the entry-point group of third-party methods
GROUP = "vlmfix.methods"
#: modules of vlmfix.methods that define no method (every other module of the package is imported on the first
#: look-up and registers what it defines: a new built-in method is one new module)
NOT_METHODS = frozenset({"base", "registry", "debias", "predecoder"})


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its name (CLI, presets, lmms-eval), config and runtime classes, a one-line
    summary (`--help`), and whether the CLI lists it among the method sets (a report probe is not)."""

    name: str
    config: type[MethodConfig]
    runtime: type[Runtime]
    summary: str = ""
    listed: bool = True


_REGISTRY: dict[str, MethodEntry] = {}
_loaded = False


def register_method(*, name: str, config: type[MethodConfig], runtime: type[Runtime], summary: str = "",
                    listed: bool = True) -> MethodEntry:
    """Register a method once: `name` (lower case, no ',' ':' '+' or blanks) for `config` (a `MethodConfig`
    subclass) bound to `runtime` (a `Runtime` subclass). Sets `config.name` and `config.runtime`. Registering
    another config under a taken name, or one config under two names, is an error."""
    if not name or name != name.strip().lower() or any(c in name for c in ",:+ ") or name == "none":
        raise ValueError(f"method name {name!r}: give a lower-case word without ',', ':', '+' or blanks (not 'none')")
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise TypeError(f"register_method: config must be a MethodConfig subclass, got {config!r}")
    if not (isinstance(runtime, type) and issubclass(runtime, Runtime)):
        raise TypeError(f"register_method: runtime must be a Runtime subclass, got {runtime!r}")
    old = _REGISTRY.get(name)
    if old is not None and old.config is not config:
        raise ValueError(f"method name {name!r} is taken by {old.config.__module__}.{old.config.__name__}")
    other = next((e.name for e in _REGISTRY.values() if e.config is config and e.name != name), None)
    if other is not None:
        raise ValueError(f"{config.__name__} is already registered as {other!r}")
    config.name, config.runtime = name, runtime
    entry = _REGISTRY[name] = MethodEntry(name, config, runtime, summary, listed)
    return entry


def unregister_method(name: str) -> None:
    """Remove a registered method (tests; a package replacing its own method)."""
    entry = _REGISTRY.pop(name, None)
    if entry is not None:
        entry.config.runtime = None


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = importlib.import_module("vlmfix.methods")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in NOT_METHODS:
            importlib.import_module(f"vlmfix.methods.{info.name}")
    for ep in entry_points(group=GROUP):
        try:
            loaded = ep.load()
        except Exception as err:  # a broken third-party package: say which
            raise ImportError(f"the vlmfix method entry point {ep.name!r} ({ep.value}) failed to load: {err}") from err
        if callable(loaded) and not isinstance(loaded, type):
            loaded()


def methods() -> dict[str, MethodEntry]:
    """Every registered method by name (vlmfix's own and the entry points'), in alphabetical order."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def method(name: str) -> MethodEntry:
    """The registered method `name`; an unknown name is a ValueError that lists the known ones."""
    found = methods().get(name)
    if found is None:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(listed())}")
    return found


def listed() -> list[str]:
    """The names the CLI offers as method sets."""
    return [n for n, e in methods().items() if e.listed]


def config_class(class_name: str) -> type[MethodConfig] | None:
    """The registered config class called `class_name` (`vlmfix.VAR`), or None."""
    return next((e.config for e in methods().values() if e.config.__name__ == class_name), None)


def build(name: str, preset: str | None = None, **overrides: Any) -> MethodConfig:
    """A method from its name, a preset of configs/methods/<name>.yaml, and keyword overrides."""
    from vlmfix.core.presets import method_preset

    return method(name).config(**{**method_preset(name, preset), **overrides})


def normal_spec(raw: str) -> str:
    """A method-set spec without blanks or empty items ("var, ,gift" -> "var,gift"; "" -> "none")."""
    return ",".join(part.strip() for part in str(raw).split(",") if part.strip()) or "none"


def parse_methods(spec: str) -> list[MethodConfig]:
    """"var,gift" or "var:general" (a preset of configs/methods/var.yaml) -> method configs; "none" -> []."""
    configs = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        if item == "none":
            continue
        name, _, preset = item.partition(":")
        configs.append(build(name, preset or None))
    return configs


def parse_value(text: str) -> Any:
    """A setting's value as YAML reads it: "0.4" -> 0.4, "3" -> 3, "true" -> True, "null" -> None, "[1, 2]" ->
    a list, anything else the string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_setting(text: str) -> tuple[str, str, str]:
    """"NAME.PARAM=VALUE" -> (NAME, PARAM, VALUE text), checked against the registry: an unknown method or
    parameter is a ValueError that lists what exists. "tau=VALUE" -> ("", "tau", VALUE text)."""
    key, eq, value = str(text).partition("=")
    key = key.strip()
    if not eq or not key or not value.strip():
        raise ValueError(f"setting {text!r}: write NAME.PARAM=VALUE (e.g. var.p=0.4) or tau=VALUE")
    if key == "tau":
        return "", "tau", value.strip()
    name, dot, param = key.partition(".")
    if not dot or not param:
        raise ValueError(f"setting {text!r}: write NAME.PARAM=VALUE (e.g. var.p=0.4) or tau=VALUE")
    try:
        entry = method(name)
    except ValueError as err:
        raise ValueError(f"setting {text!r}: {err}") from None
    fields = [f.name for f in dataclasses.fields(entry.config) if f.init]
    if param not in fields:
        raise ValueError(f"setting {text!r}: {name} has no parameter {param!r}; its parameters: {', '.join(fields)}")
    return name, param, value.strip()


def parse_settings(texts: Any) -> dict[str, dict[str, Any]]:
    """"NAME.PARAM=VALUE" settings -> {NAME: {PARAM: value}} ("tau=VALUE" under the name ""); a parameter
    given twice is an error."""
    found: dict[str, dict[str, Any]] = {}
    for text in texts or ():
        name, param, value = parse_setting(text)
        if param in found.get(name, {}):
            raise ValueError(f"setting {text!r}: {(name + '.') if name else ''}{param} is given twice")
        found.setdefault(name, {})[param] = parse_value(value)
    return found


def with_settings(configs: list[MethodConfig], settings: dict[str, dict[str, Any]]) -> list[MethodConfig]:
    """The configs with `settings` ({NAME: {PARAM: value}}, `parse_settings`) applied to the methods of
    those names (rebuilt, so each config validates its new values); settings of methods not in the list are
    left out, tau (name "") too."""
    return [dataclasses.replace(c, **settings[c.name]) if settings.get(c.name) else c for c in configs]
