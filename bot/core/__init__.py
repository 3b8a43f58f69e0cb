"""What all of bot/ builds on: the homeserver port, metrics, reactions, audit chain, loops."""
