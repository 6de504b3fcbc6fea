"""swin-pretrain: distributed Swin Transformer pretraining (model, data, engine, checkpoints)."""
__version__ = "0.1.0"
