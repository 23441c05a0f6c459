"""Networks: SiT and its size registry (models.sit), REPA target encoders (models.encoders), the
SD-VAE wrapper (models.vae) and the FID Inception (models.inception)."""
from .sit import SiT, SiT_models, get_model_config, load_checkpoint

__all__ = ["SiT", "SiT_models", "get_model_config", "load_checkpoint"]
