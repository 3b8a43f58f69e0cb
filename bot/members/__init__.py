"""What any member of a moderated room may ask of the bot (`!policy`)."""
