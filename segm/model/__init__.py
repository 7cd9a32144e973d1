"""Segmenter model: ViT encoder, linear / mask-transformer decoders, factory and inference helpers."""
