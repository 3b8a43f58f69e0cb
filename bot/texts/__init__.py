"""Every text the bot sends: its template, how it is filled in, how names and times read."""
