"""What never ships in a checkpoint: dataset readers (`data`), the official GMNER / MNER / EEG metric
(`metrics`), training utilities (`training`), the frozen vision tower's region-feature cache
(`feature_cache`), the synthetic demo release (`demo_data`), line readers with file-and-line errors
(`file_utils`) and the checkpoint export (`export`). These modules import the shipped ones
(`from .. import ...`); no shipped module imports them (docs/ARCHITECTURE.md)."""
