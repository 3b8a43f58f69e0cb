"""Cases as a whole: the engine running their steps, their retention, their record."""
