"""The dataset pipeline shared by every training script.

    from library.data import add_dataset_arguments, build_datasets, DatasetGroup

See docs/architecture.md ("Contract: data pipeline") and docs/dataset_config.md.
"""

from library.data.arguments import add_dataset_arguments, data_loader_workers
from library.data.batches import Batch
from library.data.build import build_datasets
from library.data.caching import LatentCacheEncoder, TextCacheEncoder
from library.data.group import DatasetGroup
from library.data.loader import EpochLoader
from library.data.metadata import group_metadata
from library.data.summary import group_report, print_requested_reports

__all__ = [
    "add_dataset_arguments",
    "build_datasets",
    "data_loader_workers",
    "group_metadata",
    "group_report",
    "print_requested_reports",
    "Batch",
    "DatasetGroup",
    "EpochLoader",
    "LatentCacheEncoder",
    "TextCacheEncoder",
]
