"""The model stack: transformer layers, language model, GPT (BERT and T5 alongside).

Names from modules that other parts of the tree provide (the DDP wrapper, BERT, T5,
the DeepSpeed pipeline GPT) are imported on first use, so `from megatron.model import
DistributedDataParallel` works as in Megatron without importing every model here.
"""

import importlib

from .enums import AttnMaskType, AttnType, LayerType  # noqa: F401
from .fused_layer_norm import MixedFusedLayerNorm as LayerNorm  # noqa: F401
from .gpt_model import GPTModel  # noqa: F401
from .language_model import get_language_model  # noqa: F401
from .module import Float16Module, MegatronModule  # noqa: F401
from .utils import count_parameters_on_meta  # noqa: F401

_LAZY = {
    "DistributedDataParallel": ".distributed",
    "BertModel": ".bert_model",
    "Classification": ".classification",
    "MultipleChoice": ".multiple_choice",
    "T5Model": ".t5_model",
    "GPTModelPipe": ".gpt_model_pipe",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
