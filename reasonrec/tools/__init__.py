"""Classical recommenders ("tools"), one module each; importing the package registers them all."""

import importlib
import pkgutil

from reasonrec.tools.base import Tool, ToolData, ToolInputError, register, registered, tool_class  # noqa: F401

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
