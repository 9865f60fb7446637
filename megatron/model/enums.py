"""Layer, attention and attention-mask kinds (Megatron's enums, same names and values)."""

import enum


class LayerType(enum.Enum):
    """A transformer layer of the encoder stack or of the decoder stack (T5)."""

    encoder = 1
    decoder = 2


class AttnType(enum.Enum):
    """Attention over the layer's own input, or over the encoder output (T5 decoder)."""

    self_attn = 1
    cross_attn = 2


class AttnMaskType(enum.Enum):
    """Padding masks come with each batch; causal masks are lower-triangular."""

    padding = 1
    causal = 2
