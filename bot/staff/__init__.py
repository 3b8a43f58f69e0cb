"""Staff: who they are, their `!case` and `!rooms` commands, what else reaches them."""
