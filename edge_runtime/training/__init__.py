"""Training the frozen classifier: batched on-device augmentation, the training loop, checkpoints."""
