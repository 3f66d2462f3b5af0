"""GPT training from scratch: data, tokenizers, the loop (teacher forcing, forward or backward, torchrun
DDP), checkpoints that every logitlab command loads. ``logitlab train -h`` / ``python -m logitlab.train``."""

from .data import build_tokenizer, load_texts, save_tokenizer
from .loop import PRESETS, TrainConfig, TrainResult, train

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "build_tokenizer", "load_texts", "save_tokenizer", "train"]
