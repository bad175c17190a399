"""Counterfactual explanation methods, registered by the declarations beside their classes.

Every module of this package that holds a module-level ``MethodDeclaration(...)`` registers that method and
its variants. The registry reads the declarations (and the constructors' defaults) from the source with
``ast``, so the web process lists, validates and plans methods without importing torch; ``method_class``
imports the method's module when a worker needs it. Adding a method is one new file here with its declaration.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from explain.methods import declaration as _declaration_module
from explain.methods.declaration import MethodDeclaration, Variant

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Registered:
    """A name a condition may carry: a method, or one of its variants, with the config it runs with."""

    name: str
    declaration: MethodDeclaration
    variant: Variant | None
    defaults: dict[str, Any] = field(repr=False)  # the constructor's defaults (the paper's)

    @property
    def method(self) -> str:
        return self.declaration.name

    def departures(self, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The settings of ``config`` that differ from the paper's defaults: {name: {default, value}}."""
        return {
            key: {"default": self.defaults.get(key), "value": value}
            for key, value in sorted(config.items())
            if key not in self.declaration.execution
            and (key not in self.defaults or self.defaults[key] != value)
        }

    def config(self) -> dict[str, Any]:
        """The constructor arguments this name runs with over the defaults (a variant's overrides)."""
        return dict(self.variant.overrides) if self.variant else {}


class RegistryError(Exception):
    """A method module's declaration cannot be read."""


def _evaluate(node: ast.expr, path: Path) -> MethodDeclaration:
    namespace = {k: v for k, v in vars(_declaration_module).items() if not k.startswith("_")}
    code = compile(ast.Expression(node), str(path), "eval")
    try:
        return eval(code, {"__builtins__": {"frozenset": frozenset}}, namespace)
    except Exception as exc:
        raise RegistryError(
            f"{path}:{node.lineno}: the method declaration uses something other than literals and the names "
            f"of explain.methods.declaration ({type(exc).__name__}: {exc}); write it with those only"
        ) from exc


def _defaults(tree: ast.Module, class_name: str, path: Path) -> dict[str, Any]:
    """The keyword defaults of ``class_name.__init__`` in ``tree`` (literals; others as their source)."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args
                    pairs = list(zip(args.kwonlyargs, args.kw_defaults, strict=True))
                    pairs += list(
                        zip(args.args[len(args.args) - len(args.defaults) :], args.defaults, strict=True)
                    )
                    found = {}
                    for arg, default in pairs:
                        if default is None:
                            continue  # a required argument (a model the platform fills)
                        try:
                            found[arg.arg] = ast.literal_eval(default)
                        except ValueError:
                            found[arg.arg] = ast.unparse(default)
                    return {k: list(v) if isinstance(v, tuple) else v for k, v in found.items()}
            raise RegistryError(
                f"{path}: class {class_name} has no __init__ of its own to read the defaults from"
            )
    raise RegistryError(f"{path}: no class {class_name} in the file that declares it")


def _read(path: Path) -> list[tuple[MethodDeclaration, dict[str, Any]]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in tree.body:
        value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
        if not (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Name)
            and value.func.id == "MethodDeclaration"
        ):
            continue
        declared = _evaluate(value, path)
        module_name, _, class_name = declared.target.partition(":")
        if module_name != f"{__name__}.{path.stem}":
            raise RegistryError(
                f"{path}: method {declared.name!r} declares target {declared.target!r}; a declaration sits "
                f"beside its class, so the target must be '{__name__}.{path.stem}:<Class>'"
            )
        found.append((declared, _defaults(tree, class_name, path)))
    return found


@functools.cache
def registry() -> dict[str, Registered]:
    """Every registered name (methods and variants) -> what it is; read once per process."""
    names: dict[str, Registered] = {}
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        for declared, defaults in _read(path):
            entries = [Registered(declared.name, declared, None, defaults)]
            entries += [Registered(v.name, declared, v, defaults) for v in declared.variants]
            for entry in entries:
                if entry.name in names:
                    raise RegistryError(
                        f"{path}: the name {entry.name!r} is registered twice (also by method "
                        f"{names[entry.name].method!r}); give it another name"
                    )
                unknown = sorted(set(entry.config()) - set(defaults))
                if unknown:
                    raise RegistryError(
                        f"{path}: variant {entry.name!r} overrides {', '.join(unknown)}, which "
                        f"{declared.target} does not take as a keyword argument with a default"
                    )
                names[entry.name] = entry
    return names


def method_names() -> list[str]:
    """The registered names a condition may carry (methods and variants), sorted."""
    return sorted(registry())


def declarations() -> list[MethodDeclaration]:
    """The registered methods' declarations (variants are inside them), by name."""
    return sorted(
        {e.declaration.name: e.declaration for e in registry().values()}.values(), key=lambda d: d.name
    )


def is_registered(name: str) -> bool:
    return name in registry()


def registered(name: str) -> Registered:
    """The method or variant registered as ``name``."""
    try:
        return registry()[name]
    except KeyError:
        known = ", ".join(method_names())
        raise KeyError(f"no counterfactual method is registered as {name!r}; registered: {known}") from None


def no_flip_names() -> list[str]:
    """Names whose regions are an attribution, shown whether or not they flip the decision (SCOUT)."""
    return sorted(n for n, e in registry().items() if not e.declaration.requires_flip)


def method_class(name: str):
    """The method class registered under ``name`` (a variant's method's class; imports torch)."""
    module_name, _, class_name = registered(name).declaration.target.partition(":")
    return getattr(import_module(module_name), class_name)
