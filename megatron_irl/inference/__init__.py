"""The inference layer: generation from a Megatron-Core model, used by training and evaluation."""
