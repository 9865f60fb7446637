"""Text generation behind Megatron's REST interface (tools/run_text_generation_server.py).

api.py checks a request and turns it into generated text, per-token segments and
log-probabilities on top of megatron/text_generation_utils.py (the decoding loop with its
key/value cache); server.py serves it with Flask on tensor-parallel rank 0 while the other
ranks follow the broadcast requests; model.py builds the GPT for inference from the flags.
"""
