"""Image building: Debian trixie root tree + rendered configuration -> bootable GPT disk image."""

from .builder import BuildOptions, BuildResult, build_image, output_paths
from .cache import Cache, default_cache_dir
from .run import BuildLog, ImageError

__all__ = ["BuildLog", "BuildOptions", "BuildResult", "Cache", "ImageError", "build_image", "default_cache_dir",
           "output_paths"]
