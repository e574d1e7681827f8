"""The pipeline stages, one command each: dvc.yaml runs them as `python -m stages.<name> ...`."""
