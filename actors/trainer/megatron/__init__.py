"""The Megatron trainer backend: megatron-core GPTModel with TP/PP, loaded from HF weights."""
