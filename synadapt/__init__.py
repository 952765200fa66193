"""synadapt: think only as much as each question needs."""
