"""Events in: recorded as they arrive, caught up when never sent, drained to handlers."""
