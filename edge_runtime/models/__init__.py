"""Frozen classifiers: CIFAR ResNets, a small CNN, a fast BatchNorm-heavy net, or a user module."""
