"""Registration of l1l2_rs' regularizer classes with Keras 3 and tf-keras, without importing them.

Keras writes a registered class into model configs under its key (``"l1l2_rs>L1L2"``) and finds it
there again on load, so a ``.keras``/``.h5`` file, a JSON config or ``clone_model`` brings back
l1l2_rs' class with its exact factors, with no ``custom_objects``. Unregistered, Keras would
write the bare class name and load its own ``L1L2`` in its place.

``import l1l2_rs`` must not import Keras or TensorFlow (seconds each). A framework already imported
is registered with at once; otherwise a ``sys.meta_path`` finder waits for its import: it hands the
import to the other finders and wraps the loader so that the classes are registered right after
the package has finished executing, then steps aside. Classes decorated later with
``register_regularizer`` are registered with every framework already done, and remembered for the
others.

tf-keras loads ``.h5`` files (and SavedModels) with its legacy deserializer, which looks a class
up by ``class_name`` alone and so would load its own ``L1L2`` for ours, although the file records
our registered key. For configs whose ``registered_name`` is one of the keys registered here (and
whose module and class name match that class), the legacy lookup is given the key instead; every
other config, tf-keras' own classes included, is untouched.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

#: The Keras packages a class is registered with: Keras 3 and tf-keras (Keras 2 on TensorFlow).
FRAMEWORKS = ("keras", "tf_keras")

#: Every class to register, by its key ("package>name").
_CLASSES: dict[str, type] = {}

#: The frameworks the classes have been registered with.
_DONE: set[str] = set()


def register(cls: type, key: str) -> None:
    """Register ``cls`` under ``key`` with every framework imported so far, and the later ones."""
    _CLASSES[key] = cls
    for framework in _DONE:
        _register_class(sys.modules[framework], framework, key, cls)


def install() -> None:
    """Register with the frameworks already imported; wait for the others' imports."""
    for framework in FRAMEWORKS:
        if _finished_importing(sys.modules.get(framework)):
            _register_all(framework)
    if len(_DONE) < len(FRAMEWORKS) and not any(
        isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterAfterImport())


def _finished_importing(module: ModuleType | None) -> bool:
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


def _register_all(framework: str) -> None:
    if framework in _DONE:
        return
    _DONE.add(framework)
    for key, cls in list(_CLASSES.items()):
        _register_class(sys.modules[framework], framework, key, cls)
    if framework == "tf_keras":
        _resolve_registered_names_in_legacy_loads()


_TF_KERAS_LEGACY = "tf_keras.src.saving.legacy.serialization"
_LEGACY_LOOKUP = "class_and_config_for_serialized_keras_object"


def _resolve_registered_names_in_legacy_loads() -> None:
    """Make tf-keras' legacy (``.h5``) loader find our classes by the key it saved them under."""
    legacy = sys.modules.get(_TF_KERAS_LEGACY)
    original = getattr(legacy, _LEGACY_LOOKUP, None)
    if original is None or getattr(original, "_l1l2_rs_resolves_keys", False):
        return

    @functools.wraps(original)
    def lookup(config: Any, *args: Any, **kwargs: Any) -> Any:
        return original(_by_registered_key(config), *args, **kwargs)

    lookup._l1l2_rs_resolves_keys = True  # type: ignore[attr-defined]
    setattr(legacy, _LEGACY_LOOKUP, lookup)


def _by_registered_key(config: Any) -> Any:
    """``config`` with its ``class_name`` replaced by its registered key, if it names our class."""
    if not isinstance(config, dict):
        return config
    key = config.get("registered_name")
    cls = _CLASSES.get(key) if isinstance(key, str) else None
    if cls is None or config.get("class_name") != cls.__name__:
        return config
    if config.get("module") != cls.__module__:
        return config
    return {**config, "class_name": key}


def _register_class(module: Any, framework: str, key: str, cls: type) -> None:
    try:
        saving = module.saving if framework == "keras" else module.utils
        existing = saving.get_registered_object(key)
        if existing is not None and existing is not cls:
            warnings.warn(
                f"l1l2_rs: {framework} already has {existing!r} registered as {key!r}; "
                f"{cls.__qualname__} is not registered with {framework}",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        package, name = key.split(">", 1)
        saving.register_keras_serializable(package=package, name=name)(cls)
    except Exception as error:  # a Keras without the API must not break its own import
        warnings.warn(
            f"l1l2_rs: could not register {key!r} with {framework}: {error!r}; load models that "
            f"use it with custom_objects={{{key!r}: {cls.__qualname__}}}",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds Keras' packages through the other finders and registers once they have loaded."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in FRAMEWORKS or fullname in _DONE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec: importlib.machinery.ModuleSpec | None = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, fullname)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    """The framework's own loader, then the registration; leaves the real loader on the module."""

    def __init__(self, loader: Any, framework: str) -> None:
        self._loader = loader
        self._framework = framework

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _register_all(self._framework)
        if len(_DONE) == len(FRAMEWORKS):
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
