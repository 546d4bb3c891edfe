"""psq's training side, run as processes: the trainers the Procfile starts."""
