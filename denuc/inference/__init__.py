"""Running trained models: tiling, detection, classification, pipelines, whole slides."""
