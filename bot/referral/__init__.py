"""A moderator's flag, recognised and decided: a case, or a recorded refusal."""
