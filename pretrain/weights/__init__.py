"""Swin weights in three layouts: the official release, timm, and ours; read, resized, loaded and exported.

- official: `{'model': sd}` .pth; patch merging at the END of stage i (`layers.i.downsample`), classifier
  `head.*`, stored `relative_position_index` / `attn_mask` buffers.
- timm: patch merging at the START of stage i+1, classifier `head.fc.*`, no buffers; .safetensors/.pth/.bin.
- ours: timm's key layout plus the model config in the file's metadata (`format: swin-pretrain/1`).

    read.py     formats and layout detection (read_checkpoint, config_from_checkpoint, pretrained_windows_of)
    resize.py   bias tables, the SimMIM spline, absolute position embeddings
    load.py     load_pretrained: the policy (convert, resize, fit the head, strict) and its LoadReport
    export.py   export / export_layouts / convert_checkpoint, and export_run for a run's checkpoint

The architecture read off a state dict (shape inference) is the model's: pretrain.models.shapes. A run's
checkpoints are read through pretrain.runs; nothing here imports the trainer.
"""
from ..errors import CheckpointError, CheckpointMismatchError
from ..models.shapes import stage_windows, v2_windows
from .export import LAYOUTS, SIMMIM_LAYOUTS, convert_checkpoint, export, export_layouts, export_run
from .load import LoadReport, load_pretrained
from .read import OURS_FORMAT, config_from_checkpoint, detect_layout, pretrained_windows_of, read_checkpoint
from .resize import (
                     geometric_positions,
                     resize_abs_pos_embed,
                     resize_bias_table,
                     resize_bias_table_geometric,
                     spline_matrix,
)

__all__ = ["LAYOUTS", "OURS_FORMAT", "SIMMIM_LAYOUTS", "CheckpointError", "CheckpointMismatchError", "LoadReport",
           "config_from_checkpoint", "convert_checkpoint", "detect_layout", "export", "export_layouts", "export_run",
           "geometric_positions", "load_pretrained", "pretrained_windows_of", "read_checkpoint", "resize_abs_pos_embed",
           "resize_bias_table", "resize_bias_table_geometric", "spline_matrix", "stage_windows", "v2_windows"]
