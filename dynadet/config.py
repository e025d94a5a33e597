"""YAML configs: presets, ``_base_`` inheritance, dotted overrides and ``build``.

A config mirrors the constructor tree of a detector one-to-one. Any mapping with a ``type`` key
is a constructor call ``registry[type](**other_keys)``; ``build`` performs those calls from the
leaves up with one explicit name → class mapping passed in by the caller. Modules never see the
config.

File-level features (handled by :func:`load_config`):

- ``_base_: other.yaml`` (or a list of them): a path relative to the including file, or a
  packaged preset name. Bases are deep-merged in order, then the file itself: mappings merge,
  lists and scalars replace. A mapping holding ``_replace_: true`` replaces the base mapping
  instead of merging into it (e.g. swapping a ResNet backbone for a Swin one).
- Overrides ``a.b.c=value`` (values parsed as YAML; list items addressed by index ``a.b.0=1``).
  Unknown keys are refused with "did you mean" suggestions unless written ``+a.b.c=value``.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "ConfigError",
    "build",
    "dump_config",
    "get_by_dotted",
    "list_presets",
    "load_config",
    "save_config",
    "set_by_dotted",
]

_YAML_SUFFIXES = (".yaml", ".yml")
_MISSING = object()


class ConfigError(ValueError):
    """A config cannot be read, merged, overridden or built; the message says where and why."""


# ----------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float and refuses duplicate keys.

    PyYAML follows YAML 1.1, where a float needs a dot, so ``lr: 1e-4`` would silently become a
    string; and a repeated key would silently drop the first value.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key '{key_node.value}'", key_node.start_mark,
                )
            seen.add(ident)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _Dumper(yaml.SafeDumper):
    """SafeDumper without ``&id001`` anchors when one object appears twice in a config."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _parse_yaml(text: str, label: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader derives from SafeLoader: no objects
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = "; ".join(p for p in (err.context, err.problem) if p)
        raise ConfigError(f"{label}: invalid YAML{where}: {problem}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{label}: invalid YAML: {err}") from err


def dump_config(cfg: Mapping[str, Any]) -> str:
    """Render a config as YAML text, keeping key order; :func:`load_config` reads it back."""
    return yaml.dump(
        _plain(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=None,
        allow_unicode=True, width=100,
    )


def save_config(cfg: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``dump_config(cfg)`` to ``path`` atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dump_config(cfg))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain(node: Any) -> Any:
    """Tuples → lists and paths → strings, so SafeDumper accepts configs edited from Python."""
    if isinstance(node, Mapping):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    if isinstance(node, os.PathLike):
        return os.fspath(node)
    return node


# ----------------------------------------------------------------------------- presets


def _preset_root() -> Traversable:
    return resources.files("dynadet").joinpath("configs")


def list_presets() -> list[str]:
    """Names of the packaged presets: paths under ``dynadet/configs`` without ``.yaml``, sorted."""

    def walk(node: Traversable, prefix: str) -> Iterator[str]:
        for child in node.iterdir():
            if child.name.startswith("_"):  # partial configs (bases), not presets
                continue
            if child.is_dir():
                yield from walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(_YAML_SUFFIXES):
                yield prefix + child.name.rsplit(".", 1)[0]

    root = _preset_root()
    return sorted(walk(root, "")) if root.is_dir() else []


def _preset_file(name: str) -> Traversable:
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    for suffix in _YAML_SUFFIXES:
        node = _preset_root()
        for part in (stem + suffix).split("/"):
            node = node.joinpath(part)
        if node.is_file():
            return node
    raise FileNotFoundError(name)


def _close_presets(name: str) -> list[str]:
    presets = list_presets()
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    close = difflib.get_close_matches(stem, presets, n=5, cutoff=0.5)
    by_leaf = {p.rsplit("/", 1)[-1]: p for p in presets}
    leaf = stem.rsplit("/", 1)[-1]
    close += [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.6)]
    return list(dict.fromkeys(close))[:5]


def _unknown_preset(name: str, extra: str = "") -> ConfigError:
    close = _close_presets(name)
    if close:
        hint = f"; did you mean {_quoted(close)}?"
    else:
        presets = list_presets()
        shown = ", ".join(presets[:20]) + (", ..." if len(presets) > 20 else "")
        hint = f"; packaged presets: {shown}" if presets else "; no presets are packaged"
    return ConfigError(f"unknown config preset '{name}'{extra}{hint}")


def _is_preset(name: str) -> bool:
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    return stem in list_presets()


# ----------------------------------------------------------------------------- loading


def load_config(
    name_or_path: str | os.PathLike[str] | Mapping[str, Any], overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Read a config with its ``_base_`` chain resolved and ``overrides`` applied.

    ``name_or_path`` is a preset name (see :func:`list_presets`), a YAML file path, or an
    already-loaded mapping (deep-copied; a ``_base_`` in it is resolved from the working
    directory). ``overrides`` are ``"a.b=value"`` / ``"+a.b=value"`` strings, applied in order.
    Returns a fresh plain dict without ``_base_`` / ``_replace_`` keys.
    """
    if isinstance(name_or_path, Mapping):
        cfg = _resolve_bases(copy.deepcopy(dict(name_or_path)), Path.cwd(), None, [])
    else:
        cfg = _load_source(_source_of(name_or_path), [])
    for item in overrides:
        _apply_override(cfg, item)
    return cfg


def _source_of(name_or_path: str | os.PathLike[str]) -> tuple[str, str]:
    """``("file", path)`` or ``("preset", name)`` for a user-given name."""
    if isinstance(name_or_path, os.PathLike):
        return "file", os.fspath(name_or_path)
    text = str(name_or_path)
    if Path(text).is_file():
        return "file", text
    if _is_preset(text):
        return "preset", text.removesuffix(".yaml").removesuffix(".yml")
    if text.endswith(_YAML_SUFFIXES) or Path(text).exists():
        return "file", text  # reading it reports what is wrong (missing, a folder, ...)
    raise _unknown_preset(text, " (and no such file)")


def _load_source(source: tuple[str, str], chain: list[str]) -> dict[str, Any]:
    kind, ref = source
    if kind == "file":
        path = Path(ref).expanduser().resolve()
        key, label, base_dir, base_preset = str(path), str(path), path.parent, None
    else:
        key, label, base_dir, base_preset = f"preset:{ref}", f"preset '{ref}'", None, ref
    if key in chain:
        names = [c.removeprefix("preset:") for c in [*chain, key]]
        raise ConfigError("cyclic _base_ chain: " + " -> ".join(names))
    try:
        if kind == "file":
            text = path.read_text(encoding="utf-8")
        else:
            file = _preset_file(ref)
            label = f"preset '{ref}' ({file})"
            text = file.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        origin = f" (named in the _base_ of {chain[-1].removeprefix('preset:')})" if chain else ""
        if kind == "preset":
            raise _unknown_preset(ref, origin) from err
        close = _close_presets(Path(ref).stem)
        hint = f"; packaged presets with a close name: {_quoted(close)}" if close else ""
        raise ConfigError(f"config file not found: {label}{origin}{hint}") from err
    except OSError as err:
        raise ConfigError(f"cannot read config {label}: {err}") from err
    data = _parse_yaml(text, label)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: a config must be a mapping at top level, got "
                          f"{type(data).__name__}")
    return _resolve_bases(data, base_dir, base_preset, [*chain, key], label)


def _resolve_bases(
    data: dict[str, Any], base_dir: Path | None, base_preset: str | None, chain: list[str],
    label: str = "config",
) -> dict[str, Any]:
    bases = data.pop("_base_", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{label}: _base_ must be a string or a list of strings, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        source = _base_source(base, base_dir, base_preset, label)
        merged = _merge(merged, _load_source(source, chain))
    return _merge(merged, data)


def _base_source(
    base: str, base_dir: Path | None, base_preset: str | None, label: str
) -> tuple[str, str]:
    """Where a ``_base_`` entry points: a YAML path relative to its file, else a preset name."""
    if not base.endswith(_YAML_SUFFIXES):
        return "preset", base
    if base_preset is not None:
        # Inside a packaged preset a relative path is another preset (works from a zip too).
        name = posixpath.normpath(posixpath.join(posixpath.dirname(base_preset), base))
        if name.startswith("../") or posixpath.isabs(name):
            raise ConfigError(f"{label}: _base_ '{base}' points outside the packaged presets")
        return "preset", name.removesuffix(".yaml").removesuffix(".yml")
    path = Path(base).expanduser()
    path = path if path.is_absolute() else (base_dir or Path.cwd()) / path
    if not path.exists() and _is_preset(base):
        return "preset", base.removesuffix(".yaml").removesuffix(".yml")
    return "file", str(path)


def _merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge recursively, everything else (lists too) replaces."""
    out = dict(base)
    for key, value in child.items():
        if key == "_replace_":
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and not value.get(
            "_replace_", False
        ):
            out[key] = _merge(out[key], value)
        else:
            out[key] = _merge({}, value) if isinstance(value, Mapping) else value
    return out


# ----------------------------------------------------------------------------- dotted keys


def _quoted(items: Sequence[str]) -> str:
    return ", ".join(f"'{i}'" for i in items)


def _split_key(key: str) -> list[str]:
    parts = key.split(".")
    if not key or any(p == "" for p in parts):
        raise ConfigError(f"malformed config key '{key}' (expected names joined by dots)")
    return parts


def _dotted_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{prefix}{key}"
            yield path
            yield from _dotted_keys(value, path + ".")


def _suggest(cfg: Any, parent: Any, parent_path: str, part: str, key: str) -> list[str]:
    """Close matches among the siblings of ``part``, then among every dotted key of ``cfg``."""
    prefix = f"{parent_path}." if parent_path else ""
    found: list[str] = []
    if isinstance(parent, Mapping):
        siblings = [str(k) for k in parent]
        found += [prefix + m for m in difflib.get_close_matches(part, siblings, n=3, cutoff=0.6)]
    everything = list(_dotted_keys(cfg))
    found += difflib.get_close_matches(key, everything, n=3, cutoff=0.8)
    # A key given without its section ("num_classes=3") matches by its last name.
    leaves: dict[str, list[str]] = {}
    for dotted in everything:
        leaves.setdefault(dotted.rsplit(".", 1)[-1], []).append(dotted)
    for leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=2, cutoff=0.8):
        found += leaves[leaf]
    return list(dict.fromkeys(found))[:5]


def _dict_key(node: Mapping[Any, Any], part: str) -> Any:
    """The actual key for ``part`` (YAML may have int keys such as category ids)."""
    if part not in node and part.lstrip("-").isdigit() and int(part) in node:
        return int(part)
    return part


def _list_index(node: list[Any], part: str, key: str, path: str, allow_append: bool) -> int:
    try:
        index = int(part)
    except ValueError:
        raise ConfigError(
            f"config key '{key}': '{path}' is a list, so '{part}' must be an integer index"
        ) from None
    if -len(node) <= index < len(node) or (allow_append and index == len(node)):
        return index
    raise ConfigError(f"config key '{key}': index {index} out of range for '{path}' "
                      f"(a list of length {len(node)})")


def _missing(cfg: Any, parent: Any, parts: list[str], i: int, key: str, adding: bool) -> NoReturn:
    parent_path = ".".join(parts[:i])
    where = f"'{parent_path}' has no key '{parts[i]}'" if i else f"no top-level key '{parts[i]}'"
    close = _suggest(cfg, parent, parent_path, parts[i], key)
    msg = f"unknown config key '{key}': {where}"
    if close:
        msg += f"; did you mean {_quoted(close)}?"
    if adding:
        msg += f" To add a new key write '+{key}=...'."
    raise ConfigError(msg)


def _descend(cfg: Any, key: str, create: bool, adding_hint: bool) -> tuple[Any, Any]:
    """Walk to the container of the last part; returns (container, its dict key or index)."""
    parts = _split_key(key)
    node = cfg
    for i, part in enumerate(parts):
        path = ".".join(parts[:i])
        last = i == len(parts) - 1
        if isinstance(node, dict):
            k = _dict_key(node, part)
            if last:
                if k not in node and not create:
                    _missing(cfg, node, parts, i, key, adding_hint)
                return node, k
            if k not in node:
                if not create:
                    _missing(cfg, node, parts, i, key, adding_hint)
                node[k] = {}
            node = node[k]
        elif isinstance(node, list):
            index = _list_index(node, part, key, path, allow_append=last and create)
            if last:
                return node, index
            node = node[index]
        else:
            raise ConfigError(f"config key '{key}': '{path}' is a {type(node).__name__} "
                              f"({node!r}), not a mapping or a list")
    raise AssertionError("unreachable")


def get_by_dotted(cfg: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    """``cfg["a"]["b"][0]`` for ``key="a.b.0"``; ``default`` if given and the key is absent.

    Raises ConfigError with "did you mean" suggestions when the key is absent and no default.
    """
    try:
        parent, k = _descend(cfg, key, create=False, adding_hint=False)
    except ConfigError:
        if default is _MISSING:
            raise
        return default
    return parent[k]


def set_by_dotted(cfg: dict[str, Any], key: str, value: Any, *, create: bool = False) -> None:
    """Set ``cfg["a"]["b"][0] = value`` for ``key="a.b.0"``, in place.

    With ``create=False`` every part must already exist (ConfigError with suggestions
    otherwise); ``create=True`` adds missing mapping keys (and appends at index ``len(list)``).
    """
    parent, k = _descend(cfg, key, create=create, adding_hint=not create)
    if isinstance(parent, list) and k == len(parent):
        parent.append(value)
    else:
        parent[k] = value


def _apply_override(cfg: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key.lstrip("+"):
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.lr=0.01)")
    value = _parse_yaml(text, f"override '{item}'")
    create = key.startswith("+")
    set_by_dotted(cfg, key.removeprefix("+"), value, create=create)


# ----------------------------------------------------------------------------- build


def build(node: Any, registry: Mapping[str, Callable[..., Any]], *, path: str = "") -> Any:
    """Instantiate every ``{type: Name, **kwargs}`` mapping in ``node``, leaves first.

    ``registry`` maps type names to classes or factories. Mappings without ``type`` stay dicts
    (their values built), lists are built element-wise, other values are returned unchanged.
    ``path`` is the dotted location of ``node`` used in error messages (e.g. ``"model"`` when
    building ``cfg["model"]``). Keyword names and required arguments are checked against the
    callable's signature before anything is constructed; errors raise ConfigError.
    """
    if isinstance(node, Mapping):
        if "type" not in node:
            return {k: build(v, registry, path=_join(path, k)) for k, v in node.items()}
        factory, name = _lookup(node["type"], registry, path)
        kwargs = {k: v for k, v in node.items() if k != "type"}
        _check_signature(factory, name, kwargs, path)
        built = {k: build(v, registry, path=_join(path, k)) for k, v in kwargs.items()}
        try:
            return factory(**built)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{_where(path)}: {name}(...) failed: "
                              f"{type(err).__name__}: {err}") from err
    if isinstance(node, (list, tuple)):
        return [build(v, registry, path=_join(path, i)) for i, v in enumerate(node)]
    return node


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _where(path: str) -> str:
    return path or "<config root>"


def _lookup(
    name: Any, registry: Mapping[str, Callable[..., Any]], path: str
) -> tuple[Callable[..., Any], str]:
    where = _join(path, "type")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: type must be a class name (string), got {name!r}")
    if name in registry:
        return registry[name], name
    known = sorted(registry)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    lower = {k.lower(): k for k in known}
    if name.lower() in lower:
        close.insert(0, lower[name.lower()])
    close = list(dict.fromkeys(close))
    hint = f"did you mean {_quoted(close)}?" if close else f"known types: {', '.join(known)}"
    raise ConfigError(f"{where}: unknown type '{name}'; {hint}")


def _check_signature(
    factory: Callable[..., Any], name: str, kwargs: Mapping[str, Any], path: str
) -> None:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call itself complain
    by_keyword = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    accepted = [p.name for p in by_keyword]
    problems: list[str] = []
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        for key in kwargs:
            if key in accepted:
                continue
            close = difflib.get_close_matches(str(key), accepted, n=2, cutoff=0.6)
            hint = f"; did you mean {_quoted(close)}?" if close else ""
            problems.append(f"{_join(path, key)}: {name} has no parameter '{key}'{hint}")
    required = [p.name for p in params if p.default is p.empty and p.kind not in (
        p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [r for r in required if r not in kwargs]
    if missing:
        problems.append(f"{_where(path)}: {name} is missing required argument(s) "
                        f"{_quoted(missing)}")
    if problems:
        signature = f"{name} accepts: {', '.join(accepted) or '(no keyword arguments)'}"
        raise ConfigError("\n".join([*problems, signature]))
