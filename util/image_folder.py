"""ImageFolder trees with clear errors for missing folders (and, later, bad image files)."""
import os

from torchvision import datasets

from util.misc import UsageError


def image_folder(data_path, split, transform):
    """``ImageFolder(data_path/split)``, with a one-line ``UsageError`` naming the folder when it is missing, has no
    class folders, or a class folder holds no image."""
    if not os.path.isdir(data_path):
        raise UsageError(f"--data_path {data_path}: no such folder")
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise UsageError(f"--data_path {data_path} has no '{split}/' folder (expected {root}/<class>/<image>)")
    try:
        dataset = datasets.ImageFolder(root, transform=transform)
    except FileNotFoundError as e:
        raise UsageError(f"{root}: {e}") from None
    return dataset
