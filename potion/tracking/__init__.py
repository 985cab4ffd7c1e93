"""MLflow, and what it lacks here: explicit URIs (uris), a store opened safely (client, store), guarded trackers
(tracker, params), runs of killed processes closed (liveness), run folders logged or relogged (runs)."""
