"""swin-pretrain: distributed Swin Transformer pretraining (models, data, the training core, checkpoints)."""
__version__ = "0.1.0"
