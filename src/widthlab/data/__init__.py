"""Datasets: synthetic generators, bundled real data, readers for users' files, splits, augmentation."""
