"""The group rooms the bot moderates: their state, who may flag whom, who comes and goes."""
