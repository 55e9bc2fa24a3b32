"""Parts that train.py composes: data, models, checkpointing."""
