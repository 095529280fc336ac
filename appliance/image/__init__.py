"""Image building: Debian trixie root tree + rendered configuration -> bootable GPT disk image."""

from .build import build_loaded, build_profile, profile_info
from .builder import BuildOptions, BuildResult, TreeCheck, build_image, output_paths
from .cache import Cache, default_cache_dir
from .manifest import BuildManifest, OutputFile, ProfileInfo
from .run import BuildLog, ImageError
from .spec import ImageSpec, image_spec

__all__ = ["BuildLog", "BuildManifest", "BuildOptions", "BuildResult", "Cache", "ImageError", "ImageSpec",
           "OutputFile", "ProfileInfo", "TreeCheck", "build_image", "build_loaded", "build_profile",
           "default_cache_dir", "image_spec", "output_paths", "profile_info"]
