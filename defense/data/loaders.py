"""Loaders for the real datasets (cifar10, cifar100, gtsrb, tiny-imagenet, mnist): being written."""
