"""The command line: ``python -m app [options]`` serves; ``dropout-serve serve|train|import|evaluate …``.

Every setting of ``app.settings.Settings`` is a flag named after its environment variable
(``DROPOUT_SERVE_GRPC_PORT`` is ``--grpc-port``), so the two cannot drift apart. A flag wins
over the variable: it is written into this process's environment, which uvicorn's worker
processes inherit and read through ``Settings`` as they would any variable. Secrets (API keys)
have no flag, since a command line is visible to every user of the machine in ``ps``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin

from pydantic import AliasChoices, SecretStr, ValidationError
from pydantic.fields import FieldInfo

from app.settings import Settings

PREFIX = Settings.model_config["env_prefix"]
TRAINING_COMMANDS = "train, import, evaluate, uci"


def env_name(field: str, info: FieldInfo) -> str:
    """The variable ``Settings`` reads for a field (its ``DROPOUT_SERVE_`` alias, if it has one)."""
    alias = info.validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if alias else []
    named = [c for c in choices if isinstance(c, str) and c.upper().startswith(PREFIX)]
    return (named[0] if named else PREFIX + field).upper()


def flag_name(variable: str) -> str:
    return "--" + variable.removeprefix(PREFIX).lower().replace("_", "-")


_METAVARS = {Path: "PATH", int: "N", float: "N"}


def _plain(annotation: Any) -> Any:
    """``Path`` for ``Path | None``: the type a value must parse as."""
    kinds = [a for a in get_args(annotation) if a is not type(None)]
    return kinds[0] if get_origin(annotation) is UnionType and len(kinds) == 1 else annotation


def _default(info: FieldInfo) -> Any:
    value = info.get_default(call_default_factory=True)
    if value is None or value == "":
        return "unset"
    return str(value).lower() if isinstance(value, bool) else value


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve the model repository over REST (native, TF Serving, Open Inference Protocol v2).",
        epilog=f"Each option is also read from its environment variable ({PREFIX}<OPTION>, e.g. "
        f"{PREFIX}PORT=9000); a flag given here wins. API keys only come from {PREFIX}API_KEYS. "
        "README.md, Configuration, explains each setting.",
    )
    for field, info in Settings.model_fields.items():
        if info.annotation in (SecretStr, SecretStr | None):
            continue
        variable = env_name(field, info)
        help_text = f"{info.description or field.replace('_', ' ')} [{variable}; default: {_default(info)}]"
        options: dict[str, Any] = {"dest": variable, "default": None, "help": help_text.replace("%", "%%")}
        if info.annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif get_origin(info.annotation) is not None and all(isinstance(a, str) for a in get_args(info.annotation)):
            options["choices"] = get_args(info.annotation)  # a Literal
        else:
            options["metavar"] = _METAVARS.get(_plain(info.annotation), field.split("_")[-1].upper())
        parser.add_argument(flag_name(variable), **options)
    return parser


def settings_from(argv: list[str]) -> Settings:
    """Parse the flags, put them in the environment (flags win) and read the settings from it."""
    given = {name: value for name, value in vars(parser().parse_args(argv)).items() if value is not None}
    os.environ.update({name: str(value).lower() if isinstance(value, bool) else value for name, value in given.items()})
    # TensorFlow's C++ start-up notes (CPU features, oneDNN) look like errors to a new user; keep
    # warnings and errors. Set before TensorFlow is imported, here or in a worker process.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return Settings()


def serve(argv: list[str]) -> int:
    try:
        settings = settings_from(argv)
    except ValidationError as error:
        for problem in error.errors():
            name = str(problem["loc"][0]) if problem["loc"] else ""
            info = Settings.model_fields.get(name)
            where = flag_name(env_name(name, info)) if info else name
            print(f"error: {where}: {problem['msg']}", file=sys.stderr)
        return 2
    from app import logs, server
    from app.metrics import prepare_multiprocess

    prepare_multiprocess(settings.workers)  # before the workers start: they read it when they import
    logs.configure(settings.log_format, settings.access_log)
    return server.run(settings)


def console(argv: list[str] | None = None) -> int:
    """``dropout-serve``: ``serve`` is ``python -m app``; the other commands are ``python -m training``'s."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: dropout-serve COMMAND [options]\n\n"
            "  serve     serve the model repository (python -m app)\n"
            f"  {TRAINING_COMMANDS.replace(', ', '|')}\n"
            "            train a model, import a Keras model, evaluate one, or run the UCI benchmark\n"
            "            (python -m training; needs the [train] extra)\n\n"
            "`dropout-serve COMMAND --help` lists a command's options."
        )
        return 0 if argv else 2
    if argv[0] == "serve":
        return serve(argv[1:])
    try:
        from training.__main__ import main as training_main
    except ModuleNotFoundError as error:
        print(f"error: {argv[0]} needs {error.name}: pip install 'dropout-serve[train]'", file=sys.stderr)
        return 2
    return training_main(argv)
