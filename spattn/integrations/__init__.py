"""Adapters that put spattn patterns into other libraries' models: `transformers` (Hugging Face
attention and mask interfaces) and `torchscale` (LongNet configs and checkpoints). Each imports
its library only when used."""
