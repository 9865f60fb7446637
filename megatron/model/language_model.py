"""Embedding, pooler and the transformer language model (embedding + transformer stack).

Checkpoint layout: `state_dict_for_save_checkpoint()` nests as Megatron does,

    {'embedding': {'word_embeddings': {'weight'}, 'position_embeddings': {'weight'},
                   'tokentype_embeddings': {'weight'}},
     'transformer': {'layers.0.input_layernorm.weight': ..., 'final_layernorm.weight': ...},
     'decoder': {...}, 'pooler': {'dense.weight', 'dense.bias'},
     'output_layer': {'weight'}}

('position_embeddings' is absent with --no-position-embedding or RoPE; 'output_layer',
the untied output weight of --untie-embeddings-and-output-weights, is on the last stage)

and `load_state_dict()` accepts that nesting or the plain flat `state_dict()`; the flat
keys are the nested path joined by dots (language_model.embedding.word_embeddings.weight,
language_model.transformer.layers.0.self_attention.query_key_value.weight, ...). A
checkpoint that calls the stack `encoder` (newer Megatron) loads as `transformer`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple

import torch

from megatron import mpu

from .config import TransformerConfig
from .enums import AttnMaskType, LayerType
from .module import MegatronModule
from .transformer import ParallelTransformer
from .utils import (
    INIT_SALT_EMBEDDING,
    INIT_SALT_OUTPUT_LAYER,
    INIT_SALT_POOLER,
    get_linear_layer,
    init_full_parameter,
    init_methods,
    init_rng,
)


def parallel_lm_logits(
    input_: torch.Tensor,
    word_embeddings_weight: torch.Tensor,
    parallel_output: bool,
    config: mpu.ParallelConfig,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits = input E^T (+ bias) with E [v/p, h] this rank's vocabulary rows; the GEMM
    communicates as a column-parallel layer of `config` would.

    input_ [s, b, h] ([s/p, b, h] under sequence parallelism: gathered first) ->
    [s, b, v/p], or [s, b, v] gathered over ranks when not parallel_output.
    """
    logits_parallel = mpu.linear_with_grad_accumulation_and_async_allreduce(
        input_,
        word_embeddings_weight,
        bias,
        config.sequence_parallel,
        config.async_tensor_model_parallel_allreduce,
        config.tp_comm_overlap,
    )  # [s, b, v/p]
    if parallel_output:
        return logits_parallel
    return mpu.gather_from_tensor_model_parallel_region(logits_parallel)


def build_output_layer(config: TransformerConfig, init_method: Callable) -> torch.nn.Module:
    """The untied output weight W [v/p, h] (vocab-parallel rows, no bias): logits h W^T."""
    return mpu.ColumnParallelLinear(
        config.hidden_size,
        config.padded_vocab_size,
        bias=False,
        gather_output=False,
        init_method=init_method,
        config=config.parallel_config,
    )


class Embedding(MegatronModule):
    """Word + learned position (+ token type) embeddings, then dropout. Without
    config.add_position_embedding (RoPE, --no-position-embedding) there is no position
    table and position_ids are ignored.

    input_ids, position_ids [b, s] -> [s, b, h] (transposed to the transformer layout;
    [s/p, b, h] under sequence parallelism, each rank keeping its part of the sequence).
    """

    def __init__(
        self, config: TransformerConfig, init_method: Callable, num_tokentypes: int = 0
    ) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.init_method = init_method
        self.num_tokentypes = num_tokentypes
        self.fp32_residual_connection = config.fp32_residual_connection
        self.sequence_parallel = config.sequence_parallel
        self.perform_initialization = config.perform_initialization
        self.parallel_config = config.parallel_config
        self.word_embeddings = mpu.VocabParallelEmbedding(
            config.padded_vocab_size,
            config.hidden_size,
            config=self.parallel_config,
            init_method=init_method,
        )
        self._word_embeddings_key = "word_embeddings"
        self._position_embeddings_key = "position_embeddings"
        self.position_embeddings = None
        if config.add_position_embedding:
            self.position_embeddings = torch.nn.Embedding(
                config.max_position_embeddings, config.hidden_size
            )
            if config.perform_initialization:
                init_full_parameter(self.position_embeddings.weight, init_method)
        self._tokentype_embeddings_key = "tokentype_embeddings"
        self.tokentype_embeddings = None
        if num_tokentypes > 0:
            self.tokentype_embeddings = torch.nn.Embedding(num_tokentypes, config.hidden_size)
            if config.perform_initialization:
                init_full_parameter(self.tokentype_embeddings.weight, init_method)
        self.embedding_dropout = torch.nn.Dropout(config.hidden_dropout)

    def add_tokentype_embeddings(self, num_tokentypes: int) -> None:
        """Add token-type embeddings to a model pretrained without them (fine-tuning)."""
        if self.tokentype_embeddings is not None:
            raise RuntimeError("Embedding: tokentype embeddings are already present")
        self.num_tokentypes = num_tokentypes
        self.tokentype_embeddings = torch.nn.Embedding(num_tokentypes, self.hidden_size)
        init_full_parameter(self.tokentype_embeddings.weight, self.init_method)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        tokentype_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids)  # [b, s, h]
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(position_ids)
        if tokentype_ids is not None:
            if self.tokentype_embeddings is None:
                raise ValueError("Embedding: tokentype_ids given but num_tokentypes is 0")
            embeddings = embeddings + self.tokentype_embeddings(tokentype_ids)
        embeddings = embeddings.transpose(0, 1).contiguous()  # [s, b, h]
        if self.fp32_residual_connection:
            embeddings = embeddings.float()
        if self.sequence_parallel:
            embeddings = mpu.scatter_to_sequence_parallel_region(embeddings)  # [s/p, b, h]
            if self.training and self.embedding_dropout.p > 0:
                with mpu.get_cuda_rng_tracker().fork():
                    return self.embedding_dropout(embeddings)
            return self.embedding_dropout(embeddings)
        return self.embedding_dropout(embeddings)

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        state_dict_ = {
            self._word_embeddings_key: self.word_embeddings.state_dict(keep_vars=keep_vars),
        }
        if self.position_embeddings is not None:
            state_dict_[self._position_embeddings_key] = self.position_embeddings.state_dict(
                keep_vars=keep_vars
            )
        if self.tokentype_embeddings is not None:
            state_dict_[self._tokentype_embeddings_key] = self.tokentype_embeddings.state_dict(
                keep_vars=keep_vars
            )
        return state_dict_


class Pooler(MegatronModule):
    """tanh(W h_i + b) of the hidden state at `sequence_index` (BERT's [CLS] head).

    hidden_states [s, b, h] -> [b, h].
    """

    def __init__(self, hidden_size: int, init_method: Callable, sequence_parallel: bool = False):
        super().__init__()
        self.dense = get_linear_layer(hidden_size, hidden_size, init_method)
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden_states: torch.Tensor, sequence_index: int = 0) -> torch.Tensor:
        if self.sequence_parallel:
            hidden_states = mpu.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False
            )
        pooled = hidden_states[sequence_index, :, :]  # [b, h]
        return torch.tanh(self.dense(pooled))


def flatten_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Join nested checkpoint dicts into flat module keys ('a': {'b': t} -> 'a.b': t)."""
    flat: Dict[str, Any] = {}
    for key, value in state_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_state_dict(value, name + "."))
        else:
            flat[name] = value
    return flat


def load_model_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, Any], strict: bool = True
):
    """Load a GPT/BERT/T5 model from the nested checkpoint layout or a flat state_dict().

    Nested keys are joined ('language_model': {'encoder': ...} -> 'language_model.encoder.'),
    then checkpoint names map to module names: 'word_embeddings_for_head.' (the last
    pipeline stage's copy of the embeddings) -> 'word_embeddings.', and
    'language_model.encoder.' -> 'language_model.transformer.'.
    """
    renames = (
        ("word_embeddings_for_head.", "word_embeddings."),
        ("language_model.encoder.", "language_model.transformer."),
    )
    flat = {}
    for key, value in flatten_state_dict(state_dict).items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        flat[key] = value
    return torch.nn.Module.load_state_dict(model, flat, strict=strict)


class TransformerLanguageModel(MegatronModule):
    """Embedding (first stage) -> ParallelTransformer (this stage's layers) -> optional
    decoder stack (T5) and pooler (last stage). Returns [s, b, h] hidden states.

    With config.untie_embeddings_and_output_weights the last stage also holds
    `output_layer`, a column-parallel [v, h] weight split over the vocabulary like the
    word embeddings (rank r holds rows [r v/p, (r+1) v/p)), no bias; the model computes
    its logits h W^T with it (see GPTModel) instead of with the word embeddings."""

    def __init__(
        self,
        config: TransformerConfig,
        init_method: Callable,
        output_layer_init_method: Callable,
        encoder_attn_mask_type: AttnMaskType,
        num_tokentypes: int = 0,
        add_decoder: bool = False,
        decoder_attn_mask_type: AttnMaskType = AttnMaskType.causal,
        add_pooler: bool = False,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        super().__init__()
        self.pre_process = pre_process
        self.post_process = post_process
        self.hidden_size = config.hidden_size
        self.num_tokentypes = num_tokentypes
        self.init_method = init_method
        self.add_decoder = add_decoder
        self.add_pooler = add_pooler
        if self.pre_process:
            with init_rng(config.seed, INIT_SALT_EMBEDDING):
                self.embedding = Embedding(config, init_method, num_tokentypes)
            self._embedding_key = "embedding"
        self.transformer = ParallelTransformer(
            config,
            init_method,
            output_layer_init_method,
            self_attn_mask_type=encoder_attn_mask_type,
            pre_process=self.pre_process,
            post_process=self.post_process,
        )
        self._transformer_key = "transformer"
        if self.add_decoder:
            if mpu.get_pipeline_model_parallel_world_size() > 1:
                raise ValueError(
                    "TransformerLanguageModel: a decoder (T5) needs "
                    "--pipeline-model-parallel-size 1"
                )
            self.decoder = ParallelTransformer(
                config,
                init_method,
                output_layer_init_method,
                layer_type=LayerType.decoder,
                self_attn_mask_type=decoder_attn_mask_type,
            )
            self._decoder_key = "decoder"
        if self.post_process and self.add_pooler:
            with init_rng(config.seed, INIT_SALT_POOLER):
                self.pooler = Pooler(self.hidden_size, init_method, config.sequence_parallel)
            self._pooler_key = "pooler"
        self.untie_embeddings_and_output_weights = config.untie_embeddings_and_output_weights
        if self.post_process and self.untie_embeddings_and_output_weights:
            if add_decoder:
                raise ValueError(
                    "--untie-embeddings-and-output-weights is for decoder-only models (GPT)"
                )
            with init_rng(config.seed, INIT_SALT_OUTPUT_LAYER):
                self.output_layer = build_output_layer(config, init_method)
            self._output_layer_key = "output_layer"

    def set_input_tensor(self, input_tensor) -> None:
        """Input from the previous pipeline stage (a tensor, or a one-element list)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError("TransformerLanguageModel: expected one input tensor")
            input_tensor = input_tensor[0]
        self.transformer.set_input_tensor(input_tensor)

    def forward(
        self,
        enc_input_ids: torch.Tensor | None,
        enc_position_ids: torch.Tensor | None,
        enc_attn_mask: torch.Tensor | None,
        dec_input_ids: torch.Tensor | None = None,
        dec_position_ids: torch.Tensor | None = None,
        dec_attn_mask: torch.Tensor | None = None,
        enc_dec_attn_mask: torch.Tensor | None = None,
        tokentype_ids: torch.Tensor | None = None,
        layer_past=None,
        get_key_value: bool = False,
        pooling_sequence_index: int = 0,
        enc_hidden_states: torch.Tensor | None = None,
        output_enc_hidden: bool = False,
    ):
        encoder_input = None
        if self.pre_process:
            encoder_input = self.embedding(
                enc_input_ids, enc_position_ids, tokentype_ids=tokentype_ids
            )  # [s, b, h]
        if enc_hidden_states is None:
            encoder_output = self.transformer(
                encoder_input, enc_attn_mask, layer_past=layer_past, get_key_value=get_key_value
            )
        else:
            encoder_output = enc_hidden_states
        pooled_output = None
        if self.post_process and self.add_pooler:
            hidden = encoder_output[0] if get_key_value else encoder_output
            pooled_output = self.pooler(hidden, pooling_sequence_index)

        if not self.add_decoder or output_enc_hidden:
            if pooled_output is not None:
                return encoder_output, pooled_output
            return encoder_output

        dec_embedding_output = self.embedding(dec_input_ids, dec_position_ids)
        decoder_output = self.decoder(
            dec_embedding_output,
            dec_attn_mask,
            layer_past=layer_past,
            get_key_value=get_key_value,
            encoder_output=encoder_output,
            enc_dec_attn_mask=enc_dec_attn_mask,
        )
        if pooled_output is not None:
            return decoder_output, encoder_output, pooled_output
        return decoder_output, encoder_output

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        """Megatron's nesting (see the module docstring)."""
        state_dict_ = {}
        if self.pre_process:
            state_dict_[self._embedding_key] = self.embedding.state_dict_for_save_checkpoint(
                keep_vars=keep_vars
            )
        state_dict_[self._transformer_key] = self.transformer.state_dict(keep_vars=keep_vars)
        if self.add_decoder:
            state_dict_[self._decoder_key] = self.decoder.state_dict(keep_vars=keep_vars)
        if self.post_process and self.add_pooler:
            state_dict_[self._pooler_key] = self.pooler.state_dict(keep_vars=keep_vars)
        if self.post_process and self.untie_embeddings_and_output_weights:
            state_dict_[self._output_layer_key] = self.output_layer.state_dict(keep_vars=keep_vars)
        return state_dict_

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True):
        """Load Megatron's nested layout or the flat state_dict()."""
        flat = flatten_state_dict(state_dict)
        flat = {
            ("transformer." + k[len("encoder.") :] if k.startswith("encoder.") else k): v
            for k, v in flat.items()
        }
        return super().load_state_dict(flat, strict=strict)


def get_language_model(
    config: TransformerConfig,
    num_tokentypes: int,
    add_pooler: bool,
    encoder_attn_mask_type: AttnMaskType,
    init_method: Callable | None = None,
    scaled_init_method: Callable | None = None,
    add_decoder: bool = False,
    decoder_attn_mask_type: AttnMaskType = AttnMaskType.causal,
    pre_process: bool = True,
    post_process: bool = True,
) -> Tuple[TransformerLanguageModel, str]:
    """Build a TransformerLanguageModel; returns (model, its checkpoint key
    'language_model'). Initialisers default to `init_methods(config)`: N(0, std^2) and,
    for the output projections, N(0, std^2 / (2 L)), or Xavier uniform."""
    default_init, default_scaled_init = init_methods(config)
    if init_method is None:
        init_method = default_init
    if scaled_init_method is None:
        scaled_init_method = default_scaled_init
    language_model = TransformerLanguageModel(
        config,
        init_method,
        scaled_init_method,
        encoder_attn_mask_type,
        num_tokentypes=num_tokentypes,
        add_decoder=add_decoder,
        decoder_attn_mask_type=decoder_attn_mask_type,
        add_pooler=add_pooler,
        pre_process=pre_process,
        post_process=post_process,
    )
    return language_model, "language_model"
