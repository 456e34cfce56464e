"""Decoder models: the Llama-family transformer, its presets, and Hugging Face interop."""
