"""Loading a user's Keras file, with the custom classes it needs, or saying which it needs.

A Keras file (``.keras``, or a legacy ``.h5``) keeps the layers, so MC dropout can switch exactly the
dropout-family layers on. A SavedModel directory keeps only a traced graph, in which dropout is no
longer a layer: it is refused with what to save instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import keras

SUFFIXES = (".keras", ".h5", ".hdf5")


class ImportRefused(ValueError):
    """The model cannot be served as it is; the message says why and which flag or change fixes it."""


def load(source: Path, custom_objects: str | None = None) -> keras.Model:
    """The Keras model in ``source``; ``custom_objects`` names a module (or .py file) defining its custom classes."""
    if source.is_dir():
        if (source / "saved_model.pb").exists():
            raise ImportRefused(
                f"{source}: a SavedModel holds a traced graph, not Keras layers, so its dropout cannot be switched "
                "on for MC sampling; save the Keras model itself with model.save('model.keras') and import that"
            )
        raise ImportRefused(f"{source}: a directory; give a .keras file")
    if not source.is_file():
        raise ImportRefused(f"{source}: no such file")
    if source.suffix.lower() not in SUFFIXES:
        raise ImportRefused(f"{source}: unsupported file type {source.suffix!r}; use a .keras file (or a legacy .h5)")
    custom = _custom_classes(source)
    objects = None
    if custom_objects:  # a class given by its name also answers to the name it was registered under
        objects = _custom_objects(custom_objects)
        objects |= {registered: objects[name] for name, registered in custom.items() if name in objects}
    try:
        return keras.saving.load_model(source, custom_objects=objects, compile=False)
    except Exception as error:  # Keras raises TypeError, ValueError, KeyError... for a file it cannot rebuild
        if custom:
            raise ImportRefused(
                f"{source}: uses classes that are not Keras' own: {', '.join(custom)}. Pass --custom-objects MODULE "
                "(an importable module or a .py file defining them, or a dict CUSTOM_OBJECTS in it)"
            ) from None
        if "safe_mode" in str(error):  # a Lambda layer's Python code, which Keras runs only when told to
            raise ImportRefused(
                f"{source}: holds Python code (a Lambda layer), which Keras does not run from a file by default. "
                "If you trust the file, pass --custom-objects with a module that calls "
                "keras.config.enable_unsafe_deserialization()"
            ) from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImportRefused(f"{source}: Keras could not load it: {first}") from None


def _custom_objects(spec: str) -> dict[str, object]:
    """Import ``spec`` (which registers any ``@register_keras_serializable`` classes) and collect its objects.

    The module's ``CUSTOM_OBJECTS`` dict if it has one, else every class and function it defines.
    """
    try:
        if spec.endswith(".py"):
            location = importlib.util.spec_from_file_location(Path(spec).stem, spec)
            if location is None or not Path(spec).is_file():
                raise ImportRefused(f"--custom-objects {spec}: no such file")
            module = importlib.util.module_from_spec(location)
            sys.modules[location.name] = module
            location.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
    except ImportRefused:
        raise
    except Exception as error:
        raise ImportRefused(f"--custom-objects {spec}: cannot import it ({type(error).__name__}: {error})") from None
    declared = getattr(module, "CUSTOM_OBJECTS", None)
    if isinstance(declared, dict):
        return declared
    return {
        key: value
        for key, value in vars(module).items()
        if not key.startswith("_") and callable(value) and getattr(value, "__module__", None) == module.__name__
    }


def _custom_classes(source: Path) -> dict[str, str]:
    """Classes a .keras file names that are not Keras' own, each with the name it was registered under."""
    try:
        with zipfile.ZipFile(source) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        return {}
    found: dict[str, str] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            name, module, registered = node.get("class_name"), node.get("module"), node.get("registered_name")
            # Keras' own classes name a keras module; a registered custom class has no module, only its registered name
            outside = not module.startswith("keras") if isinstance(module, str) else isinstance(registered, str)
            if isinstance(name, str) and "config" in node and outside:
                found.setdefault(name, registered if isinstance(registered, str) else name)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found
