"""Classical recommenders ("tools"), one module each. Importing the package does not import the
tool modules (several import torch / TorchRec, seconds on a small machine, which the jobs' drivers
never need): :func:`tool_class` and :func:`registered` import them all on first use, which fills
the registry."""

from reasonrec.tools.base import Tool, ToolData, ToolInputError, register, registered, tool_class  # noqa: F401
