"""Conversion between Hugging Face Llama-family models and megatron-irl checkpoints.

``mapping`` holds the one table of tensor names and transforms, used in both directions;
``families`` translates config.json to the ``model`` config section and back. Runtime
conversion reads and writes safetensors and JSON only (``transformers`` is not needed).
"""

from megatron_irl.convert.families import ConversionError
from megatron_irl.convert.from_hf import ImportPlan, import_checkpoint, plan_import
from megatron_irl.convert.to_hf import convert_to_hf

__all__ = ["ConversionError", "ImportPlan", "convert_to_hf", "import_checkpoint", "plan_import"]
