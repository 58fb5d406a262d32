"""The Lightning adapter: ``SMDCallback`` and the parts that read a Trainer."""
