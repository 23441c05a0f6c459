"""Data pipeline: image sources, the encoder CLI, and the shard format (writer and reader)."""
from preprocessing.shards import ShardDataset, ShardLoader, latents_from_raw, verify

__all__ = ["ShardDataset", "ShardLoader", "latents_from_raw", "verify"]
