"""Networks: the VAE wrapper (models.vae) now; SiT, projectors and encoders as they land."""
