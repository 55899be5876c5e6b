"""NARVL model library: OFA-style encoder-decoder, AR and NARVL decoders, Q-CTC, decoding.

Depends on torch (and tokenizers / safetensors / pydantic for its config); never on Ray, MLflow or DeepSpeed.
"""
