"""Communities: one install serving several groups, each with its own staff, rooms,
settings and language, none seeing another's cases (README: Communities)."""
