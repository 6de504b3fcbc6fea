"""Fine-tuning of pretrained Swin models at new resolutions; builds on `pretrain`, never the reverse."""
