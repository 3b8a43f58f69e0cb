"""The next-day check-in: when it falls due, and who joins and claims it."""
