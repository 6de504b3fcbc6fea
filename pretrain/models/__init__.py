"""Swin Transformer model family: `build_model(variant, **overrides)`."""
from .swin import (VARIANTS, SwinConfig, SwinTransformer, build_config, build_model, config_from_section,
                   model_from_config, model_from_section)

__all__ = ["VARIANTS", "SwinConfig", "SwinTransformer", "build_config", "build_model",
           "config_from_section", "model_from_config", "model_from_section"]
