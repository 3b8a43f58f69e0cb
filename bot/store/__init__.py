"""The case store: every table and every SQL statement the service runs lives here."""
