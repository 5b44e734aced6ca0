"""Image-caption data for fine-tuning: loading, validation, transforms, aspect-ratio bucketing and encoding caches.

PIL + numpy + torch (no torchvision); sizes are always ``(height, width)``. ``loading`` (with ``metadata``) reads
an imagefolder or Hub dataset; ``validation`` opens every image once and skips bad rows up front; ``transforms``
converts, resizes, crops and flips; ``buckets`` groups images by aspect ratio; ``dataset`` serves items and
collates batches; ``cache`` and ``cached_dataset`` store and serve encodings; ``shards`` and ``streaming`` read tar
shards or a ``datasets`` stream batch by batch, for data that does not fit on one disk. Every random choice of an
item comes from ``(seed, epoch, index)``, so results do not depend on worker count, order or rank. The design and
the fault table are in docs/training-unet.md, section "Training data".

    raw = load_image_caption_dataset(train_data_dir="data/")
    ds = ImageCaptionDataset(raw, resolution=1024, center_crop=False, random_flip=True, buckets=make_buckets(1024))
    sampler = BucketBatchSampler(ds.sizes, ds.buckets, batch_size=4, seed=42)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_fn)
"""

from __future__ import annotations

# The constants and the ``Size`` alias are importable from the package too (``X as X``), outside ``__all__``.
from .buckets import BucketBatchSampler, assign_buckets, make_buckets, nearest_bucket
from .cache import CACHE_FORMAT_VERSION as CACHE_FORMAT_VERSION
from .cache import CachedEncodings
from .cached_dataset import CachedImageCaptionDataset, cache_image_encodings
from .dataset import MAX_ASPECT_RATIO as MAX_ASPECT_RATIO
from .dataset import SMALL_IMAGE_UPSCALE as SMALL_IMAGE_UPSCALE
from .dataset import ImageCaptionDataset, collate_fn
from .images import Size as Size
from .loading import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS
from .loading import METADATA_FILENAMES as METADATA_FILENAMES
from .loading import load_image_caption_dataset
from .transforms import ImageTransform, image_to_tensor, resize_and_crop, to_rgb
from .validation import ValidationReport, validate_image_caption_dataset

__all__ = [
    "BucketBatchSampler",
    "CachedEncodings",
    "CachedImageCaptionDataset",
    "ImageCaptionDataset",
    "ImageTransform",
    "ValidationReport",
    "assign_buckets",
    "cache_image_encodings",
    "collate_fn",
    "image_to_tensor",
    "load_image_caption_dataset",
    "make_buckets",
    "nearest_bucket",
    "resize_and_crop",
    "to_rgb",
    "validate_image_caption_dataset",
]
