"""Infrastructure every layer may use: errors, atomic file IO, signals, schedules, precision."""
