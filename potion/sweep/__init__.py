"""The PTN search as a Hydra multirun (driver and jobs)."""
