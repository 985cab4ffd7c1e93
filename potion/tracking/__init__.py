"""MLflow: the tracker, the store's safety, logging a run folder."""
