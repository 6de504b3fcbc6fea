"""Swin Transformer model family: `build_model(variant, **overrides)`; SimMIM on it: `build_simmim(...)`."""
from .simmim import SimMIM, build_simmim, simmim_from_section
from .swin import (
                   VARIANTS,
                   SwinConfig,
                   SwinTransformer,
                   build_config,
                   build_model,
                   config_from_section,
                   model_from_config,
                   model_from_section,
)

__all__ = ["VARIANTS", "SimMIM", "SwinConfig", "SwinTransformer", "build_config", "build_model",
           "build_simmim", "config_from_section", "model_from_config", "model_from_section", "simmim_from_section"]
