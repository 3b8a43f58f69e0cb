"""The bot's own rooms: which kind a room is, the staff room and its reports, DMs made ahead."""
